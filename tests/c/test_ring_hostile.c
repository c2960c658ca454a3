/*
 * Shared-memory ring against a peer that lies: attach validation (seals, size, magic, version, capacity,
 * max_record, indices), a producer writing garbage size words and kinds (the consumer gets -EPROTO, never a
 * crash, a hang or a read outside the segment; run under ASan by `make check-c-asan`), and a consumer
 * publishing an impossible head (the producer gets -EPROTO).
 */
#include "baton.h"
#include "bt_test.h"
#include "test_ring_util.h"

#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

/* A copy of a valid header, taken from a real ring, for segments built by hand. */
static bt_ring_shm g_hdr;

static void take_header(void)
{
    bt_ring *r;
    CHECK_EQ(bt_ring_create(4096, BT_RING_PRODUCER, 3, &r), 0);
    memcpy(&g_hdr, r->shm, sizeof(g_hdr));
    bt_ring_close(r);
}

/* A memfd of `size` bytes starting with *hdr, sealed with `seals` (0: not sealed at all). */
static int make_segment(const bt_ring_shm *hdr, size_t size, int seals)
{
    int fd = memfd_create("test-ring", MFD_CLOEXEC | (seals ? MFD_ALLOW_SEALING : 0));
    CHECK(fd >= 0);
    CHECK_EQ(ftruncate(fd, (off_t)size), 0);
    size_t n = size < sizeof(*hdr) ? size : sizeof(*hdr);
    CHECK_EQ(pwrite(fd, hdr, n, 0), (ssize_t)n);
    if (seals)
        CHECK_EQ(fcntl(fd, F_ADD_SEALS, seals), 0);
    return fd;
}

static int attach_result(const bt_ring_shm *hdr, size_t size, int seals, int role)
{
    int fd = make_segment(hdr, size, seals);
    bt_ring *r = NULL;
    int rc = bt_ring_attach(fd, role, &r);
    if (rc == 0) {
        CHECK(r != NULL);
        bt_ring_close(r);
    } else {
        CHECK(r == NULL);
    }
    close(fd);
    return rc;
}

/* The reference header with one field, or with head and tail, changed: attaching a sealed segment of SIZE
 * bytes gives `want`.  Macros, so that a failure reports the line of the case. */
#define CHECK_FIELD(field, value, want)                                                    \
    do {                                                                                   \
        bt_ring_shm h_ = g_hdr;                                                            \
        h_.field = (value);                                                                \
        CHECK_EQ(attach_result(&h_, SIZE, SEALED, BT_RING_CONSUMER), want);                \
    } while (0)
#define CHECK_INDICES(head_, tail_, role, want)                                            \
    do {                                                                                   \
        bt_ring_shm h_ = g_hdr;                                                            \
        h_.head = (head_);                                                                 \
        h_.tail = (tail_);                                                                 \
        CHECK_EQ(attach_result(&h_, SIZE, SEALED, role), want);                            \
    } while (0)

