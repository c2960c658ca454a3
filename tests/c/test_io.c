/* test_io: the I/O engine.  The same cases run against both backends (epoll always; io_uring when built in
 * and allowed by the kernel, else the program exits 77 after the epoll pass). */
#include "baton.h"
#include "bt_test.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

/* Long enough for a wakeup on a loaded 2-core VM, so "no event" checks cannot pass by being early. */
#define QUIET_MS 30
#define LONG_MS 5000

static const char *bname;

/* bt_io_wait, retried on -EINTR (epoll_wait reports pending io_uring task work of this thread that way). */
static int io_wait(bt_io *io, bt_io_event *evs, int max, int timeout_ms)
{
    int n;
    while ((n = bt_io_wait(io, evs, max, timeout_ms)) == -EINTR)
        ;
    return n;
}

static void pair(int sv[2])
{
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
}

/* Wait for events until one of `kind` for `tag` arrives (others are collected into *other). */
static bt_io_event wait_for(bt_io *io, uint64_t tag, int kind)
{
    uint64_t deadline = bt_now_ns() + (uint64_t)LONG_MS * 1000000u;
    while (bt_now_ns() < deadline) {
        bt_io_event evs[16];
        int n = io_wait(io, evs, 16, 100);
        CHECK(n >= 0);
        for (int i = 0; i < n; i++)
            if (evs[i].tag == tag && evs[i].kind == kind)
                return evs[i];
    }
    fprintf(stderr, "%s: no event kind %d for tag %llu\n", bname, kind, (unsigned long long)tag);
    exit(1);
}

/* No event at all within QUIET_MS. */
static void expect_quiet(bt_io *io)
{
    bt_io_event evs[8];
    int n = io_wait(io, evs, 8, QUIET_MS);
    if (n != 0)
        fprintf(stderr, "%s: unexpected event tag %llu kind %d\n", bname, (unsigned long long)evs[0].tag,
                evs[0].kind);
    CHECK_EQ(n, 0);
}

static void drain_fd(int fd)
{
    char b[4096];
    while (read(fd, b, sizeof(b)) > 0)
        ;
}

static void test_watch(bt_io *io)
{
    int sv[2];
    pair(sv);
    CHECK_EQ(bt_io_watch(io, sv[0], 11), 0);
    expect_quiet(io); /* nothing to read yet */
    CHECK_EQ(write(sv[1], "ab", 2), 2);
    bt_io_event ev = wait_for(io, 11, BT_IO_EV_READABLE);
    CHECK_EQ(ev.result, 0);
    /* One event per arrival (edge): bytes left unread do not fire again... */
    char b[4];
    CHECK_EQ(read(sv[0], b, 1), 1);
    expect_quiet(io);
    /* ...new bytes do. */
    CHECK_EQ(write(sv[1], "c", 1), 1);
    wait_for(io, 11, BT_IO_EV_READABLE);
    CHECK_EQ(read(sv[0], b, sizeof(b)), 2);
    CHECK(memcmp(b, "bc", 2) == 0);
    expect_quiet(io);

    /* Unwatch stops it, even with bytes arriving right before the unwatch. */
    CHECK_EQ(write(sv[1], "d", 1), 1);
    CHECK_EQ(bt_io_unwatch(io, sv[0], 11), 0);
    expect_quiet(io);
    CHECK_EQ(write(sv[1], "e", 1), 1);
    expect_quiet(io);
    CHECK_EQ(bt_io_unwatch(io, sv[0], 11), -ENOENT);

    /* Watching an fd that is already readable reports it at once; the same tag can be reused. */
    CHECK_EQ(bt_io_watch(io, sv[0], 11), 0);
    wait_for(io, 11, BT_IO_EV_READABLE);
    drain_fd(sv[0]);

    /* EOF is readable. */
    close(sv[1]);
    wait_for(io, 11, BT_IO_EV_READABLE);
    CHECK_EQ(read(sv[0], b, sizeof(b)), 0);
    CHECK_EQ(bt_io_unwatch(io, sv[0], 11), 0);
    close(sv[0]);
}

