/* Helpers shared by the ring test programs: deterministic payloads that can be regenerated and checked. */
#ifndef TEST_RING_UTIL_H
#define TEST_RING_UTIL_H
#include <stdint.h>
#include <string.h>

static inline uint64_t tr_mix(uint64_t x)
{
    /* splitmix64 finaliser: a cheap bijection, good enough to make every byte depend on the seed. */
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* Length of record seq, in [lo, hi]. */
static inline uint32_t tr_len(uint64_t seq, uint32_t lo, uint32_t hi)
{
    return lo + (uint32_t)(tr_mix(seq ^ 0xA5A5A5A5ull) % (uint64_t)(hi - lo + 1));
}

/* Payload of record seq: the first 8 bytes (when they fit) are seq itself, the rest a keyed stream, made
 * 8 bytes at a time so checking 1M+ records stays cheap under ASan. */
static inline void tr_fill(uint8_t *p, uint32_t len, uint64_t seq)
{
    uint32_t i = 0;
    if (len >= 8) {
        memcpy(p, &seq, 8);
        i = 8;
    }
    uint64_t s = tr_mix(seq);
    for (; i < len; i += 8) {
        s = tr_mix(s + i);
        memcpy(p + i, &s, len - i < 8 ? len - i : 8);
    }
}

/* 1 when p[0..len) is exactly what tr_fill wrote for seq. */
static inline int tr_check(const uint8_t *p, uint32_t len, uint64_t seq)
{
    uint32_t i = 0;
    if (len >= 8) {
        if (memcmp(p, &seq, 8) != 0)
            return 0;
        i = 8;
    }
    uint64_t s = tr_mix(seq);
    for (; i < len; i += 8) {
        s = tr_mix(s + i);
        if (memcmp(p + i, &s, len - i < 8 ? len - i : 8) != 0)
            return 0;
    }
    return 1;
}

#endif
