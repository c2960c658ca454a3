/* test_sock: unix socket transport -- listen/connect/accept, send_all under backpressure, EPIPE without
 * SIGPIPE, descriptor passing to another process, peer credentials. */
#include "baton.h"
#include "bt_test.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static char dir[64];
static char path[128];

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    CHECK(d);
    int n = 0;
    while (readdir(d))
        n++;
    closedir(d);
    return n;
}

static int is_nonblock(int fd) { return (fcntl(fd, F_GETFL) & O_NONBLOCK) != 0; }
static int is_cloexec(int fd) { return (fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0; }

static void wait_readable(int fd, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    CHECK_EQ(poll(&p, 1, timeout_ms), 1);
}

static int child_status(pid_t pid)
{
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static void test_listen_connect_accept(void)
{
    int lfd = bt_sock_listen(path, 16);
    CHECK(lfd >= 0);
    CHECK(is_nonblock(lfd));
    CHECK(is_cloexec(lfd));
    CHECK_EQ(bt_sock_accept(lfd), -EAGAIN);

    /* The path is taken: no silent unlink, whoever holds it. */
    CHECK_EQ(bt_sock_listen(path, 16), -EADDRINUSE);

    char longp[200];
    memset(longp, 'a', sizeof(longp) - 1);
    longp[0] = '/';
    longp[sizeof(longp) - 1] = 0;
    CHECK_EQ(bt_sock_listen(longp, 16), -ENAMETOOLONG);
    CHECK_EQ(bt_sock_connect(longp), -ENAMETOOLONG);
    CHECK_EQ(bt_sock_listen("", 16), -EINVAL);

    char missing[160];
    snprintf(missing, sizeof(missing), "%s/missing", dir);
    CHECK_EQ(bt_sock_connect(missing), -ENOENT);

    /* A child connects; the parent accepts it and sees the child's credentials. */
    int sync[2];
    CHECK_EQ(pipe(sync), 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        int c = bt_sock_connect(path);
        if (c < 0 || is_nonblock(c) || !is_cloexec(c))
            _exit(2);
        bt_peercred pc;
        if (bt_sock_peercred(c, &pc) < 0 || pc.pid != getppid())
            _exit(3);
        if (bt_sock_send_all(c, "hi", 2) < 0)
            _exit(4);
        char b;
        (void)!read(sync[0], &b, 1); /* keep the connection open until the parent has checked it */
        _exit(0);
    }
    close(sync[0]);
    wait_readable(lfd, 5000);
    int a = bt_sock_accept(lfd);
    CHECK(a >= 0);
    CHECK(is_nonblock(a));
    CHECK(is_cloexec(a));
    bt_peercred pc;
    CHECK_EQ(bt_sock_peercred(a, &pc), 0);
    CHECK_EQ(pc.pid, pid);
    CHECK_EQ(pc.uid, getuid());
    CHECK_EQ(pc.gid, getgid());
    CHECK_EQ(bt_sock_peercred(a, NULL), -EINVAL);
    wait_readable(a, 5000);
    char buf[4];
    CHECK_EQ(read(a, buf, sizeof(buf)), 2);
    CHECK(memcmp(buf, "hi", 2) == 0);
    CHECK_EQ(write(sync[1], "x", 1), 1);
    close(sync[1]);
    CHECK_EQ(child_status(pid), 0);
    close(a);
    close(lfd);
    /* Closing does not remove the path either: it still blocks a new listener. */
    CHECK_EQ(bt_sock_listen(path, 16), -EADDRINUSE);
    CHECK_EQ(unlink(path), 0);
}

static uint8_t pattern(size_t i) { return (uint8_t)(i * 7 + (i >> 13)); }

/* A large send_all through a non-blocking socket whose reader is slow: send_all must poll through EAGAIN
 * and deliver every byte, in order, exactly once. */
static void test_send_all(void)
{
    enum { TOTAL = 8 << 20 };
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    int small = 16384;
    CHECK_EQ(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)), 0);
    CHECK_EQ(fcntl(sv[0], F_SETFL, O_NONBLOCK), 0);
    int go[2];
    CHECK_EQ(pipe(go), 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        close(sv[0]);
        close(go[1]);
        char b[1000]; /* small reads: the writer spends most of its time with a full socket */
        if (read(go[0], b, 1) != 1)
            _exit(6);
        size_t got = 0;
        while (got < TOTAL) {
            struct pollfd p = {.fd = sv[1], .events = POLLIN};
            if (poll(&p, 1, 10000) != 1)
                _exit(2);
            ssize_t n = read(sv[1], b, sizeof(b));
            if (n <= 0)
                _exit(3);
            for (ssize_t i = 0; i < n; i++)
                if ((uint8_t)b[i] != pattern(got + (size_t)i))
                    _exit(4);
            got += (size_t)n;
        }
        /* Nothing beyond TOTAL. */
        struct pollfd p = {.fd = sv[1], .events = POLLIN};
        if (poll(&p, 1, 10000) != 1 || read(sv[1], b, sizeof(b)) != 0)
            _exit(5);
        _exit(0);
    }
    close(sv[1]);
    uint8_t *buf = malloc(TOTAL);
    CHECK(buf);
    for (size_t i = 0; i < TOTAL; i++)
        buf[i] = pattern(i);
    /* The reader is held back, so the socket fills: what follows is sent against a full buffer. */
    ssize_t first = send(sv[0], buf, TOTAL, MSG_DONTWAIT | MSG_NOSIGNAL);
    CHECK(first > 0 && first < TOTAL);
    close(go[0]);
    CHECK_EQ(write(go[1], "g", 1), 1);
    close(go[1]);
    CHECK_EQ(bt_sock_send_all(sv[0], buf + first, TOTAL - (size_t)first), 0);
    CHECK_EQ(bt_sock_send_all(sv[0], buf, 0), 0);
    close(sv[0]);
    CHECK_EQ(child_status(pid), 0);
    free(buf);
}