static void test_watch_errors(bt_io *io)
{
    int sv[2], p[2];
    pair(sv);
    CHECK_EQ(pipe(p), 0);
    CHECK_EQ(bt_io_watch(io, sv[0], 1), 0);
    CHECK_EQ(bt_io_watch(io, sv[0], 2), -EEXIST); /* one watch per fd */
    CHECK_EQ(bt_io_unwatch(io, sv[1], 1), -ENOENT); /* tag watched, but on another fd */
    CHECK_EQ(bt_io_unwatch(io, sv[0], 2), -ENOENT);
    CHECK_EQ(bt_io_watch(io, sv[1], BT_IO_TAG_MAX + 1), -EINVAL);
    CHECK_EQ(bt_io_watch(io, -1, 3), -EINVAL);
    int closed = dup(p[0]);
    close(closed);
    CHECK_EQ(bt_io_watch(io, closed, 4), -EBADF);
    char tmpl[] = "/tmp/bt-io-XXXXXX";
    int reg = mkstemp(tmpl);
    CHECK(reg >= 0);
    unlink(tmpl);
    CHECK_EQ(bt_io_watch(io, reg, 5), -EPERM); /* always "ready": refused by both backends */
    close(reg);
    /* The largest tag survives the round trip through io_uring's user_data. */
    CHECK_EQ(bt_io_watch(io, p[0], BT_IO_TAG_MAX), 0);
    CHECK_EQ(write(p[1], "x", 1), 1);
    wait_for(io, BT_IO_TAG_MAX, BT_IO_EV_READABLE);
    CHECK_EQ(bt_io_unwatch(io, p[0], BT_IO_TAG_MAX), 0);
    /* Unwatch after the caller already closed the fd still forgets the watch. */
    close(sv[0]);
    CHECK_EQ(bt_io_unwatch(io, sv[0], 1), 0);
    expect_quiet(io);
    close(sv[1]);
    close(p[0]);
    close(p[1]);
}

/* Many watches: the tables grow, shrink and are reused; each readable fd reports its own tag once. */
static void test_many_watches(bt_io *io)
{
    enum { N = 100 };
    int sv[N][2];
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < N; i++) {
            pair(sv[i]);
            CHECK_EQ(bt_io_watch(io, sv[i][0], 5000 + (uint64_t)i * 3), 0);
        }
        for (int i = 0; i < N; i += 2)
            CHECK_EQ(write(sv[i][1], "z", 1), 1);
        int seen[N] = {0}, total = 0;
        uint64_t deadline = bt_now_ns() + (uint64_t)LONG_MS * 1000000u;
        while (total < N / 2 && bt_now_ns() < deadline) {
            bt_io_event evs[7]; /* fewer than ready: the rest must wait for the next call, not be lost */
            int n = io_wait(io, evs, 7, 100);
            CHECK(n >= 0 && n <= 7);
            for (int k = 0; k < n; k++) {
                CHECK_EQ(evs[k].kind, BT_IO_EV_READABLE);
                uint64_t i = (evs[k].tag - 5000) / 3;
                CHECK(i < N && i % 2 == 0 && (evs[k].tag - 5000) % 3 == 0);
                if (seen[i]) fprintf(stderr, "%s round %d dup tag %llu\n", bname, round, (unsigned long long)evs[k].tag);
                CHECK_EQ(seen[i], 0);
                seen[i] = 1;
                total++;
            }
        }
        CHECK_EQ(total, N / 2);
        expect_quiet(io);
        for (int i = 0; i < N; i++) {
            CHECK_EQ(bt_io_unwatch(io, sv[i][0], 5000 + (uint64_t)i * 3), 0);
            close(sv[i][0]);
            close(sv[i][1]);
        }
    }
}

