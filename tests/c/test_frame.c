/*
 * test_frame.c -- the frame codec and CRC32C: known vectors, a pinned golden frame, round trips, every
 * decode/encode error and the documented check order, and hardware vs table CRC on random data.
 * Exit 0 pass, 1 fail.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "baton.h"
#include "bt_test.h"

/* Internal to crc32c.c; compared here so that a wrong table or a wrong hardware path cannot hide. */
uint32_t bti_crc32c_sw(uint32_t crc, const void *data, size_t len);
uint32_t bti_crc32c_hw(uint32_t crc, const void *data, size_t len);
int bti_crc32c_hw_available(void);

/* Bit-at-a-time reference straight from the definition: shares nothing with the code under test. */
static uint32_t ref_crc32c(uint32_t crc, const uint8_t *p, size_t len)
{
    crc = ~crc;
    while (len--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
    }
    return ~crc;
}

/* xorshift64*: deterministic so a failure reproduces; the seed is printed. */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

static void fill_random(uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)rnd();
}

/* The frame of the golden vector below, as a header struct. */
static bt_frame_hdr golden_hdr(void)
{
    bt_frame_hdr h;
    memset(&h, 0, sizeof h);
    h.type = 7;
    h.priority = BT_PRIO_HIGH;
    h.flags = BT_FRAME_F_CRC | BT_FRAME_F_REPLY;
    h.source = 0x0102030405060708ull;
    h.destination = 0x1112131415161718ull;
    h.correlation_id = 0x2122232425262728ull;
    h.send_ts_ns = 0x3132333435363738ull;
    return h;
}

/* Written out by hand (and computed independently in Python): pins the byte layout and the CRC. */
static const uint8_t golden[] = {
    0x42, 0x54, 0x4e, 0x31,                         /* magic "BTN1" */
    0x01, 0x07, 0x01, 0x03,                         /* version 1, type 7, HIGH, CRC|REPLY */
    0x03, 0x00, 0x00, 0x00,                         /* payload_len 3 */
    0xf2, 0xbe, 0x12, 0x83,                         /* crc32c 0x8312BEF2 */
    0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, /* source */
    0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11, /* destination */
    0x28, 0x27, 0x26, 0x25, 0x24, 0x23, 0x22, 0x21, /* correlation_id */
    0x38, 0x37, 0x36, 0x35, 0x34, 0x33, 0x32, 0x31, /* send_ts_ns */
    0x68, 0x69, 0x21,                               /* payload "hi!" */
};

static void check_hdr_eq(const bt_frame_hdr *a, const bt_frame_hdr *b)
{
    CHECK_EQ(a->type, b->type);
    CHECK_EQ(a->priority, b->priority);
    CHECK_EQ(a->flags, b->flags);
    CHECK(a->source == b->source);
    CHECK(a->destination == b->destination);
    CHECK(a->correlation_id == b->correlation_id);
    CHECK(a->send_ts_ns == b->send_ts_ns);
}

static uint32_t crc_all(uint32_t (*f)(uint32_t, const void *, size_t), const char *s)
{
    return f(0, s, strlen(s));
}