static void test_attach_validation(void)
{
    const int SEALED = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
    const size_t SIZE = BT_RING_HDR_SIZE + 4096;
    /* The reference segment attaches, from either end. */
    CHECK_EQ(attach_result(&g_hdr, SIZE, SEALED, BT_RING_CONSUMER), 0);
    CHECK_EQ(attach_result(&g_hdr, SIZE, F_SEAL_SHRINK | F_SEAL_GROW, BT_RING_PRODUCER), 0);
    /* Seals: none at all, sealing allowed but not done, only one of the two. */
    CHECK_EQ(attach_result(&g_hdr, SIZE, 0, BT_RING_CONSUMER), -EPERM);
    CHECK_EQ(attach_result(&g_hdr, SIZE, F_SEAL_SEAL, BT_RING_CONSUMER), -EPERM);
    CHECK_EQ(attach_result(&g_hdr, SIZE, F_SEAL_SHRINK, BT_RING_CONSUMER), -EPERM);
    CHECK_EQ(attach_result(&g_hdr, SIZE, F_SEAL_GROW, BT_RING_CONSUMER), -EPERM);
    /* Not a memfd at all (a pipe): cannot be sealed. */
    int pfd[2];
    CHECK_EQ(pipe(pfd), 0);
    bt_ring *r = NULL;
    CHECK_EQ(bt_ring_attach(pfd[0], BT_RING_CONSUMER, &r), -EPERM);
    close(pfd[0]);
    close(pfd[1]);
    /* Sizes: shorter than a header, not header + power of two, a smaller power of two than the header
     * says, a larger one. */
    CHECK_EQ(attach_result(&g_hdr, 100, SEALED, BT_RING_CONSUMER), -EPROTO);
    CHECK_EQ(attach_result(&g_hdr, BT_RING_HDR_SIZE, SEALED, BT_RING_CONSUMER), -EPROTO);
    CHECK_EQ(attach_result(&g_hdr, SIZE + 8, SEALED, BT_RING_CONSUMER), -EPROTO);
    CHECK_EQ(attach_result(&g_hdr, SIZE - 8, SEALED, BT_RING_CONSUMER), -EPROTO);
    CHECK_EQ(attach_result(&g_hdr, BT_RING_HDR_SIZE + 2048, SEALED, BT_RING_CONSUMER), -EPROTO);
    CHECK_EQ(attach_result(&g_hdr, BT_RING_HDR_SIZE + 8192, SEALED, BT_RING_CONSUMER), -EPROTO);
    /* Header fields, one at a time. */
    CHECK_FIELD(magic, g_hdr.magic ^ 1, -EPROTO);
    CHECK_FIELD(version, 2, -EPROTONOSUPPORT);
    CHECK_FIELD(hdr_size, 256, -EPROTO);
    CHECK_FIELD(capacity, 3000, -EPROTO);
    CHECK_FIELD(capacity, 0, -EPROTO);
    CHECK_FIELD(capacity, 8192, -EPROTO); /* a power of two, but not the size of the segment */
    CHECK_FIELD(max_record, 0, -EPROTO);
    CHECK_FIELD(max_record, 4096 / 4 + 1, -EPROTO);
    CHECK_FIELD(max_record, 100, 0); /* smaller than usual is fine: the reader just enforces it */
    /* Indices. */
    CHECK_INDICES(64, 32, BT_RING_CONSUMER, -EPROTO);
    CHECK_INDICES(8, 8 + 4096 + 8, BT_RING_CONSUMER, -EPROTO);
    CHECK_INDICES(4, 4, BT_RING_CONSUMER, -EPROTO);
    CHECK_INDICES(1ull << 40, 1ull << 40, BT_RING_PRODUCER, 0); /* far along, but consistent: fine */
}

/* A consumer attached to a segment whose data area we then scribble on as the "producer". */
typedef struct hostile {
    bt_ring *owner; /* created as producer: we write through its mapping by hand */
    bt_ring *c;
    uint32_t *w;    /* the data area as u32 words */
} hostile;

static void hostile_open(hostile *h, uint64_t cap)
{
    CHECK_EQ(bt_ring_create(cap, BT_RING_PRODUCER, 0, &h->owner), 0);
    CHECK_EQ(bt_ring_attach(bt_ring_fd(h->owner), BT_RING_CONSUMER, &h->c), 0);
    h->w = (uint32_t *)(void *)h->owner->data;
    bt_ring_set_spin(h->c, 1000);
}

static void hostile_close(hostile *h)
{
    bt_ring_close(h->c);
    bt_ring_close(h->owner);
}

/* Every consumer entry point gives `want` on the current garbage (and keeps giving it). */
static void expect_all(hostile *h, int want)
{
    static uint8_t buf[8192];
    uint32_t lens[16];
    const void *d;
    CHECK_EQ(bt_ring_peek(h->c, &d), want);
    CHECK_EQ(bt_ring_read_batch(h->c, buf, sizeof(buf), lens, 16), want);
    CHECK_EQ(bt_ring_wait(h->c, 1000000), want);
    CHECK_EQ(bt_ring_read_wait(h->c, buf, sizeof(buf), lens, 16, 1000000), want);
}

