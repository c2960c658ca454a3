/*
 * Shared-memory ring, one process: both ends attached to the same segment (two mappings of one memfd, as
 * between two processes).  Wrap-around and PAD records over many laps with random sizes and every byte
 * checked; full ring; too-big records; a too-small read buffer; close then -EPIPE; wait time-out; argument
 * errors.  The two-process cases are in test_ring_fork.c, attach validation and hostile peers in
 * test_ring_hostile.c.
 */
#include "baton.h"
#include "bt_test.h"
#include "test_ring_util.h"

#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

static void open_pair(uint64_t cap, bt_ring **prod, bt_ring **cons)
{
    CHECK_EQ(bt_ring_create(cap, BT_RING_PRODUCER, 42, prod), 0);
    CHECK(bt_ring_fd(*prod) >= 0);
    CHECK_EQ(bt_ring_attach(bt_ring_fd(*prod), BT_RING_CONSUMER, cons), 0);
}

/* Many laps through a small ring with random record sizes, random batch sizes on both sides, both the
 * inline reserve/commit/peek/consume API and the copying batch API.  Every byte is checked. */
static void test_laps(void)
{
    bt_ring *p, *c;
    open_pair(4096, &p, &c);
    CHECK_EQ(p->max_record, 1024);
    uint64_t wseq = 0, rseq = 0, pads = 0, rng = 7;
    static uint8_t buf[64 * 1024];
    uint32_t lens[64];
    const uint64_t total = 200000; /* ~100 bytes each: ~5000 laps of a 4 KiB ring */
    while (rseq < total) {
        /* Produce a random number of records, alternating the two producer APIs. */
        rng = tr_mix(rng);
        int burst = 1 + (int)(rng % 24);
        for (int i = 0; i < burst && wseq < total; i++) {
            uint32_t len = tr_len(wseq, 0, (wseq % 97 == 0) ? 1024 : 200);
            uint64_t before = p->pos;
            if (rng & 1) {
                void *dst = bt_ring_reserve(p, len);
                if (!dst)
                    break;
                tr_fill(dst, len, wseq);
                bt_ring_commit(p);
            } else {
                uint8_t tmp[1024];
                tr_fill(tmp, len, wseq);
                int rc = bt_ring_write(p, tmp, len);
                if (rc == -ENOSPC)
                    break;
                CHECK_EQ(rc, 0);
            }
            /* The position moved by more than the record's stride: a PAD filled the end of the area. */
            if (p->pos - before != bti_ring_stride(BT_RING_REC_HDR + len))
                pads++;
            wseq++;
        }
        bt_ring_publish(p);
        /* Consume a random number of records. */
        rng = tr_mix(rng);
        int want = 1 + (int)(rng % 32);
        if (rng & 2) {
            for (int i = 0; i < want; i++) {
                const void *d;
                int n = bt_ring_peek(c, &d);
                if (n == -EAGAIN)
                    break;
                CHECK(n >= 0);
                CHECK_EQ(n, tr_len(rseq, 0, (rseq % 97 == 0) ? 1024 : 200));
                CHECK(tr_check(d, (uint32_t)n, rseq));
                bt_ring_consume(c, (uint32_t)n);
                rseq++;
            }
            bt_ring_release(c);
        } else {
            int n = bt_ring_read_batch(c, buf, sizeof(buf), lens, want > 64 ? 64 : want);
            if (n == -EAGAIN)
                continue;
            CHECK(n > 0);
            size_t off = 0;
            for (int i = 0; i < n; i++) {
                CHECK_EQ(lens[i], tr_len(rseq, 0, (rseq % 97 == 0) ? 1024 : 200));
                CHECK(tr_check(buf + off, lens[i], rseq));
                off += lens[i];
                rseq++;
            }
        }
    }
    CHECK_EQ(rseq, wseq);
    CHECK(p->pos / 4096 > 1000); /* many laps */
    CHECK(pads > 500);           /* and many wraps that needed a PAD */
    CHECK_EQ(bt_ring_read_batch(c, buf, sizeof(buf), lens, 64), -EAGAIN);
    bt_ring_stats st;
    bt_ring_stats_get(c, &st);
    CHECK_EQ(st.used, 0);
    CHECK_EQ(st.generation, 42);
    CHECK_EQ(st.capacity, 4096);
    CHECK_EQ(st.role, BT_RING_CONSUMER);
    bt_ring_close(c);
    bt_ring_close(p);
}

