/*
 * libFuzzer harness for the shared-memory ring.  The first input byte picks the mode:
 *
 *   even: SEGMENT -- the rest of the input is a whole segment (512-byte header, then a 4 KiB data area;
 *         short inputs are zero-filled).  Bit 1 of the mode byte repairs magic/version/hdr_size/capacity so
 *         the fuzzer spends its time in the record decoder rather than on the first header check; bits 2-3
 *         pick the seals.  We attach as consumer and read everything we can with read_batch, peek/consume
 *         and a zero-timeout wait, and as producer (which walks committed-but-unpublished records).  Nothing
 *         may crash or read outside the mapping (ASan), hang, or hand out a length above max_record.
 *   odd:  OPS -- the rest drives a sequence of writes and reads through a real producer/consumer pair; every
 *         record read back must be the one written, byte for byte, in order, and an empty ring must accept
 *         any record up to max_record.
 */
#include "baton.h"
#include "test_ring_util.h"

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define CAP 4096u
#define SEG (BT_RING_HDR_SIZE + CAP)

#define FUZZ_CHECK(x)                                                                       \
    do {                                                                                    \
        if (!(x)) {                                                                         \
            fprintf(stderr, "%s:%d: FUZZ_CHECK failed: %s\n", __FILE__, __LINE__, #x);      \
            abort();                                                                        \
        }                                                                                   \
    } while (0)

static uint8_t g_buf[2 * CAP];
static uint32_t g_lens[64];

static void drain_consumer(bt_ring *c, uint64_t salt)
{
    for (int k = 0; k < 64; k++) {
        int n;
        salt = tr_mix(salt);
        switch (salt % 4) {
        case 0:
            n = bt_ring_read_batch(c, g_buf, (size_t)(salt >> 8) % sizeof(g_buf), g_lens, 1 + (int)((salt >> 24) % 64));
            if (n > 0)
                for (int i = 0; i < n; i++)
                    FUZZ_CHECK(g_lens[i] <= c->max_record);
            break;
        case 1: {
            const void *d;
            n = bt_ring_peek(c, &d);
            if (n >= 0) {
                const uint8_t *p = d;
                FUZZ_CHECK(n <= (int)c->max_record);
                FUZZ_CHECK(p >= c->data && p + n <= c->data + CAP);
                /* Touch every byte so ASan sees any stray pointer. */
                volatile uint8_t sum = 0;
                for (int i = 0; i < n; i++)
                    sum ^= p[i];
                (void)sum;
                bt_ring_consume(c, (uint32_t)n);
                bt_ring_release(c);
            }
            break;
        }
        case 2:
            n = bt_ring_wait(c, 0);
            if (n > 0)
                n = 0; /* a record is ready: read it on the next turn */
            break;
        default:
            n = bt_ring_read_wait(c, g_buf, sizeof(g_buf), g_lens, 64, 0);
            break;
        }
        if (n == -EPROTO || n == -EAGAIN || n == -EPIPE || n == -ETIMEDOUT)
            return;
        FUZZ_CHECK(n >= 0 || n == -ENOBUFS);
    }
}

static void fuzz_segment(uint8_t mode, const uint8_t *in, size_t len)
{
    uint8_t *seg = calloc(1, SEG);
    FUZZ_CHECK(seg);
    memcpy(seg, in, len < SEG ? len : SEG);
    if (mode & 2) {
        bt_ring_shm *h = (bt_ring_shm *)(void *)seg;
        h->magic = BT_RING_MAGIC;
        h->version = BT_RING_VERSION;
        h->hdr_size = BT_RING_HDR_SIZE;
        h->capacity = CAP;
        /* Our own pid: the liveness probe then looks at a real, live process and never at a stranger. */
        h->producer_pid = (int32_t)getpid();
    }
    static const int seal_sets[4] = {
        F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL,
        F_SEAL_SHRINK | F_SEAL_GROW,
        F_SEAL_SHRINK,
        0,
    };
    int seals = seal_sets[(mode >> 2) & 3];
    /* A few sizes other than the right one, so the size checks meet odd values too. */
    static const size_t sizes[4] = {SEG, SEG, SEG - 8, BT_RING_HDR_SIZE + 2 * CAP};
    size_t size = sizes[(mode >> 4) & 3];
    int fd = memfd_create("fuzz-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    FUZZ_CHECK(fd >= 0);
    FUZZ_CHECK(ftruncate(fd, (off_t)size) == 0);
    FUZZ_CHECK(pwrite(fd, seg, size < SEG ? size : SEG, 0) == (ssize_t)(size < SEG ? size : SEG));
    if (seals)
        FUZZ_CHECK(fcntl(fd, F_ADD_SEALS, seals) == 0);
    free(seg);

    bt_ring *c = NULL;
    int rc = bt_ring_attach(fd, BT_RING_CONSUMER, &c);
    if (rc == 0) {
        bt_ring_set_spin(c, 0);
        FUZZ_CHECK(c->capacity == CAP && c->max_record >= 1 && c->max_record <= CAP / 4);
        drain_consumer(c, mode);
        bt_ring_close(c);
    } else {
        FUZZ_CHECK(rc == -EPERM || rc == -EPROTO || rc == -EPROTONOSUPPORT);
        FUZZ_CHECK(!(mode & 2) || seals != (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) || size != SEG ||
                   rc == -EPROTO); /* a repaired header fails on max_record or indices, if at all */
    }
    bt_ring *p = NULL;
    rc = bt_ring_attach(fd, BT_RING_PRODUCER, &p);
    if (rc == 0) {
        /* The producer starts where the committed records end: the size word there is 0 (or the ring
         * would have been refused). */
        uint32_t w = *(const uint32_t *)(const void *)(p->data + (p->pos & p->mask));
        FUZZ_CHECK(w == 0);
        uint8_t rec[64] = {0};
        int wr = bt_ring_write(p, rec, sizeof(rec));
        FUZZ_CHECK(wr == 0 || wr == -ENOSPC || wr == -EPROTO || wr == -EMSGSIZE);
        bt_ring_close(p);
    }
    close(fd);
}

/* A model of what is in flight: (seq) of each record written and not yet read. */
#define MAXQ 1024
typedef struct model {
    uint64_t q[MAXQ];
    uint32_t lo, hi; /* q[lo..hi) in flight, indices mod MAXQ */
    uint64_t next_seq;
} model;

/* Mostly small records (more laps and PADs per input, cheaper checks), every 8th up to max. */
static uint32_t op_len(uint64_t seq, uint32_t max)
{
    uint64_t x = tr_mix(seq * 31 + 7);
    return (uint32_t)(x % ((seq % 8 == 0 ? max : max / 8) + 1));
}

static void check_read(model *m, const uint8_t *p, uint32_t n)
{
    FUZZ_CHECK(m->lo != m->hi);
    uint64_t seq = m->q[m->lo % MAXQ];
    m->lo++;
    FUZZ_CHECK(n == op_len(seq, 1024));
    FUZZ_CHECK(tr_check(p, n, seq));
}

static void fuzz_ops(const uint8_t *in, size_t len)
{
    bt_ring *p, *c;
    FUZZ_CHECK(bt_ring_create(CAP, BT_RING_PRODUCER, 1, &p) == 0);
    FUZZ_CHECK(bt_ring_attach(bt_ring_fd(p), BT_RING_CONSUMER, &c) == 0);
    bt_ring_set_spin(c, 0);
    model m = {.lo = 0, .hi = 0, .next_seq = 0};
    static uint8_t tmp[64 * 1024];
    for (size_t i = 0; i < len; i++) {
        uint8_t op = in[i];
        uint32_t arg = i + 1 < len ? in[i + 1] : 0;
        int empty = m.lo == m.hi && c->pos == c->published && p->pos == c->pos;
        switch (op % 6) {
        case 0: { /* single write */
            uint64_t seq = m.next_seq;
            uint32_t l = op_len(seq, 1024);
            tr_fill(tmp, l, seq);
            int rc = bt_ring_write(p, tmp, l);
            if (rc == 0) {
                FUZZ_CHECK(m.hi - m.lo < MAXQ);
                m.q[m.hi++ % MAXQ] = seq;
                m.next_seq++;
            } else {
                FUZZ_CHECK(rc == -ENOSPC && !empty);
            }
            break;
        }
        case 1: { /* batch write of 1..16 */
            uint32_t k = 1 + (op >> 3) % 16, off = 0;
            uint32_t lens[16];
            for (uint32_t j = 0; j < k; j++) {
                lens[j] = op_len(m.next_seq + j, 1024);
                tr_fill(tmp + off, lens[j], m.next_seq + j);
                off += lens[j];
            }
            int rc = bt_ring_write_batch(p, tmp, lens, (int)k);
            FUZZ_CHECK(rc > 0 || (rc == -ENOSPC && !empty));
            for (int j = 0; j < rc; j++) {
                FUZZ_CHECK(m.hi - m.lo < MAXQ);
                m.q[m.hi++ % MAXQ] = m.next_seq++;
            }
            break;
        }
        case 2: { /* reserve + commit, publish only sometimes */
            uint64_t seq = m.next_seq;
            uint32_t l = op_len(seq, 1024);
            void *d = bt_ring_reserve(p, l);
            if (d) {
                tr_fill(d, l, seq);
                bt_ring_commit(p);
                m.q[m.hi++ % MAXQ] = seq;
                m.next_seq++;
            } else {
                FUZZ_CHECK(!empty);
            }
            if (op & 8)
                bt_ring_publish(p);
            break;
        }
        case 3: { /* read_batch with a cap from the input */
            size_t cap = (size_t)arg * 16;
            int n = bt_ring_read_batch(c, tmp, cap, g_lens, 1 + (op >> 3) % 32);
            if (n > 0) {
                size_t o = 0;
                for (int j = 0; j < n; j++) {
                    check_read(&m, tmp + o, g_lens[j]);
                    o += g_lens[j];
                }
                FUZZ_CHECK(o <= cap);
            } else if (n == -EAGAIN) {
                FUZZ_CHECK(m.lo == m.hi);
            } else {
                FUZZ_CHECK(n == -ENOBUFS && m.lo != m.hi && op_len(m.q[m.lo % MAXQ], 1024) > cap);
            }
            i++;
            break;
        }
        case 4: { /* peek/consume, release only sometimes */
            const void *d;
            int n = bt_ring_peek(c, &d);
            if (n >= 0) {
                check_read(&m, d, (uint32_t)n);
                bt_ring_consume(c, (uint32_t)n);
            } else {
                FUZZ_CHECK(n == -EAGAIN && m.lo == m.hi);
            }
            if (op & 8)
                bt_ring_release(c);
            break;
        }
        default: { /* wait, zero timeout */
            int n = bt_ring_wait(c, 0);
            FUZZ_CHECK(n == (m.lo != m.hi ? 1 : -ETIMEDOUT));
            break;
        }
        }
    }
    /* Everything still in flight comes out intact, then -EPIPE after close. */
    bt_ring_close(p);
    for (;;) {
        int n = bt_ring_read_wait(c, tmp, sizeof(tmp), g_lens, 64, 0);
        if (n < 0) {
            FUZZ_CHECK(n == -EPIPE);
            break;
        }
        size_t o = 0;
        for (int j = 0; j < n; j++) {
            check_read(&m, tmp + o, g_lens[j]);
            o += g_lens[j];
        }
    }
    FUZZ_CHECK(m.lo == m.hi);
    bt_ring_close(c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    if (data[0] & 1)
        fuzz_ops(data + 1, size - 1);
    else
        fuzz_segment(data[0], data + 1, size - 1);
    return 0;
}