/* 64 sends queued, one wait: every completion arrives with its byte count, bytes arrive in order. */
static void test_batched_sends(bt_io *io)
{
    enum { N = 64, FS = 64 };
    int sv[2];
    pair(sv);
    static uint8_t bufs[N][FS];
    for (int i = 0; i < N; i++) {
        memset(bufs[i], i, FS);
        CHECK_EQ(bt_io_send(io, sv[1], bufs[i], FS - (i % 5), 100 + (uint64_t)i), 0);
    }
    int seen[N] = {0}, got = 0;
    uint64_t deadline = bt_now_ns() + (uint64_t)LONG_MS * 1000000u;
    while (got < N && bt_now_ns() < deadline) {
        bt_io_event evs[N];
        int n = io_wait(io, evs, N, 1000);
        CHECK(n >= 0);
        for (int k = 0; k < n; k++) {
            CHECK_EQ(evs[k].kind, BT_IO_EV_SENT);
            int i = (int)(evs[k].tag - 100);
            CHECK(i >= 0 && i < N);
            CHECK_EQ(seen[i], 0);
            CHECK_EQ(evs[k].result, FS - (i % 5));
            seen[i] = 1;
            got++;
        }
    }
    CHECK_EQ(got, N);
    for (int i = 0; i < N; i++) {
        uint8_t b[FS];
        CHECK_EQ(read(sv[0], b, (size_t)(FS - (i % 5))), FS - (i % 5));
        for (int j = 0; j < FS - (i % 5); j++)
            CHECK_EQ(b[j], i);
    }
    expect_quiet(io);

    /* Fewer slots than completions: the rest wait for the next call. */
    for (int i = 0; i < 10; i++)
        CHECK_EQ(bt_io_send(io, sv[1], bufs[i], FS, 300 + (uint64_t)i), 0);
    int total = 0, calls = 0;
    while (total < 10 && calls < 100) {
        bt_io_event evs[3];
        int n = io_wait(io, evs, 3, 1000);
        CHECK(n >= 0 && n <= 3);
        for (int k = 0; k < n; k++)
            CHECK_EQ(evs[k].tag, 300 + (uint64_t)total + (uint64_t)k); /* in submission order */
        total += n;
        calls++;
    }
    CHECK_EQ(total, 10);
    drain_fd(sv[0]);
    close(sv[0]);
    close(sv[1]);
}

/* Send and watch on one engine: an echo through a peer socket. */
static void test_send_and_watch(bt_io *io)
{
    int sv[2];
    pair(sv);
    CHECK_EQ(bt_io_watch(io, sv[1], 7), 0);
    CHECK_EQ(bt_io_send(io, sv[0], "ping", 4, 8), 0);
    int got_sent = 0, got_readable = 0;
    uint64_t deadline = bt_now_ns() + (uint64_t)LONG_MS * 1000000u;
    while ((!got_sent || !got_readable) && bt_now_ns() < deadline) {
        bt_io_event evs[4];
        int n = io_wait(io, evs, 4, 100);
        CHECK(n >= 0);
        for (int k = 0; k < n; k++) {
            if (evs[k].tag == 8) {
                CHECK_EQ(evs[k].kind, BT_IO_EV_SENT);
                CHECK_EQ(evs[k].result, 4);
                got_sent++;
            } else {
                CHECK_EQ(evs[k].tag, 7);
                CHECK_EQ(evs[k].kind, BT_IO_EV_READABLE);
                got_readable++;
            }
        }
    }
    CHECK_EQ(got_sent, 1);
    CHECK(got_readable >= 1);
    char b[8];
    CHECK_EQ(read(sv[1], b, sizeof(b)), 4);
    CHECK(memcmp(b, "ping", 4) == 0);
    CHECK_EQ(bt_io_unwatch(io, sv[1], 7), 0);
    close(sv[0]);
    close(sv[1]);
}

/* Errors come back as results: peer gone (-EPIPE, and no SIGPIPE), not a socket, socket full (-EAGAIN:
 * both backends send without waiting). */