/* A full ring answers -ENOSPC at once, counts it, and the 8 bytes of slack for the successor size word are
 * the only space that is never handed out. */
static void test_full(void)
{
    bt_ring *p, *c;
    open_pair(4096, &p, &c);
    uint8_t rec[8];
    int n = 0;
    for (;;) {
        tr_fill(rec, 8, (uint64_t)n);
        int rc = bt_ring_write(p, rec, 8);
        if (rc == -ENOSPC)
            break;
        CHECK_EQ(rc, 0);
        n++;
    }
    /* 16-byte strides; the last one needs 16 + 8 bytes, so 255 fit in 4096, not 256. */
    CHECK_EQ(n, 255);
    uint64_t t0 = bt_now_ns();
    CHECK_EQ(bt_ring_write(p, rec, 8), -ENOSPC);
    CHECK_EQ(bt_ring_write(p, rec, 1), -ENOSPC);
    CHECK(bt_ring_reserve(p, 1) == NULL);
    uint32_t lens1[1] = {8};
    CHECK_EQ(bt_ring_write_batch(p, rec, lens1, 1), -ENOSPC);
    CHECK(bt_now_ns() - t0 < 1000000000ull); /* "at once": never waits for the consumer */
    bt_ring_stats st;
    bt_ring_stats_get(p, &st);
    CHECK_EQ(st.full_events, 5);
    CHECK_EQ(st.used, 255 * 16);
    CHECK_EQ(st.role, BT_RING_PRODUCER);
    /* An empty record (stride 8) still fits: it leaves exactly the 8 bytes of slack. */
    CHECK_EQ(bt_ring_write(p, NULL, 0), 0);
    CHECK_EQ(p->pos - c->shm->head, 4096 - 8);
    CHECK_EQ(bt_ring_write(p, NULL, 0), -ENOSPC);
    /* Room again once the consumer releases enough: at offset 4088 an 8-byte record needs a PAD (8), its
     * stride (16) and the slack (8), so one released record (16) is not enough and two are. */
    uint8_t out[16];
    uint32_t lens[2];
    CHECK_EQ(bt_ring_read_batch(c, out, sizeof(out), lens, 1), 1);
    CHECK(tr_check(out, 8, 0));
    CHECK_EQ(bt_ring_write(p, rec, 8), -ENOSPC);
    CHECK_EQ(bt_ring_read_batch(c, out, sizeof(out), lens, 1), 1);
    CHECK(tr_check(out, 8, 1));
    CHECK_EQ(bt_ring_write(p, rec, 8), 0);
    /* Everything left is intact and in order (the extra write reused rec of seq n). */
    for (int i = 2; i < 255; i++) {
        CHECK_EQ(bt_ring_read_batch(c, out, sizeof(out), lens, 1), 1);
        CHECK_EQ(lens[0], 8);
        CHECK(tr_check(out, 8, (uint64_t)i));
    }
    CHECK_EQ(bt_ring_read_batch(c, out, sizeof(out), lens, 1), 1);
    CHECK_EQ(lens[0], 0);
    CHECK_EQ(bt_ring_read_batch(c, out, sizeof(out), lens, 1), 1);
    CHECK(tr_check(out, 8, (uint64_t)n));
    CHECK_EQ(bt_ring_read_batch(c, out, sizeof(out), lens, 1), -EAGAIN);

    /* write_batch stops at the first record that does not fit and reports how many went in. */
    static uint8_t big[4096];
    uint32_t blens[8] = {1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000};
    int w = bt_ring_write_batch(p, big, blens, 8);
    CHECK(w >= 3 && w < 8);
    bt_ring_close(c);
    bt_ring_close(p);
}