static void test_hostile_producer(void)
{
    hostile h;
    hostile_open(&h, 4096);
    /* Size word below the record header. */
    h.w[1] = BT_RING_KIND_DATA;
    for (uint32_t s = 1; s < 8; s++) {
        __atomic_store_n(&h.w[0], s, __ATOMIC_RELEASE);
        expect_all(&h, -EPROTO);
    }
    /* Past the end of the data area, and huge. */
    __atomic_store_n(&h.w[0], 4096 + 8, __ATOMIC_RELEASE);
    expect_all(&h, -EPROTO);
    __atomic_store_n(&h.w[0], 0xFFFFFFFFu, __ATOMIC_RELEASE);
    expect_all(&h, -EPROTO);
    /* Within the area but above max_record. */
    __atomic_store_n(&h.w[0], 8 + 1025, __ATOMIC_RELEASE);
    expect_all(&h, -EPROTO);
    /* Unknown kinds. */
    __atomic_store_n(&h.w[0], 16, __ATOMIC_RELEASE);
    for (uint32_t k = 0; k < 8; k++) {
        if (k == BT_RING_KIND_DATA || k == BT_RING_KIND_PAD)
            continue;
        h.w[1] = k;
        expect_all(&h, -EPROTO);
    }
    h.w[1] = 0xFFFFFFFFu;
    expect_all(&h, -EPROTO);
    /* A PAD covering the whole area, from offset 0: would send the PAD loop round for ever. */
    h.w[1] = BT_RING_KIND_PAD;
    __atomic_store_n(&h.w[0], 4096, __ATOMIC_RELEASE);
    alarm(20); /* a hang is a failure, not a stuck CI job */
    expect_all(&h, -EPROTO);
    /* A PAD that does not end at the end of the area. */
    __atomic_store_n(&h.w[0], 64, __ATOMIC_RELEASE);
    expect_all(&h, -EPROTO);
    /* A valid record first, so the consumer is mid-area, then garbage behind it. */
    h.w[1] = BT_RING_KIND_DATA;
    h.w[4] = 0; /* successor zeroed, as the protocol says */
    __atomic_store_n(&h.w[0], 16, __ATOMIC_RELEASE);
    static uint8_t buf[8192];
    uint32_t lens[16];
    CHECK_EQ(bt_ring_read_batch(h.c, buf, sizeof(buf), lens, 16), 1);
    CHECK_EQ(lens[0], 8);
    CHECK_EQ(h.c->pos, 16);
    h.w[5] = BT_RING_KIND_PAD;
    __atomic_store_n(&h.w[4], 4096 - 16 + 8, __ATOMIC_RELEASE); /* PAD overshooting the end */
    expect_all(&h, -EPROTO);
    /* A record followed by garbage: the record is delivered, the garbage reported by the next call. */
    h.w[5] = BT_RING_KIND_DATA;
    h.w[8] = 3; /* garbage size word where the next record would be */
    __atomic_store_n(&h.w[4], 16, __ATOMIC_RELEASE);
    CHECK_EQ(bt_ring_read_batch(h.c, buf, sizeof(buf), lens, 16), 1);
    expect_all(&h, -EPROTO);
    hostile_close(&h);
    alarm(0);
}

/* Random garbage and random plausible-looking records: whatever the consumer returns, it never crashes or
 * reads outside the segment (ASan), never hangs, and every length it reports is in bounds. */