static void test_crc_vectors(void)
{
    uint32_t (*impls[])(uint32_t, const void *, size_t) = {bt_crc32c, bti_crc32c_sw, bti_crc32c_hw};
    uint8_t zeros[32], ones[32], inc[32], dec[32];
    memset(zeros, 0, sizeof zeros);
    memset(ones, 0xff, sizeof ones);
    for (int i = 0; i < 32; i++) {
        inc[i] = (uint8_t)i;
        dec[i] = (uint8_t)(31 - i);
    }
    for (size_t k = 0; k < sizeof impls / sizeof impls[0]; k++) {
        /* Check value from the CRC catalogue and the iSCSI vectors of RFC 3720 B.4. */
        CHECK_EQ(crc_all(impls[k], "123456789"), 0xE3069283u);
        CHECK_EQ(impls[k](0, zeros, 32), 0x8A9136AAu);
        CHECK_EQ(impls[k](0, ones, 32), 0x62A8AB43u);
        CHECK_EQ(impls[k](0, inc, 32), 0x46DD794Eu);
        CHECK_EQ(impls[k](0, dec, 32), 0x113FDB5Cu);
        CHECK_EQ(impls[k](0, "", 0), 0u);
        /* Continuation: crc(a || b) == crc(b, continuing from crc(a)). */
        CHECK_EQ(impls[k](impls[k](0, "1234", 4), "56789", 5), 0xE3069283u);
    }
    CHECK_EQ(ref_crc32c(0, (const uint8_t *)"123456789", 9), 0xE3069283u);
    CHECK_EQ(bt_crc32c(0x12345678u, NULL, 0), 0x12345678u);
}

static void test_crc_hw_vs_table(void)
{
    if (!bti_crc32c_hw_available())
        fprintf(stderr, "test_frame: no SSE4.2 here, hardware CRC path falls back to the table\n");
    enum { MAXLEN = 1100, ALIGN = 16 };
    uint8_t *buf = malloc(MAXLEN + ALIGN);
    CHECK(buf != NULL);
    for (int round = 0; round < 3; round++) {
        fill_random(buf, MAXLEN + ALIGN);
        for (size_t len = 0; len <= MAXLEN; len += (len < 80 ? 1 : 7)) {
            for (size_t off = 0; off < ALIGN; off += (round == 0 ? 1 : 5)) {
                uint32_t seed = round == 0 ? 0 : (uint32_t)rnd();
                uint32_t want = ref_crc32c(seed, buf + off, len);
                uint32_t sw = bti_crc32c_sw(seed, buf + off, len);
                uint32_t hw = bti_crc32c_hw(seed, buf + off, len);
                if (sw != want || hw != want) {
                    fprintf(stderr, "crc mismatch len=%zu off=%zu seed=%08x: ref %08x sw %08x hw %08x\n",
                            len, off, seed, want, sw, hw);
                    exit(1);
                }
                CHECK_EQ(bt_crc32c(seed, buf + off, len), want);
            }
        }
    }
    /* Split points: continuing across every cut gives the one-shot value. */
    uint32_t whole = bti_crc32c_hw(0, buf, 257);
    for (size_t cut = 0; cut <= 257; cut++) {
        CHECK_EQ(bti_crc32c_hw(bti_crc32c_sw(0, buf, cut), buf + cut, 257 - cut), whole);
        CHECK_EQ(bti_crc32c_sw(bti_crc32c_hw(0, buf, cut), buf + cut, 257 - cut), whole);
    }
    free(buf);
}

static void test_golden(void)
{
    bt_frame_hdr h = golden_hdr();
    uint8_t buf[64];
    memset(buf, 0xAA, sizeof buf);
    CHECK_EQ(bt_frame_encode(buf, sizeof buf, &h, "hi!", 3), (int)sizeof golden);
    CHECK(memcmp(buf, golden, sizeof golden) == 0);
    CHECK_EQ(buf[sizeof golden], 0xAA); /* nothing written past the frame */

    bt_frame_hdr d;
    CHECK_EQ(bt_frame_decode(golden, sizeof golden, 0, &d), (int)sizeof golden);
    check_hdr_eq(&d, &h);
    CHECK_EQ(d.version, BT_FRAME_VERSION);
    CHECK_EQ(d.payload_len, 3);
    CHECK_EQ(d.crc32c, 0x8312BEF2u);
    CHECK_EQ(ref_crc32c(0, golden, 12), bt_crc32c(0, golden, 12));

    /* version and payload_len in hdr are ignored by encode; so is the incoming crc32c. */
    h.version = 9;
    h.payload_len = 1000;
    h.crc32c = 0xDEADBEEF;
    CHECK_EQ(bt_frame_encode(buf, sizeof buf, &h, "hi!", 3), (int)sizeof golden);
    CHECK(memcmp(buf, golden, sizeof golden) == 0);

    /* Without F_CRC the crc32c field is zero and everything else is unchanged. */
    h.flags = BT_FRAME_F_REPLY;
    CHECK_EQ(bt_frame_encode(buf, sizeof buf, &h, "hi!", 3), (int)sizeof golden);
    CHECK(memcmp(buf, golden, 7) == 0);
    CHECK_EQ(buf[7], BT_FRAME_F_REPLY);
    CHECK(memcmp(buf + 8, golden + 8, 4) == 0);
    CHECK(buf[12] == 0 && buf[13] == 0 && buf[14] == 0 && buf[15] == 0);
    CHECK(memcmp(buf + 16, golden + 16, sizeof golden - 16) == 0);
    CHECK_EQ(bt_frame_decode(buf, sizeof golden, 0, &d), (int)sizeof golden);
    CHECK_EQ(d.crc32c, 0);
}