static void test_sizes(void)
{
    bt_ring *p, *c;
    open_pair(8192, &p, &c);
    static uint8_t buf[4096];
    uint32_t lens[4];
    CHECK_EQ(p->max_record, 2048);
    CHECK_EQ(bt_ring_write(p, buf, 2049), -EMSGSIZE);
    CHECK(bt_ring_reserve(p, 2049) == NULL);
    uint32_t big[2] = {2049, 1};
    CHECK_EQ(bt_ring_write_batch(p, buf, big, 2), -EMSGSIZE);
    uint32_t mixed[3] = {1, 2049, 1};
    CHECK_EQ(bt_ring_write_batch(p, buf, mixed, 3), 1);
    CHECK_EQ(bt_ring_read_batch(c, buf, sizeof(buf), lens, 4), 1);
    /* The largest record goes in and comes out whole. */
    tr_fill(buf, 2048, 99);
    CHECK_EQ(bt_ring_write(p, buf, 2048), 0);
    memset(buf, 0, sizeof(buf));
    /* A buffer one byte short: -ENOBUFS and the record stays in the ring. */
    CHECK_EQ(bt_ring_read_batch(c, buf, 2047, lens, 4), -ENOBUFS);
    CHECK_EQ(bt_ring_read_batch(c, buf, 2047, lens, 4), -ENOBUFS);
    CHECK_EQ(bt_ring_read_batch(c, buf, 2048, lens, 4), 1);
    CHECK_EQ(lens[0], 2048);
    CHECK(tr_check(buf, 2048, 99));
    /* Two records, room for the first only: the first comes back, the second stays for the next call. */
    tr_fill(buf, 100, 1);
    CHECK_EQ(bt_ring_write(p, buf, 100), 0);
    tr_fill(buf, 100, 2);
    CHECK_EQ(bt_ring_write(p, buf, 100), 0);
    CHECK_EQ(bt_ring_read_batch(c, buf, 150, lens, 4), 1);
    CHECK(tr_check(buf, 100, 1));
    CHECK_EQ(bt_ring_read_batch(c, buf, 150, lens, 4), 1);
    CHECK(tr_check(buf, 100, 2));
    /* Zero-length records are records. */
    CHECK_EQ(bt_ring_write(p, NULL, 0), 0);
    CHECK_EQ(bt_ring_read_batch(c, NULL, 0, lens, 4), 1);
    CHECK_EQ(lens[0], 0);
    bt_ring_close(c);
    bt_ring_close(p);
}

static void test_close_wait(void)
{
    bt_ring *p, *c;
    open_pair(4096, &p, &c);
    uint8_t buf[64];
    uint32_t lens[8];
    /* Empty and open: the wait expires (spin 0 parks at once; the futex time-out ends it). */
    bt_ring_set_spin(c, 0);
    uint64_t t0 = bt_now_ns();
    CHECK_EQ(bt_ring_wait(c, 2000000), -ETIMEDOUT);
    uint64_t el = bt_now_ns() - t0;
    CHECK(el >= 2000000 && el < 2000000000ull);
    CHECK_EQ(bt_ring_wait(c, 0), -ETIMEDOUT);
    bt_ring_set_spin(c, 20000);
    CHECK_EQ(bt_ring_read_wait(c, buf, sizeof(buf), lens, 8, 1000000), -ETIMEDOUT);
    CHECK_EQ(c->shm->waiters, 0); /* never left set after a wait */
    for (uint64_t i = 0; i < 3; i++) {
        tr_fill(buf, 20, i);
        CHECK_EQ(bt_ring_write(p, buf, 20), 0);
    }
    bt_ring_close(p);
    /* Closed but not drained: the records still come out, then -EPIPE, and it stays -EPIPE. */
    CHECK_EQ(bt_ring_wait(c, UINT64_MAX), 1);
    CHECK_EQ(bt_ring_read_wait(c, buf, sizeof(buf), lens, 2, UINT64_MAX), 2);
    CHECK(tr_check(buf, 20, 0) && tr_check(buf + 20, 20, 1));
    CHECK_EQ(bt_ring_read_wait(c, buf, sizeof(buf), lens, 8, UINT64_MAX), 1);
    CHECK(tr_check(buf, 20, 2));
    CHECK_EQ(bt_ring_wait(c, UINT64_MAX), -EPIPE);
    /* However long the spin budget, a closed ring ends the spin. */
    bt_ring_set_spin(c, 3600ull * 1000000000ull);
    t0 = bt_now_ns();
    CHECK_EQ(bt_ring_wait(c, 30ull * 1000000000ull), -EPIPE);
    CHECK(bt_now_ns() - t0 < 5000000000ull);
    CHECK_EQ(bt_ring_read_wait(c, buf, sizeof(buf), lens, 8, 0), -EPIPE);
    CHECK_EQ(bt_ring_read_batch(c, buf, sizeof(buf), lens, 8), -EAGAIN);
    bt_ring_close(c);
}