static void test_send_errors(bt_io *io)
{
    CHECK(signal(SIGPIPE, SIG_DFL) != SIG_ERR);
    int sv[2], p[2];
    pair(sv);
    close(sv[1]);
    CHECK_EQ(bt_io_send(io, sv[0], "x", 1, 1), 0);
    CHECK_EQ(wait_for(io, 1, BT_IO_EV_SENT).result, -EPIPE);
    close(sv[0]);

    CHECK_EQ(pipe(p), 0);
    CHECK_EQ(bt_io_send(io, p[1], "x", 1, 2), 0);
    CHECK_EQ(wait_for(io, 2, BT_IO_EV_SENT).result, -ENOTSOCK);
    close(p[0]);
    close(p[1]);

    pair(sv);
    static char junk[65536];
    while (send(sv[1], junk, sizeof(junk), MSG_DONTWAIT) > 0)
        ;
    CHECK_EQ(bt_io_send(io, sv[1], "x", 1, 3), 0);
    CHECK_EQ(wait_for(io, 3, BT_IO_EV_SENT).result, -EAGAIN);
    close(sv[0]);
    close(sv[1]);

    CHECK_EQ(bt_io_send(io, -1, "x", 1, 4), -EINVAL);
    CHECK_EQ(bt_io_send(io, 0, "x", 1, BT_IO_TAG_MAX + 1), -EINVAL);
    CHECK_EQ(bt_io_send(io, 0, NULL, 1, 4), -EINVAL);
    bt_io_event ev;
    CHECK_EQ(bt_io_wait(io, &ev, 0, 0), -EINVAL);
    CHECK_EQ(bt_io_wait(io, NULL, 1, 0), -EINVAL);
}

/* More operations between two waits than the submission queue holds. */
static void test_sq_overflow(bt_io *io)
{
    enum { N = 200 }; /* the engines below are opened with 32 entries */
    int sv[2];
    pair(sv);
    int big = 1 << 20;
    setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
    static uint8_t buf[16];
    for (int i = 0; i < N; i++)
        CHECK_EQ(bt_io_send(io, sv[1], buf, sizeof(buf), (uint64_t)i), 0);
    int got = 0;
    uint64_t deadline = bt_now_ns() + (uint64_t)LONG_MS * 1000000u;
    while (got < N && bt_now_ns() < deadline) {
        bt_io_event evs[64];
        int n = io_wait(io, evs, 64, 100);
        CHECK(n >= 0);
        for (int k = 0; k < n; k++)
            CHECK_EQ(evs[k].result, (int)sizeof(buf));
        got += n;
    }
    CHECK_EQ(got, N);
    close(sv[0]);
    close(sv[1]);
}

static void run_all(bt_io *io)
{
    test_watch(io);
    test_watch_errors(io);
    test_many_watches(io);
    test_batched_sends(io);
    test_send_and_watch(io);
    test_send_errors(io);
    test_sq_overflow(io);
}

int main(void)
{
    bt_io *io;
    CHECK_EQ(bt_io_open(99, 32, &io), -EINVAL);
    CHECK_EQ(bt_io_open(BT_IO_EPOLL, 32, NULL), -EINVAL);

    bname = "epoll";
    CHECK_EQ(bt_io_open(BT_IO_EPOLL, 32, &io), 0);
    CHECK_EQ(bt_io_backend(io), BT_IO_EPOLL);
    run_all(io);
    bt_io_close(io);
    bt_io_close(NULL);

    /* The environment steers the automatic choice. */
    CHECK_EQ(setenv("BATON_IO", "epoll", 1), 0);
    CHECK_EQ(bt_io_open(BT_IO_AUTO, 0, &io), 0);
    CHECK_EQ(bt_io_backend(io), BT_IO_EPOLL);
    bt_io_close(io);
    CHECK_EQ(unsetenv("BATON_IO"), 0);

    bname = "io_uring";
    int rc = bt_io_open(BT_IO_URING, 32, &io);
#ifndef BT_HAVE_LIBURING
    CHECK_EQ(rc, -EOPNOTSUPP);
#endif
    if (rc < 0) {
        printf("test_io: epoll ok; io_uring unavailable (%s): skipped\n", strerror(-rc));
        CHECK_EQ(bt_io_open(BT_IO_AUTO, 0, &io), 0);
        CHECK_EQ(bt_io_backend(io), BT_IO_EPOLL);
        bt_io_close(io);
        return BT_SKIP;
    }
    CHECK_EQ(bt_io_backend(io), BT_IO_URING);
    run_all(io);
    bt_io_close(io);
    CHECK_EQ(bt_io_open(BT_IO_AUTO, 0, &io), 0);
    CHECK_EQ(bt_io_backend(io), BT_IO_URING);
    bt_io_close(io);
    printf("test_io: epoll ok, io_uring ok\n");
    return 0;
}
