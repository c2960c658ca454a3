/*
 * test_ring_doorbell.c -- eventfd doorbells on rings: a publish rings the bell only when the consumer armed,
 * arm reports a record already there, disarm silences the bell, close rings it, and the armed-waiters
 * handshake loses no wake-up under a racing producer thread.
 */
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "baton.h"
#include "bt_test.h"

static int bell_count(int efd)
{
    uint64_t v = 0;
    if (read(efd, &v, sizeof(v)) != (ssize_t)sizeof(v))
        return 0;
    return (int)v;
}

static void basic(void)
{
    bt_ring *p, *c;
    CHECK_EQ(bt_ring_create(4096, BT_RING_PRODUCER, 1, &p), 0);
    CHECK_EQ(bt_ring_attach(bt_ring_fd(p), BT_RING_CONSUMER, &c), 0);
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    CHECK(efd >= 0);
    bt_ring_set_doorbell(p, efd);

    /* Not armed: a publish makes no noise. */
    CHECK_EQ(bt_ring_write(p, "a", 1), 0);
    CHECK_EQ(bell_count(efd), 0);
    /* A record is there: arm refuses to arm. */
    CHECK_EQ(bt_ring_arm(c), 1);
    char buf[64];
    uint32_t lens[4];
    CHECK_EQ(bt_ring_read_batch(c, buf, sizeof(buf), lens, 4), 1);
    /* Empty: armed, and the next publish rings once. */
    CHECK_EQ(bt_ring_arm(c), 0);
    CHECK_EQ(bt_ring_write(p, "b", 1), 0);
    CHECK_EQ(bell_count(efd), 1);
    bt_ring_disarm(c);
    CHECK_EQ(bt_ring_write(p, "c", 1), 0);
    CHECK_EQ(bell_count(efd), 0);
    CHECK_EQ(bt_ring_read_batch(c, buf, sizeof(buf), lens, 4), 2);
    CHECK_EQ(bt_ring_producer_gone(c), 0);
    /* Close rings the bell even unarmed; arm then reports -EPIPE once drained. */
    CHECK_EQ(bt_ring_write(p, "d", 1), 0);
    bt_ring_close(p);
    CHECK(bell_count(efd) >= 1);
    CHECK_EQ(bt_ring_producer_gone(c), 1);
    CHECK_EQ(bt_ring_arm(c), 1);
    CHECK_EQ(bt_ring_read_batch(c, buf, sizeof(buf), lens, 4), 1);
    CHECK_EQ(bt_ring_arm(c), -EPIPE);
    bt_ring_close(c);
    close(efd);
}

/* A producer thread writes N records, one per publish; the consumer arms, blocks on poll() for the bell
 * (no timeout fallback besides a generous failure deadline), and must receive all of them. */
#define RACE_N 20000
static bt_ring *race_p;

static void *race_producer(void *arg)
{
    (void)arg;
    for (uint32_t i = 0; i < RACE_N; i++) {
        while (bt_ring_write(race_p, &i, sizeof(i)) == -ENOSPC)
            ;
    }
    return NULL;
}

static void race(void)
{
    bt_ring *c;
    CHECK_EQ(bt_ring_create(4096, BT_RING_PRODUCER, 2, &race_p), 0);
    CHECK_EQ(bt_ring_attach(bt_ring_fd(race_p), BT_RING_CONSUMER, &c), 0);
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    CHECK(efd >= 0);
    bt_ring_set_doorbell(race_p, efd);
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, race_producer, NULL), 0);
    uint32_t expect = 0;
    char buf[4096];
    uint32_t lens[256];
    while (expect < RACE_N) {
        int n = bt_ring_read_batch(c, buf, sizeof(buf), lens, 256);
        if (n > 0) {
            for (int i = 0; i < n; i++) {
                uint32_t v;
                memcpy(&v, buf + 4 * i, 4);
                CHECK_EQ(v, expect);
                expect++;
            }
            continue;
        }
        CHECK_EQ(n, -EAGAIN);
        int rc = bt_ring_arm(c);
        if (rc == 1)
            continue;
        CHECK_EQ(rc, 0);
        struct pollfd pfd = {.fd = efd, .events = POLLIN};
        CHECK_EQ(poll(&pfd, 1, 10000), 1); /* a lost wake-up would hang here and fail */
        bell_count(efd);
        bt_ring_disarm(c);
    }
    pthread_join(t, NULL);
    bt_ring_close(race_p);
    bt_ring_close(c);
    close(efd);
}

int main(void)
{
    basic();
    race();
    return 0;
}
