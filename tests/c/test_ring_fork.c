/*
 * Shared-memory ring between two real processes (fork): 1M+ records with every byte checked while the
 * consumer parks (spin 0, the producer waking it through the futex) and while it spins; a producer killed
 * with SIGKILL mid-stream (every committed record arrives intact, then -EPIPE, not a hang); a consumer parked
 * when its producer dies.  The consumer creates each ring and the producer attaches to the inherited fd, as
 * a client would attach to a segment received over a socket.
 */
#include "baton.h"
#include "bt_test.h"
#include "test_ring_util.h"

#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_LEN 256u
#define WAIT_NS (20ull * 1000000000ull) /* any single wait longer than this is a hang */

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* In the child: die with the parent, so a failed test never leaves a spinning producer behind. */
static void child_guard(pid_t parent)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(3);
}

/* Fork a producer that dies with the parent; in the child (0 returned) *p is attached to c through the
 * inherited fd. */
static pid_t fork_producer(bt_ring *c, bt_ring **p)
{
    pid_t parent = getpid();
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        child_guard(parent);
        if (bt_ring_attach(bt_ring_fd(c), BT_RING_PRODUCER, p) != 0)
            _exit(2);
    }
    return pid;
}

/* In a child: poll (bounded) until the consumer of r is parked in FUTEX_WAIT. */
static void await_parked(bt_ring *r)
{
    uint64_t t0 = bt_now_ns();
    while (!__atomic_load_n(&r->shm->waiters, __ATOMIC_ACQUIRE)) {
        if (bt_now_ns() - t0 > WAIT_NS)
            _exit(5);
        cpu_relax();
    }
}

/* Producer side: write record seq, publishing per burst; waits (bounded) while the ring is full. */
static void produce_one(bt_ring *p, uint64_t seq)
{
    uint32_t len = tr_len(seq, 0, MAX_LEN);
    void *dst;
    uint64_t t0 = 0;
    while (!(dst = bt_ring_reserve(p, len))) {
        bt_ring_publish(p); /* the consumer may be parked waiting for what we already committed */
        if (!t0)
            t0 = bt_now_ns();
        else if (bt_now_ns() - t0 > WAIT_NS)
            _exit(4);
        cpu_relax();
    }
    tr_fill(dst, len, seq);
    bt_ring_commit(p);
}

/* Consumer side: check a batch against the expected sequence. */
static void check_batch(const uint8_t *buf, const uint32_t *lens, int n, uint64_t *seq)
{
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        if (lens[i] != tr_len(*seq, 0, MAX_LEN) || !tr_check(buf + off, lens[i], *seq)) {
            fprintf(stderr, "record %llu: bad length %u or content\n", (unsigned long long)*seq, lens[i]);
            exit(1);
        }
        off += lens[i];
        (*seq)++;
    }
}

/*
 * N records with random lengths and bursts.  spin_ns 0: the consumer parks whenever the ring is empty; and
 * every 50k records the producer waits (polling, bounded) until the consumer has actually parked, so the
 * futex wake path is exercised for certain, not by luck.
 */
static void test_exchange(uint64_t n, uint64_t spin_ns)
{
    bt_ring *c;
    CHECK_EQ(bt_ring_create(1u << 16, BT_RING_CONSUMER, 1, &c), 0);
    bt_ring_set_spin(c, spin_ns);
    bt_ring *p;
    pid_t pid = fork_producer(c, &p);
    if (pid == 0) {
        uint64_t rng = 99;
        for (uint64_t seq = 0; seq < n;) {
            rng = tr_mix(rng);
            uint64_t burst = 1 + rng % 16;
            for (uint64_t i = 0; i < burst && seq < n; i++)
                produce_one(p, seq++);
            bt_ring_publish(p);
            if (spin_ns == 0 && seq % 50000 < burst)
                await_parked(p);
        }
        bt_ring_close(p);
        _exit(0);
    }
    static uint8_t buf[64 * MAX_LEN];
    uint32_t lens[64];
    uint64_t seq = 0;
    int rc;
    uint64_t t0 = bt_now_ns();
    while ((rc = bt_ring_read_wait(c, buf, sizeof(buf), lens, 64, WAIT_NS)) > 0)
        check_batch(buf, lens, rc, &seq);
    uint64_t el = bt_now_ns() - t0;
    CHECK_EQ(rc, -EPIPE);
    CHECK_EQ(seq, n);
    int status;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    uint32_t wakes = c->shm->futex_seq;
    printf("exchange spin=%llu ns: %llu records in %.1f ms, %u futex wakes\n", (unsigned long long)spin_ns,
           (unsigned long long)n, el / 1e6, wakes);
    if (spin_ns == 0)
        CHECK(wakes >= n / 50000); /* parked and woken at least at every forced pause */
    bt_ring_close(c);
}

