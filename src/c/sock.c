/*
 * sock.c -- unix stream sockets: listen/connect/accept, whole-buffer sends, descriptor passing (SCM_RIGHTS)
 * and peer credentials (SO_PEERCRED).  Every function returns >= 0 or -errno; none leaves a descriptor
 * behind on failure.
 */
#include "baton.h"

#include <fcntl.h>
#include <poll.h>
#include <stdbool.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* Fill a sockaddr_un; the path must fit with its terminating NUL (a path that only fits without it would be
 * silently cut by some tools and is not portable). */
static int sock_addr(const char *path, struct sockaddr_un *sa, socklen_t *salen)
{
    if (!path || !path[0])
        return -EINVAL;
    size_t n = strlen(path);
    if (n >= sizeof(sa->sun_path))
        return -ENAMETOOLONG;
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    memcpy(sa->sun_path, path, n + 1);
    *salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
    return 0;
}

/* Close fd and return -err; err is read by the caller before close() can clobber errno. */
static int sock_fail(int fd, int err)
{
    close(fd);
    return -err;
}

int bt_sock_listen(const char *path, int backlog)
{
    struct sockaddr_un sa;
    socklen_t salen;
    int rc = sock_addr(path, &sa, &salen);
    if (rc < 0)
        return rc;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    /* No unlink first: a path in use may belong to a live daemon, and only the caller can tell a stale one
     * (by trying to connect) -- bind reports EADDRINUSE either way. */
    if (bind(fd, (struct sockaddr *)&sa, salen) < 0)
        return sock_fail(fd, errno);
    if (listen(fd, backlog) < 0)
        return sock_fail(fd, errno);
    return fd;
}

/* Block until fd is writable (or in error: the next send, or SO_ERROR, then reports it). */
static int sock_wait_writable(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    for (;;) {
        int rc = poll(&p, 1, -1);
        if (rc > 0)
            return 0;
        if (rc < 0 && errno != EINTR)
            return -errno;
    }
}

/* Wait for an interrupted blocking connect to finish: POSIX says it completes asynchronously, so calling
 * connect again would only report EALREADY. */
static int sock_connect_finish(int fd)
{
    int rc = sock_wait_writable(fd);
    if (rc < 0)
        return rc;
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return -errno;
    return -err;
}

int bt_sock_connect(const char *path)
{
    struct sockaddr_un sa;
    socklen_t salen;
    int rc = sock_addr(path, &sa, &salen);
    if (rc < 0)
        return rc;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (connect(fd, (struct sockaddr *)&sa, salen) < 0) {
        if (errno != EINTR)
            return sock_fail(fd, errno);
        rc = sock_connect_finish(fd);
        if (rc < 0)
            return sock_fail(fd, -rc);
    }
    return fd;
}

int bt_sock_accept(int listen_fd)
{
    for (;;) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0)
            return fd;
        if (errno != EINTR)
            return -errno;
    }
}

int bt_sock_send_all(int fd, const void *buf, size_t len)
{
    if (len && !buf)
        return -EINVAL;
    const char *p = buf;
    while (len) {
        /* MSG_NOSIGNAL: a vanished peer must come back as -EPIPE, never as a SIGPIPE that kills the daemon. */
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n >= 0) {
            p += n;
            len -= (size_t)n;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -errno;
        int rc = sock_wait_writable(fd);
        if (rc < 0)
            return rc;
    }
    return 0;
}

int bt_sock_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds)
{
    if (!buf || len == 0 || nfds < 0 || nfds > BT_SOCK_MAX_FDS || (nfds && !fds))
        return -EINVAL;
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * BT_SOCK_MAX_FDS)];
    } ctl;
    /* At most INT32_MAX bytes per call so the count always fits the int we return (a short send is legal). */
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len > INT32_MAX ? INT32_MAX : len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds) {
        memset(&ctl, 0, sizeof(ctl));
        msg.msg_control = ctl.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    for (;;) {
        ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (n >= 0)
            return (int)n;
        if (errno != EINTR)
            return -errno;
    }
}

/* Close every descriptor carried by the SCM_RIGHTS messages in msg. */
static void sock_close_rights(struct msghdr *msg)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            close(fd);
        }
    }
}

int bt_sock_recv_fds(int sock, void *buf, size_t cap, int *fds, int max_fds, int *nfds)
{
    if (!buf || cap == 0 || !nfds || max_fds < 0 || (max_fds && !fds))
        return -EINVAL;
    *nfds = 0;
    /* Room for BT_SOCK_MAX_FDS whatever max_fds is: a peer sending more than the caller wants must still
     * have them land here so they can be closed, not leak into a truncated control message. */
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * BT_SOCK_MAX_FDS)];
    } ctl;
    struct iovec iov = {.iov_base = buf, .iov_len = cap > INT32_MAX ? INT32_MAX : cap};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf, .msg_controllen = sizeof(ctl.buf)};
    ssize_t n;
    do {
        /* MSG_CMSG_CLOEXEC: the descriptors must never leak into a child exec'd by another thread. */
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;

    int got = 0;
    bool surplus = (msg.msg_flags & MSG_CTRUNC) != 0; /* the kernel already closed what did not fit */
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        if ((size_t)got + k > (size_t)max_fds)
            surplus = true;
        else
            got += (int)k;
    }
    if (surplus) {
        /* All or nothing: handing over some of the descriptors of a message would leave the caller unable
         * to tell which ones it got. */
        sock_close_rights(&msg);
        return -EMSGSIZE;
    }
    int i = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        memcpy(fds + i, CMSG_DATA(c), k * sizeof(int));
        i += (int)k;
    }
    *nfds = got;
    return (int)n;
}

int bt_sock_peercred(int fd, bt_peercred *out)
{
    if (!out)
        return -EINVAL;
    struct ucred uc;
    socklen_t len = sizeof(uc);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &uc, &len) < 0)
        return -errno;
    out->pid = uc.pid;
    out->uid = uc.uid;
    out->gid = uc.gid;
    return 0;
}