/* A ring created by its consumer: the producer attaches (and records its pid there). */
static void test_consumer_creates(void)
{
    bt_ring *p, *c;
    CHECK_EQ(bt_ring_create(1u << 16, BT_RING_CONSUMER, 7, &c), 0);
    CHECK_EQ(c->shm->producer_pid, 0);
    CHECK_EQ(bt_ring_attach(bt_ring_fd(c), BT_RING_PRODUCER, &p), 0);
    CHECK_EQ(p->shm->producer_pid, getpid());
    CHECK_EQ(bt_ring_fd(p), -EBADF); /* attached handles do not own the fd */
    uint8_t buf[256];
    uint32_t lens[4];
    tr_fill(buf, 200, 5);
    CHECK_EQ(bt_ring_write(p, buf, 200), 0);
    memset(buf, 0, sizeof(buf));
    CHECK_EQ(bt_ring_read_wait(c, buf, sizeof(buf), lens, 4, 1000000000ull), 1);
    CHECK(tr_check(buf, 200, 5));
    /* A second producer handle taking over continues after what the first committed but never
     * published, instead of overwriting it. */
    tr_fill(buf, 30, 6);
    void *dst = bt_ring_reserve(p, 30);
    CHECK(dst);
    memcpy(dst, buf, 30);
    bt_ring_commit(p); /* committed, not published */
    bt_ring *p2;
    CHECK_EQ(bt_ring_attach(bt_ring_fd(c), BT_RING_PRODUCER, &p2), 0);
    CHECK_EQ(p2->pos, p->pos);
    tr_fill(buf, 40, 7);
    CHECK_EQ(bt_ring_write(p2, buf, 40), 0);
    CHECK_EQ(bt_ring_read_batch(c, buf, sizeof(buf), lens, 4), 2);
    CHECK(tr_check(buf, 30, 6) && tr_check(buf + 30, 40, 7));
    bt_ring_close(p2);
    bt_ring_close(p);
    bt_ring_close(c);
}

static void test_args(void)
{
    bt_ring *r = NULL;
    CHECK_EQ(bt_ring_create(4096 + 8, BT_RING_PRODUCER, 0, &r), -EINVAL);
    CHECK_EQ(bt_ring_create(2048, BT_RING_PRODUCER, 0, &r), -EINVAL);
    CHECK_EQ(bt_ring_create((uint64_t)BT_RING_MAX_CAPACITY * 2, BT_RING_PRODUCER, 0, &r), -EINVAL);
    CHECK_EQ(bt_ring_create(4096, 3, 0, &r), -EINVAL);
    CHECK_EQ(bt_ring_create(4096, BT_RING_PRODUCER, 0, NULL), -EINVAL);
    CHECK(r == NULL);
    CHECK_EQ(bt_ring_attach(-1, BT_RING_CONSUMER, &r), -EINVAL);
    CHECK_EQ(bt_ring_fd(NULL), -EBADF);
    bt_ring_close(NULL);
    bt_ring *p, *c;
    open_pair(4096, &p, &c);
    uint8_t buf[8] = {0};
    uint32_t lens[1] = {8};
    /* Each end refuses the other end's calls. */
    CHECK_EQ(bt_ring_write(c, buf, 8), -EINVAL);
    CHECK_EQ(bt_ring_write_batch(c, buf, lens, 1), -EINVAL);
    CHECK_EQ(bt_ring_read_batch(p, buf, 8, lens, 1), -EINVAL);
    CHECK_EQ(bt_ring_wait(p, 0), -EINVAL);
    CHECK_EQ(bt_ring_read_batch(c, buf, 8, lens, 0), -EINVAL);
    CHECK_EQ(bt_ring_write_batch(p, buf, lens, 0), 0);
    bt_ring_close(c);
    bt_ring_close(p);
}

int main(void)
{
    test_args();
    test_sizes();
    test_full();
    test_close_wait();
    test_consumer_creates();
    test_laps();
    printf("test_ring: ok\n");
    return 0;
}