/* A closed peer is -EPIPE, and SIGPIPE (left at its default, which kills) is never raised. */
static void test_epipe(void)
{
    CHECK(signal(SIGPIPE, SIG_DFL) != SIG_ERR);
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    close(sv[1]);
    CHECK_EQ(bt_sock_send_all(sv[0], "abc", 3), -EPIPE);
    int dummy = sv[0];
    CHECK_EQ(bt_sock_send_fds(sv[0], "x", 1, &dummy, 1), -EPIPE);
    close(sv[0]);
    CHECK_EQ(bt_sock_send_all(sv[0], "abc", 3), -EBADF);
}

/* Pass a pipe's write end to a child, which writes through it; the parent reads it back. */
static void test_fd_passing_child(void)
{
    int sv[2], pp[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    CHECK_EQ(pipe2(pp, O_CLOEXEC), 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        close(sv[0]);
        close(pp[0]);
        close(pp[1]); /* the only write end left must be the one that arrives */
        char b[16];
        int fds[BT_SOCK_MAX_FDS], n = -1;
        struct pollfd p = {.fd = sv[1], .events = POLLIN};
        if (poll(&p, 1, 10000) != 1)
            _exit(2);
        int rc = bt_sock_recv_fds(sv[1], b, sizeof(b), fds, BT_SOCK_MAX_FDS, &n);
        if (rc != 4 || memcmp(b, "pipe", 4) != 0 || n != 1)
            _exit(3);
        if (!(fcntl(fds[0], F_GETFD) & FD_CLOEXEC))
            _exit(4);
        if (write(fds[0], "written by the child", 20) != 20)
            _exit(5);
        _exit(0);
    }
    close(sv[1]);
    CHECK_EQ(bt_sock_send_fds(sv[0], "pipe", 4, &pp[1], 1), 4);
    close(pp[1]); /* ours: from now on only the child's copy can write */
    CHECK_EQ(child_status(pid), 0);
    char b[64];
    wait_readable(pp[0], 5000);
    ssize_t n = read(pp[0], b, sizeof(b));
    CHECK_EQ(n, 20);
    CHECK(memcmp(b, "written by the child", 20) == 0);
    CHECK_EQ(read(pp[0], b, sizeof(b)), 0); /* the child's copy is closed too: no leak in the child */
    close(pp[0]);
    close(sv[0]);
}

/* A memfd passed to ourselves is the same file, arrives close-on-exec, and surplus descriptors are closed
 * rather than leaked. */
static void test_fd_passing_limits(void)
{
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    int mfd = memfd_create("bt-test", MFD_CLOEXEC);
    CHECK(mfd >= 0);
    CHECK_EQ(write(mfd, "memfd!", 6), 6);

    char b[16];
    int fds[BT_SOCK_MAX_FDS], n = -1;
    CHECK_EQ(bt_sock_send_fds(sv[0], "m", 1, &mfd, 1), 1);
    CHECK_EQ(bt_sock_recv_fds(sv[1], b, sizeof(b), fds, BT_SOCK_MAX_FDS, &n), 1);
    CHECK_EQ(n, 1);
    CHECK(fds[0] != mfd);
    CHECK(is_cloexec(fds[0]));
    struct stat s1, s2;
    CHECK_EQ(fstat(mfd, &s1), 0);
    CHECK_EQ(fstat(fds[0], &s2), 0);
    CHECK_EQ(s1.st_ino, s2.st_ino);
    CHECK_EQ(pread(fds[0], b, 6, 0), 6);
    CHECK(memcmp(b, "memfd!", 6) == 0);
    close(fds[0]);

    /* Plain bytes, no descriptors. */
    CHECK_EQ(bt_sock_send_fds(sv[0], "plain", 5, NULL, 0), 5);
    CHECK_EQ(bt_sock_recv_fds(sv[1], b, sizeof(b), fds, BT_SOCK_MAX_FDS, &n), 5);
    CHECK_EQ(n, 0);

    /* Argument checks. */
    CHECK_EQ(bt_sock_send_fds(sv[0], "x", 0, &mfd, 1), -EINVAL);
    int many[BT_SOCK_MAX_FDS + 1];
    for (int i = 0; i <= BT_SOCK_MAX_FDS; i++)
        many[i] = mfd;
    CHECK_EQ(bt_sock_send_fds(sv[0], "x", 1, many, BT_SOCK_MAX_FDS + 1), -EINVAL);
    CHECK_EQ(bt_sock_recv_fds(sv[1], b, 0, fds, 1, &n), -EINVAL);

    /* More than the caller accepts: all closed, -EMSGSIZE, nothing leaks. */
    int before = count_fds();
    CHECK_EQ(bt_sock_send_fds(sv[0], "3", 1, many, 3), 1);
    n = -1;
    CHECK_EQ(bt_sock_recv_fds(sv[1], b, sizeof(b), fds, 2, &n), -EMSGSIZE);
    CHECK_EQ(n, 0);
    CHECK_EQ(count_fds(), before);

    /* More than fit the control buffer at all (a hostile peer using raw sendmsg): truncated, closed. */
    enum { HOSTILE = 20 };
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * HOSTILE)];
    } ctl;
    memset(&ctl, 0, sizeof(ctl));
    struct iovec iov = {.iov_base = "h", .iov_len = 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf, .msg_controllen = sizeof(ctl.buf)};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * HOSTILE);
    for (int i = 0; i < HOSTILE; i++)
        memcpy(CMSG_DATA(c) + i * sizeof(int), &mfd, sizeof(int));
    CHECK_EQ(sendmsg(sv[0], &msg, 0), 1);
    n = -1;
    CHECK_EQ(bt_sock_recv_fds(sv[1], b, sizeof(b), fds, BT_SOCK_MAX_FDS, &n), -EMSGSIZE);
    CHECK_EQ(n, 0);
    CHECK_EQ(count_fds(), before);

    /* End of stream. */
    close(sv[0]);
    CHECK_EQ(bt_sock_recv_fds(sv[1], b, sizeof(b), fds, BT_SOCK_MAX_FDS, &n), 0);
    CHECK_EQ(n, 0);
    close(sv[1]);
    close(mfd);
}

static void test_peercred_socketpair(void)
{
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    bt_peercred pc;
    CHECK_EQ(bt_sock_peercred(sv[0], &pc), 0);
    CHECK_EQ(pc.pid, getpid());
    CHECK_EQ(pc.uid, getuid());
    CHECK_EQ(pc.gid, getgid());
    close(sv[0]);
    close(sv[1]);
    int p[2];
    CHECK_EQ(pipe(p), 0);
    CHECK_EQ(bt_sock_peercred(p[0], &pc), -ENOTSOCK);
    close(p[0]);
    close(p[1]);
}

int main(void)
{
    snprintf(dir, sizeof(dir), "/tmp/bt-sock-XXXXXX");
    CHECK(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/baton.sock", dir);
    test_listen_connect_accept();
    test_send_all();
    test_epipe();
    test_fd_passing_child();
    test_fd_passing_limits();
    test_peercred_socketpair();
    rmdir(dir);
    printf("test_sock: ok\n");
    return 0;
}