/* SIGKILL the producer mid-stream (while it may be inside reserve, memcpy or commit).  The consumer gets
 * every committed record intact and in order, then -EPIPE.  The producer is our child and we do not reap it
 * before the end, so it is a zombie while we wait: that must read as dead too. */
static void test_killed_producer(void)
{
    uint64_t *committed = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(committed != MAP_FAILED);
    *committed = 0;
    bt_ring *c;
    CHECK_EQ(bt_ring_create(1u << 14, BT_RING_CONSUMER, 2, &c), 0);
    /* A spin budget longer than the wait: death must end the spin, not the budget or the time-out. */
    bt_ring_set_spin(c, 3600ull * 1000000000ull);
    bt_ring *p;
    pid_t pid = fork_producer(c, &p);
    if (pid == 0) {
        for (uint64_t seq = 0;; seq++) {
            produce_one(p, seq);
            /* Release: the consumer may only count a record as committed after its commit. */
            __atomic_store_n(committed, seq + 1, __ATOMIC_RELEASE);
            if (seq % 7 == 0)
                bt_ring_publish(p);
        }
    }
    static uint8_t buf[64 * MAX_LEN];
    uint32_t lens[64];
    uint64_t seq = 0;
    int rc, killed = 0;
    uint64_t t_kill = 0;
    while ((rc = bt_ring_read_wait(c, buf, sizeof(buf), lens, 64, WAIT_NS)) > 0) {
        check_batch(buf, lens, rc, &seq);
        if (!killed && seq >= 300000) {
            CHECK_EQ(kill(pid, SIGKILL), 0);
            killed = 1;
            t_kill = bt_now_ns();
        }
    }
    CHECK_EQ(rc, -EPIPE);
    CHECK(killed);
    uint64_t n = __atomic_load_n(committed, __ATOMIC_ACQUIRE);
    /* Killed between a commit and the counter update, the consumer has one more than the counter says. */
    CHECK(seq == n || seq == n + 1);
    printf("killed producer: %llu records intact, -EPIPE %.1f ms after the kill\n", (unsigned long long)seq,
           (bt_now_ns() - t_kill) / 1e6);
    int status;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    bt_ring_close(c);
    munmap(committed, 4096);
}

/* The producer dies while the consumer is parked in FUTEX_WAIT with no deadline: the periodic liveness
 * probe ends the wait with -EPIPE.  A second child kills the producer once it sees the consumer parked. */
static void test_death_while_parked(void)
{
    bt_ring *c;
    CHECK_EQ(bt_ring_create(4096, BT_RING_CONSUMER, 3, &c), 0);
    bt_ring_set_spin(c, 0);
    pid_t parent = getpid();
    bt_ring *p;
    pid_t prod = fork_producer(c, &p);
    if (prod == 0) {
        for (uint64_t seq = 0; seq < 100; seq++)
            produce_one(p, seq);
        bt_ring_publish(p);
        for (;;)
            pause(); /* quiet but alive, until killed */
    }
    static uint8_t buf[64 * MAX_LEN];
    uint32_t lens[64];
    uint64_t seq = 0;
    while (seq < 100) {
        int rc = bt_ring_read_wait(c, buf, sizeof(buf), lens, 64, WAIT_NS);
        CHECK(rc > 0);
        check_batch(buf, lens, rc, &seq);
    }
    /* A quiet producer is not a dead one: a bounded wait times out. */
    CHECK_EQ(bt_ring_wait(c, 250000000ull), -ETIMEDOUT);
    pid_t killer = fork();
    CHECK(killer >= 0);
    if (killer == 0) {
        child_guard(parent);
        await_parked(c);
        _exit(kill(prod, SIGKILL) == 0 ? 0 : 6);
    }
    uint64_t t0 = bt_now_ns();
    CHECK_EQ(bt_ring_wait(c, UINT64_MAX), -EPIPE);
    printf("death while parked: -EPIPE after %.1f ms\n", (bt_now_ns() - t0) / 1e6);
    int status;
    CHECK_EQ(waitpid(killer, &status, 0), killer);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK_EQ(waitpid(prod, &status, 0), prod);
    CHECK(WIFSIGNALED(status));
    /* Reaped now (kill(pid, 0) says ESRCH): still -EPIPE, and at once. */
    CHECK_EQ(bt_ring_wait(c, UINT64_MAX), -EPIPE);
    bt_ring_close(c);
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0); /* children must not inherit unflushed output */
    test_exchange(1200000, 0);
    test_exchange(1200000, 50000);
    test_killed_producer();
    test_death_while_parked();
    printf("test_ring_fork: ok\n");
    return 0;
}
