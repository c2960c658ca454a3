/*
 * io_epoll.c -- the epoll backend of the I/O engine.
 *
 * Watches are edge-triggered (EPOLLET), to give exactly the events of io_uring's multishot poll: one event
 * when the fd is already readable at watch time and one each time bytes or EOF arrive, never a repeat for
 * bytes the caller left unread.  Sends happen at once (MSG_DONTWAIT, as the io_uring backend also asks) and
 * their results wait in a FIFO for the next bt_io_wait, so callers see one completion model.
 */
#include "io_internal.h"

#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct io_epoll {
    bt_io base; /* first: the generic layer casts */
    int epfd;
    struct epoll_event *evbuf;
    int evcap;
    bti_io_fifo sent; /* of bt_io_event: SENT results not yet delivered */
} io_epoll;

static int io_epoll_watch(bt_io *io, int fd, uint64_t tag)
{
    io_epoll *e = (io_epoll *)io;
    int rc = bti_io_watch_add(io, fd, tag);
    if (rc < 0)
        return rc;
    /* Level-triggered would repeat an event for bytes the caller chose to leave, which io_uring's
     * multishot poll cannot do; both report arrivals instead. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.u64 = tag};
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        rc = -errno;
        bti_io_watch_del(io, fd, tag);
        return rc;
    }
    return 0;
}

static int io_epoll_unwatch(bt_io *io, int fd, uint64_t tag)
{
    io_epoll *e = (io_epoll *)io;
    int rc = bti_io_watch_del(io, fd, tag);
    if (rc < 0)
        return rc;
    /* EBADF/ENOENT: the caller closed the fd first, which already took it out of the epoll set -- the
     * watch is gone either way, as with io_uring where the removal goes by tag. */
    if (epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, NULL) < 0 && errno != EBADF && errno != ENOENT)
        return -errno;
    return 0;
}

static int io_epoll_send(bt_io *io, int fd, const void *buf, uint32_t len, uint64_t tag)
{
    io_epoll *e = (io_epoll *)io;
    /* Room for the result first: once the bytes are on the socket the completion must not be lost. */
    bt_io_event *ev = bti_io_fifo_slot(&e->sent, sizeof(*ev));
    if (!ev)
        return -ENOMEM;
    ssize_t n;
    do {
        n = send(fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    *ev = (bt_io_event){.tag = tag, .kind = BT_IO_EV_SENT, .result = n < 0 ? -errno : (int32_t)n};
    e->sent.count++;
    return 0;
}

static int io_epoll_wait(bt_io *io, bt_io_event *evs, int max, int timeout_ms)
{
    io_epoll *e = (io_epoll *)io;
    const bt_io_event *sent = e->sent.buf;
    int n = 0;
    while (n < max && e->sent.head < e->sent.count)
        evs[n++] = sent[e->sent.head++];
    if (n == max)
        return n;
    int room = max - n;
    if (room > e->evcap) {
        int cap = room < 1024 ? room : 1024;
        if (cap > e->evcap) {
            struct epoll_event *b = realloc(e->evbuf, (size_t)cap * sizeof(*b));
            if (b) {
                e->evbuf = b;
                e->evcap = cap;
            } else if (!e->evcap) {
                return n ? n : -ENOMEM;
            }
        }
        room = room < e->evcap ? room : e->evcap;
    }
    /* Completions already in hand must not wait behind a timeout. */
    int got = epoll_wait(e->epfd, e->evbuf, room, n ? 0 : timeout_ms);
    if (got < 0)
        return n ? n : -errno;
    for (int i = 0; i < got; i++)
        evs[n++] = (bt_io_event){.tag = e->evbuf[i].data.u64, .kind = BT_IO_EV_READABLE, .result = 0};
    return n;
}

static void io_epoll_close(bt_io *io)
{
    io_epoll *e = (io_epoll *)io;
    close(e->epfd);
    free(e->evbuf);
    free(e->sent.buf);
    free(e);
}

static const bti_io_ops io_epoll_ops = {
    .watch = io_epoll_watch,
    .unwatch = io_epoll_unwatch,
    .send = io_epoll_send,
    .wait = io_epoll_wait,
    .close = io_epoll_close,
};

int bti_io_epoll_open(unsigned entries, bt_io **out)
{
    io_epoll *e = calloc(1, sizeof(*e));
    if (!e)
        return -ENOMEM;
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (e->epfd < 0) {
        int rc = -errno;
        free(e);
        return rc;
    }
    e->evcap = entries < 1024 ? (int)entries : 1024;
    e->evbuf = calloc((size_t)e->evcap, sizeof(*e->evbuf));
    if (!e->evbuf) {
        close(e->epfd);
        free(e);
        return -ENOMEM;
    }
    e->base.ops = &io_epoll_ops;
    e->base.backend = BT_IO_EPOLL;
    *out = &e->base;
    return 0;
}
