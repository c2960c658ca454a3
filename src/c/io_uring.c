/*
 * io_uring.c -- the io_uring backend of the I/O engine (built only with BT_HAVE_LIBURING).
 *
 * A watch is one multishot POLL_ADD (POLLIN): one completion when the fd is readable at arm time and one per
 * arrival afterwards, with no syscall to re-arm.  The kernel may end a multishot poll (a completion without
 * IORING_CQE_F_MORE, e.g. after a CQ overflow); we then queue a fresh one.  Sends are IORING_OP_SEND SQEs
 * that bt_io_wait submits together with its wait, so a batch of sends costs one io_uring_enter.
 *
 * user_data = (kind << 60) | tag.  A completion for a tag that is no longer in the watch table belongs to a
 * watch the caller removed; it is dropped, so no event follows bt_io_unwatch.
 */
#ifdef BT_HAVE_LIBURING

#include "io_internal.h"

#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/socket.h>

enum { URING_WATCH = 1, URING_SEND = 2, URING_UNWATCH = 3 };

#define URING_UD(kind, tag) (((uint64_t)(kind) << 60) | (tag))

typedef struct uring_be {
    bt_io base; /* first: the generic layer casts */
    struct io_uring ring;
} uring_be;

/* A free SQE, flushing the queue to the kernel when it is full (rare: only more than `entries` operations
 * between two waits). */
static int uring_sqe_get(uring_be *u, struct io_uring_sqe **out)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
    if (!sqe) {
        int rc = io_uring_submit(&u->ring);
        if (rc < 0)
            return rc;
        sqe = io_uring_get_sqe(&u->ring);
        if (!sqe)
            return -EBUSY;
    }
    *out = sqe;
    return 0;
}

static int uring_arm(uring_be *u, int fd, uint64_t tag)
{
    struct io_uring_sqe *sqe;
    int rc = uring_sqe_get(u, &sqe);
    if (rc < 0)
        return rc;
    io_uring_prep_poll_multishot(sqe, fd, POLLIN);
    io_uring_sqe_set_data64(sqe, URING_UD(URING_WATCH, tag));
    return 0;
}

static int uring_watch(bt_io *io, int fd, uint64_t tag)
{
    uring_be *u = (uring_be *)io;
    /* The poll would only fail at the next wait; a bad fd must fail here, as epoll_ctl does. */
    if (fcntl(fd, F_GETFD) < 0)
        return -errno;
    int rc = bti_io_watch_add(io, fd, tag);
    if (rc < 0)
        return rc;
    rc = uring_arm(u, fd, tag);
    if (rc < 0)
        bti_io_watch_del(io, fd, tag);
    return rc;
}

static int uring_unwatch(bt_io *io, int fd, uint64_t tag)
{
    uring_be *u = (uring_be *)io;
    if (bti_io_watch_find(io, tag) != fd)
        return -ENOENT;
    struct io_uring_sqe *sqe;
    /* SQE first: forgetting the watch without queueing the removal would leave the poll armed for ever. */
    int rc = uring_sqe_get(u, &sqe);
    if (rc < 0)
        return rc;
    io_uring_prep_poll_remove(sqe, URING_UD(URING_WATCH, tag));
    io_uring_sqe_set_data64(sqe, URING_UD(URING_UNWATCH, tag));
    bti_io_watch_del(io, fd, tag);
    return 0;
}

static int uring_send(bt_io *io, int fd, const void *buf, uint32_t len, uint64_t tag)
{
    uring_be *u = (uring_be *)io;
    struct io_uring_sqe *sqe;
    int rc = uring_sqe_get(u, &sqe);
    if (rc < 0)
        return rc;
    /* MSG_DONTWAIT: the same contract as the epoll backend (a full socket gives -EAGAIN or a short count,
     * never a send parked in the kernel that could reorder with the next one).  MSG_NOSIGNAL: -EPIPE, not
     * SIGPIPE. */
    io_uring_prep_send(sqe, fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, URING_UD(URING_SEND, tag));
    return 0;
}

/* Turn one completion into at most one event (returns 1 when *ev was filled). */
static int uring_translate(uring_be *u, const struct io_uring_cqe *cqe, bt_io_event *ev)
{
    uint64_t ud = io_uring_cqe_get_data64(cqe);
    uint64_t tag = ud & BT_IO_TAG_MAX;
    switch (ud >> 60) {
    case URING_SEND:
        *ev = (bt_io_event){.tag = tag, .kind = BT_IO_EV_SENT, .result = cqe->res};
        return 1;
    case URING_WATCH: {
        int fd = bti_io_watch_find(&u->base, tag);
        /* Unwatched (stale completion), or the last word of a poll we removed: nothing to report. */
        if (fd < 0 || cqe->res == -ECANCELED)
            return 0;
        if (cqe->res < 0) {
            bti_io_watch_del(&u->base, fd, tag);
            *ev = (bt_io_event){.tag = tag, .kind = BT_IO_EV_ERROR, .result = cqe->res};
            return 1;
        }
        if (!(cqe->flags & IORING_CQE_F_MORE) && uring_arm(u, fd, tag) < 0) {
            bti_io_watch_del(&u->base, fd, tag);
            *ev = (bt_io_event){.tag = tag, .kind = BT_IO_EV_ERROR, .result = -ENOMEM};
            return 1;
        }
        *ev = (bt_io_event){.tag = tag, .kind = BT_IO_EV_READABLE, .result = 0};
        return 1;
    }
    default: /* URING_UNWATCH: the removal's own result says nothing the caller needs */
        return 0;
    }
}