static void test_hostile_random(void)
{
    static uint8_t buf[8192];
    uint32_t lens[32];
    uint64_t s = 12345, delivered = 0, eproto = 0;
    alarm(60);
    for (int round = 0; round < 3000; round++) {
        hostile h;
        hostile_open(&h, 4096);
        bt_ring_set_spin(h.c, 0);
        /* Start the consumer somewhere in the area; before it, pure garbage words; from it, a run of
         * plausible records with a few percent of them corrupted (bad size, bad kind, PAD that does not
         * end at the end), so the decoder walks some way before it meets the lie. */
        uint32_t start = (uint32_t)(tr_mix((uint64_t)round) % 512) * 8;
        h.c->pos = start;
        for (uint32_t i = 0; i < start / 4; i++) {
            s = tr_mix(s);
            h.w[i] = (s & 1) ? (uint32_t)(s >> 32) : (uint32_t)(s >> 40) % 64;
        }
        uint32_t off = start;
        while (off < 4096) {
            s = tr_mix(s);
            uint32_t room = 4096 - off, size = 8 + (uint32_t)((s >> 8) % 200), kind = BT_RING_KIND_DATA;
            uint32_t dice = (uint32_t)(s % 100);
            if (dice < 2)
                size = (uint32_t)(s >> 32);
            else if (dice < 4)
                kind = (uint32_t)(s >> 16) & 7;
            else if (dice < 6)
                size = (uint32_t)(s >> 24) % 16;
            else if (dice < 8 || size + 8 > room) {
                kind = BT_RING_KIND_PAD;
                size = (dice % 5 == 0) ? room - 8 : room;
            }
            h.w[off / 4] = size;
            h.w[off / 4 + 1] = kind;
            for (uint32_t j = off / 4 + 2; j < 1024 && j < (off + size) / 4; j++)
                h.w[j] = (uint32_t)tr_mix(j);
            if (size < 8 || kind == BT_RING_KIND_PAD || size > room)
                break;
            off += (size + 7) & ~7u;
        }
        if (off < 4096 && round % 2)
            h.w[off / 4] = 0; /* sometimes a clean end: -EAGAIN instead of -EPROTO */
        for (int k = 0; k < 200; k++) {
            int n;
            switch (k % 3) {
            case 0: n = bt_ring_read_batch(h.c, buf, sizeof(buf), lens, 32); break;
            case 1: n = bt_ring_read_wait(h.c, buf, (size_t)(tr_mix(k) % 2048), lens, 32, 0); break;
            default: {
                const void *d;
                n = bt_ring_peek(h.c, &d);
                if (n >= 0) {
                    const uint8_t *dp = d;
                    CHECK(dp >= h.c->data && dp + n <= h.c->data + 4096);
                    CHECK(n <= 1024);
                    bt_ring_consume(h.c, (uint32_t)n);
                    n = 1;
                }
            }
            }
            if (n > 0) {
                delivered += (uint64_t)n;
                for (int i = 0; i < n && k % 3 == 0; i++)
                    CHECK(lens[i] <= 1024);
                continue;
            }
            CHECK(n == -EPROTO || n == -EAGAIN || n == -ETIMEDOUT || n == -ENOBUFS);
            if (n == -EPROTO || n == -EAGAIN) {
                eproto += n == -EPROTO;
                break;
            }
        }
        hostile_close(&h);
    }
    alarm(0);
    /* The garbage exercised the decoder: some records were accepted before it gave up, mostly on -EPROTO. */
    printf("hostile random: %llu records delivered, %llu rounds ended in -EPROTO\n", (unsigned long long)delivered,
           (unsigned long long)eproto);
    CHECK(delivered > 10000 && eproto > 1000);
}

/* The consumer's head is the producer's only input from the other side: impossible values are -EPROTO. */
static void test_hostile_consumer(void)
{
    bt_ring *p, *c;
    CHECK_EQ(bt_ring_create(4096, BT_RING_PRODUCER, 0, &p), 0);
    CHECK_EQ(bt_ring_attach(bt_ring_fd(p), BT_RING_CONSUMER, &c), 0);
    uint8_t buf[512] = {0};
    /* Fill the ring so the next write has to look at head. */
    while (bt_ring_write(p, buf, 500) == 0) {
    }
    __atomic_store_n(&c->shm->head, p->pos + 8, __ATOMIC_RELEASE); /* beyond what was written */
    CHECK_EQ(bt_ring_write(p, buf, 500), -EPROTO);
    uint32_t l = 500;
    CHECK_EQ(bt_ring_write_batch(p, buf, &l, 1), -EPROTO);
    CHECK(bt_ring_reserve(p, 500) == NULL);
    __atomic_store_n(&c->shm->head, 0, __ATOMIC_RELEASE);
    p->pos += 8192; /* now head is more than a lap behind */
    p->peer = 0;
    CHECK_EQ(bt_ring_write(p, buf, 500), -EPROTO);
    p->pos -= 8192;
    /* A sane head again: writing works again (the producer holds no sticky state). */
    __atomic_store_n(&c->shm->head, p->pos, __ATOMIC_RELEASE);
    CHECK_EQ(bt_ring_write(p, buf, 500), 0);
    bt_ring_close(c);
    bt_ring_close(p);
}

int main(void)
{
    take_header();
    test_attach_validation();
    test_hostile_producer();
    test_hostile_consumer();
    test_hostile_random();
    printf("test_ring_hostile: ok\n");
    return 0;
}