static void random_hdr(bt_frame_hdr *h, int with_crc)
{
    memset(h, 0, sizeof *h);
    h->type = (uint8_t)rnd();
    h->priority = (uint8_t)(rnd() % BT_PRIO_COUNT);
    h->flags = (uint8_t)((rnd() & (BT_FRAME_F_REPLY | BT_FRAME_F_ERROR)) | (with_crc ? BT_FRAME_F_CRC : 0));
    h->source = rnd();
    h->destination = rnd();
    h->correlation_id = rnd();
    h->send_ts_ns = rnd();
}

static void test_round_trip(void)
{
    enum { MAXP = 5000 };
    uint8_t *payload = malloc(MAXP), *buf = malloc(BT_FRAME_HEADER_SIZE + MAXP);
    CHECK(payload && buf);
    for (int i = 0; i < 400; i++) {
        int with_crc = i & 1;
        size_t len = i < 20 ? (size_t)i : (size_t)(rnd() % MAXP);
        bt_frame_hdr h, d;
        random_hdr(&h, with_crc);
        fill_random(payload, len);
        int n = bt_frame_encode(buf, BT_FRAME_HEADER_SIZE + len, &h, len ? payload : NULL, len);
        CHECK_EQ(n, BT_FRAME_HEADER_SIZE + len);
        memset(&d, 0x5A, sizeof d);
        CHECK_EQ(bt_frame_decode(buf, (size_t)n, 0, &d), n);
        check_hdr_eq(&d, &h);
        CHECK_EQ(d.version, BT_FRAME_VERSION);
        CHECK_EQ(d.payload_len, len);
        CHECK_EQ(d._pad, 0);
        CHECK(memcmp(buf + BT_FRAME_HEADER_SIZE, payload, len) == 0);
        if (!with_crc) {
            CHECK_EQ(d.crc32c, 0);
        } else {
            /* Recompute independently: header with the crc field zeroed, then the payload. */
            uint8_t tmp[BT_FRAME_HEADER_SIZE];
            memcpy(tmp, buf, sizeof tmp);
            memset(tmp + 12, 0, 4);
            uint32_t c = ref_crc32c(ref_crc32c(0, tmp, sizeof tmp), payload, len);
            CHECK_EQ(d.crc32c, c);
        }
        /* Trailing bytes after the frame are not part of it. */
        CHECK_EQ(bt_frame_decode(buf, (size_t)n, (uint32_t)len ? (uint32_t)len : 1, NULL), n);
        /* Decoded fields re-encode to the same bytes. */
        uint8_t *again = malloc((size_t)n);
        CHECK(again != NULL);
        CHECK_EQ(bt_frame_encode(again, (size_t)n, &d, buf + BT_FRAME_HEADER_SIZE, d.payload_len), n);
        CHECK(memcmp(again, buf, (size_t)n) == 0);
        free(again);
    }
    free(payload);
    free(buf);
}