/* Move completions to evs (at most max); leaves the rest in the CQ for the next call. */
static int uring_reap(uring_be *u, bt_io_event *evs, int max)
{
    int n = 0;
    unsigned head, seen = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(&u->ring, head, cqe)
    {
        if (n == max)
            break;
        seen++;
        n += uring_translate(u, cqe, &evs[n]);
    }
    io_uring_cq_advance(&u->ring, seen);
    return n;
}

static int uring_wait(bt_io *io, bt_io_event *evs, int max, int timeout_ms)
{
    uring_be *u = (uring_be *)io;
    uint64_t deadline = timeout_ms > 0 ? bt_now_ns() + (uint64_t)timeout_ms * 1000000u : 0;
    for (;;) {
        bool ready = io_uring_cq_ready(&u->ring) > 0;
        bool expired = false;
        int rc;
        if (ready || timeout_ms == 0) {
            /* Nothing to wait for: submit what is queued; with nothing queued either, a bare
             * io_uring_enter(GETEVENTS) still runs deferred task work and flushes an overflowed CQ. */
            if (io_uring_sq_ready(&u->ring))
                rc = io_uring_submit(&u->ring);
            else
                rc = ready ? 0 : io_uring_get_events(&u->ring);
            expired = true;
        } else {
            struct __kernel_timespec ts, *tsp = NULL;
            if (timeout_ms > 0) {
                uint64_t now = bt_now_ns();
                uint64_t left = deadline > now ? deadline - now : 0;
                ts.tv_sec = (long long)(left / 1000000000u);
                ts.tv_nsec = (long long)(left % 1000000000u);
                tsp = &ts;
                expired = left == 0;
            }
            struct io_uring_cqe *cqe;
            /* Submit and wait in one io_uring_enter (IORING_FEAT_EXT_ARG, checked at open). */
            rc = io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, tsp, NULL);
            if (rc == -ETIME) {
                rc = 0;
                expired = true;
            }
        }
        if (rc < 0 && rc != -EBUSY)
            return rc;
        int n = uring_reap(u, evs, max);
        if (n > 0 || expired) {
            /* Re-arms queued while reaping go out now, not at the caller's next wait. */
            if (io_uring_sq_ready(&u->ring))
                io_uring_submit(&u->ring);
            return n;
        }
        /* Only completions without events (removals, stale polls): keep waiting what is left. */
    }
}

static void uring_close(bt_io *io)
{
    uring_be *u = (uring_be *)io;
    io_uring_queue_exit(&u->ring);
    bti_io_watch_fini(io);
    free(u);
}

static const bti_io_ops uring_ops = {
    .watch = uring_watch,
    .unwatch = uring_unwatch,
    .send = uring_send,
    .wait = uring_wait,
    .close = uring_close,
};

int bti_io_uring_open(unsigned entries, bt_io **out)
{
    uring_be *u = calloc(1, sizeof(*u));
    if (!u)
        return -ENOMEM;
    /* COOP_TASKRUN: completions are processed when we enter the kernel anyway, so spare the IPI that would
     * interrupt us mid-work (5.19+).  SUBMIT_ALL: one bad SQE must not hold back the rest of a batch.
     * CLAMP: a large `entries` is a wish, not an error.  Older kernels refuse unknown flags: retry bare. */
    unsigned flags = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_CLAMP;
    int rc = io_uring_queue_init(entries, &u->ring, flags);
    if (rc == -EINVAL)
        rc = io_uring_queue_init(entries, &u->ring, IORING_SETUP_CLAMP);
    if (rc < 0) {
        free(u);
        return rc;
    }
    /* Multishot poll needs 5.13 (RSRC_TAGS is the feature bit of that release), the one-syscall timed wait
     * needs EXT_ARG, and NODROP keeps completions when the CQ overflows. */
    unsigned need = IORING_FEAT_EXT_ARG | IORING_FEAT_NODROP | IORING_FEAT_RSRC_TAGS;
    if ((u->ring.features & need) != need) {
        io_uring_queue_exit(&u->ring);
        free(u);
        return -EOPNOTSUPP;
    }
    u->base.ops = &uring_ops;
    u->base.backend = BT_IO_URING;
    *out = &u->base;
    return 0;
}

#endif /* BT_HAVE_LIBURING */