/* Decoding every strict prefix from an exactly sized heap copy: -ENODATA, and ASan proves no over-read. */
static void test_prefixes(void)
{
    for (size_t len = 0; len <= sizeof golden; len++) {
        uint8_t *p = malloc(len ? len : 1);
        CHECK(p != NULL);
        memcpy(p, golden, len);
        bt_frame_hdr d;
        memset(&d, 0x5A, sizeof d);
        int rc = bt_frame_decode(len ? p : NULL, len, 0, &d);
        if (len < sizeof golden) {
            CHECK_EQ(rc, -ENODATA);
            CHECK_EQ(d.type, 0x5A); /* *out untouched on failure */
        } else {
            CHECK_EQ(rc, (int)sizeof golden);
        }
        free(p);
    }
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void test_decode_errors(void)
{
    uint8_t f[sizeof golden + 8];
    bt_frame_hdr d;
#define FRESH() memcpy(f, golden, sizeof golden)

    FRESH();
    f[0] = 'X';
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -EBADMSG);
    FRESH();
    f[3] ^= 0x80;
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -EBADMSG);

    FRESH();
    f[4] = 2;
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -EPROTONOSUPPORT);
    FRESH();
    f[4] = 0;
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -EPROTONOSUPPORT);

    FRESH();
    f[6] = BT_PRIO_COUNT;
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -ERANGE);
    FRESH();
    f[6] = 0xFF;
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -ERANGE);
    for (int bit = 3; bit < 8; bit++) {
        FRESH();
        f[7] |= (uint8_t)(1u << bit);
        CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -ERANGE);
    }
    /* crc32c field set without F_CRC: not something encode can produce. */
    FRESH();
    f[7] = BT_FRAME_F_REPLY;
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -ERANGE);
    memset(f + 12, 0, 4);
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), (int)sizeof golden);

    /* Payload length above the maximum: the explicit one, the default (max 0) and the clamp to LIMIT. */
    FRESH();
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 2, &d), -EMSGSIZE);
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 3, &d), (int)sizeof golden);
    put32(f + 8, BT_FRAME_MAX_PAYLOAD_DEFAULT + 1);
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -EMSGSIZE);
    CHECK_EQ(bt_frame_decode(f, sizeof golden, BT_FRAME_MAX_PAYLOAD_DEFAULT + 1, &d), -ENODATA);
    put32(f + 8, BT_FRAME_MAX_PAYLOAD_LIMIT + 1);
    CHECK_EQ(bt_frame_decode(f, sizeof golden, UINT32_MAX, &d), -EMSGSIZE);
    put32(f + 8, BT_FRAME_MAX_PAYLOAD_LIMIT);
    CHECK_EQ(bt_frame_decode(f, sizeof golden, UINT32_MAX, &d), -ENODATA);
    put32(f + 8, UINT32_MAX);
    CHECK_EQ(bt_frame_decode(f, sizeof golden, UINT32_MAX, &d), -EMSGSIZE);

    /* Truncated header and truncated payload. */
    FRESH();
    CHECK_EQ(bt_frame_decode(f, 0, 0, &d), -ENODATA);
    CHECK_EQ(bt_frame_decode(f, 47, 0, &d), -ENODATA);
    CHECK_EQ(bt_frame_decode(f, 48, 0, &d), -ENODATA);
    CHECK_EQ(bt_frame_decode(f, sizeof golden - 1, 0, &d), -ENODATA);
    CHECK_EQ(bt_frame_decode(NULL, 0, 0, &d), -ENODATA);
    CHECK_EQ(bt_frame_decode(NULL, 48, 0, &d), -EINVAL);

    /* CRC mismatch: every single flipped bit in the covered bytes that passes the earlier checks. */
    for (size_t i = 0; i < sizeof golden; i++) {
        if (i < 12)
            continue; /* magic/version/flags/priority/len have their own errors, tested above */
        for (int bit = 0; bit < 8; bit++) {
            FRESH();
            f[i] ^= (uint8_t)(1u << bit);
            CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -EILSEQ);
        }
    }
    FRESH();
    f[5] ^= 0x40; /* the type byte is covered by the CRC too */
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -EILSEQ);
    FRESH();
    f[7] ^= BT_FRAME_F_ERROR; /* a flipped flag that is still a known flag */
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -EILSEQ);
    FRESH();
    f[6] = BT_PRIO_BATCH; /* a flipped priority that is still in range */
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -EILSEQ);
    FRESH();
    f[sizeof golden - 1] ^= 0x01; /* payload byte */
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -EILSEQ);

    /* The documented order, for bytes that are wrong in several ways at once. */
    FRESH();
    f[0] = 0;
    f[4] = 9;
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -EBADMSG);
    FRESH();
    f[4] = 9;
    f[6] = 9;
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -EPROTONOSUPPORT);
    FRESH();
    f[6] = 9;
    put32(f + 8, UINT32_MAX);
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 0, &d), -ERANGE);
    FRESH();
    put32(f + 8, 100); /* too big for max 50 and also truncated */
    CHECK_EQ(bt_frame_decode(f, sizeof golden, 50, &d), -EMSGSIZE);
    FRESH();
    f[20] ^= 1; /* bad CRC but also truncated: "wait for more" wins */
    CHECK_EQ(bt_frame_decode(f, sizeof golden - 1, 0, &d), -ENODATA);
    CHECK_EQ(bt_frame_decode(f, 40, 0, &d), -ENODATA); /* garbage magic, too short to judge */
    f[0] = 0;
    CHECK_EQ(bt_frame_decode(f, 47, 0, &d), -ENODATA);
#undef FRESH
}

static void test_encode_errors(void)
{
    bt_frame_hdr h = golden_hdr();
    uint8_t buf[64];
    memset(buf, 0xAA, sizeof buf);
    /* cap too small by one byte, for the header and for the payload; nothing written. */
    CHECK_EQ(bt_frame_encode(buf, 47, &h, NULL, 0), -ENOBUFS);
    CHECK_EQ(bt_frame_encode(buf, 0, &h, NULL, 0), -ENOBUFS);
    CHECK_EQ(bt_frame_encode(NULL, 0, &h, NULL, 0), -ENOBUFS);
    CHECK_EQ(bt_frame_encode(buf, sizeof golden - 1, &h, "hi!", 3), -ENOBUFS);
    CHECK_EQ(buf[0], 0xAA);
    CHECK_EQ(bt_frame_encode(buf, 48, &h, NULL, 0), 48);

    uint8_t small[8] = {0};
    CHECK_EQ(bt_frame_encode(buf, sizeof buf, &h, small, (size_t)BT_FRAME_MAX_PAYLOAD_LIMIT + 1), -EMSGSIZE);
    h.priority = BT_PRIO_COUNT;
    CHECK_EQ(bt_frame_encode(buf, sizeof buf, &h, NULL, 0), -ERANGE);
    h = golden_hdr();
    h.flags = 0x08;
    CHECK_EQ(bt_frame_encode(buf, sizeof buf, &h, NULL, 0), -ERANGE);
    h = golden_hdr();
    CHECK_EQ(bt_frame_encode(buf, sizeof buf, NULL, NULL, 0), -EINVAL);
    CHECK_EQ(bt_frame_encode(buf, sizeof buf, &h, NULL, 3), -EINVAL);
    CHECK_EQ(bt_frame_encode(NULL, 10, &h, NULL, 0), -EINVAL);
}

int main(void)
{
    CHECK(strcmp(bt_version(), BT_VERSION_STRING) == 0);
    test_crc_vectors();
    test_crc_hw_vs_table();
    test_golden();
    test_round_trip();
    test_prefixes();
    test_decode_errors();
    test_encode_errors();
    printf("test_frame: ok (crc32c %s)\n", bti_crc32c_hw_available() ? "sse4.2" : "table");
    return 0;
}
