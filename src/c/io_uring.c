/*
 * io_uring.c -- the io_uring backend of the I/O engine (built only with BT_HAVE_LIBURING).
 *
 * A watch is one multishot POLL_ADD (POLLIN): one completion when the fd is readable at arm time and one per
 * arrival afterwards, with no syscall to re-arm.  The kernel may end a multishot poll (a completion without
 * IORING_CQE_F_MORE, e.g. after a CQ overflow); we then queue a fresh one.  Sends are IORING_OP_SEND SQEs
 * that bt_io_wait submits together with its wait, so a batch of sends costs one io_uring_enter.
 *
 * user_data = (kind << 60) | rest.  For a send, rest is the caller's tag.  For a watch it is (gen << 32) | fd:
 * the tag is looked up in the watch table, and a completion whose generation is not the fd's current watch
 * belongs to a watch the caller removed (maybe re-watching the same fd number or tag since): it is dropped,
 * so no event follows bt_io_unwatch and none is misattributed to a later watch.
 */
#ifdef BT_HAVE_LIBURING

#include "io_internal.h"

#include <liburing.h>
#include <poll.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>

enum { URING_WATCH = 1, URING_SEND = 2, URING_UNWATCH = 3 };

#define URING_UD(kind, rest) (((uint64_t)(kind) << 60) | (rest))
#define URING_WATCH_UD(gen, fd) URING_UD(URING_WATCH, ((uint64_t)(gen) << 32) | (uint32_t)(fd))

/* An event taken off the CQ early (see uring_stash), with what is needed to re-check a READABLE. */
typedef struct uring_stashed {
    bt_io_event ev;
    int32_t fd;
    uint32_t gen;
} uring_stashed;

typedef struct uring_be {
    bt_io base; /* first: the generic layer casts */
    struct io_uring ring;
    bti_io_fifo stash; /* of uring_stashed: events for the next bt_io_wait, oldest first */
    int stashing; /* inside uring_stash: a re-arm there must not flush (and stash) recursively */
} uring_be;

static void uring_stash(uring_be *u);

/* A free SQE, flushing the queue to the kernel when it is full (rare: only more than `entries` operations
 * between two waits). */
static int uring_sqe_get(uring_be *u, struct io_uring_sqe **out)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
    if (!sqe) {
        if (u->stashing)
            return -EBUSY;
        int rc = io_uring_submit(&u->ring);
        uring_stash(u); /* their completions are in: keep the CQ from overflowing */
        if (rc < 0)
            return rc;
        sqe = io_uring_get_sqe(&u->ring);
        if (!sqe)
            return -EBUSY;
    }
    *out = sqe;
    return 0;
}

static int uring_arm(uring_be *u, int fd, uint32_t gen)
{
    struct io_uring_sqe *sqe;
    int rc = uring_sqe_get(u, &sqe);
    if (rc < 0)
        return rc;
    io_uring_prep_poll_multishot(sqe, fd, POLLIN);
    io_uring_sqe_set_data64(sqe, URING_WATCH_UD(gen, fd));
    return 0;
}

static int uring_watch(bt_io *io, int fd, uint64_t tag)
{
    uring_be *u = (uring_be *)io;
    /* Refuse here what epoll_ctl refuses (a bad fd; a regular file or directory, which is always "ready"),
     * rather than at the next wait or never. */
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (S_ISREG(st.st_mode) || S_ISDIR(st.st_mode))
        return -EPERM;
    int gen = bti_io_watch_add(io, fd, tag);
    if (gen < 0)
        return gen;
    int rc = uring_arm(u, fd, (uint32_t)gen);
    if (rc < 0)
        bti_io_watch_del(io, fd, tag);
    return rc;
}

static int uring_unwatch(bt_io *io, int fd, uint64_t tag)
{
    uring_be *u = (uring_be *)io;
    const bti_io_watch *w = bti_io_watch_get(io, fd);
    if (!w || w->tag != tag)
        return -ENOENT;
    struct io_uring_sqe *sqe;
    /* SQE first: forgetting the watch without queueing the removal would leave the poll armed for ever. */
    int rc = uring_sqe_get(u, &sqe);
    if (rc < 0)
        return rc;
    io_uring_prep_poll_remove(sqe, URING_WATCH_UD(w->gen, fd));
    io_uring_sqe_set_data64(sqe, URING_UD(URING_UNWATCH, 0));
    bti_io_watch_del(io, fd, tag);
    /* Submit now, not at the next wait: the armed poll holds a reference on the file, so a caller that
     * closes fd next would otherwise keep the connection open (no EOF for the peer) until then. */
    rc = io_uring_submit(&u->ring);
    /* Unwatching is how connections end: without this, a server closing many would fill the CQ with the
     * cancellations and force the kernel to end (and us to re-arm) the multishot polls of the others. */
    uring_stash(u);
    return rc < 0 ? rc : 0;
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

/* Turn one completion into at most one event (returns 1 when *ev was filled; *fd and *gen name the watch
 * of a READABLE, -1 otherwise). */
static int uring_translate(uring_be *u, const struct io_uring_cqe *cqe, bt_io_event *ev, int *wfd, uint32_t *wgen)
{
    *wfd = -1;
    *wgen = 0;
    uint64_t ud = io_uring_cqe_get_data64(cqe);
    switch (ud >> 60) {
    case URING_SEND:
        *ev = (bt_io_event){.tag = ud & BT_IO_TAG_MAX, .kind = BT_IO_EV_SENT, .result = cqe->res};
        return 1;
    case URING_WATCH: {
        int fd = (int)(uint32_t)ud;
        uint32_t gen = (uint32_t)(ud >> 32) & BTI_IO_GEN_MASK;
        const bti_io_watch *w = bti_io_watch_get(&u->base, fd);
        /* A removed watch (stale completion, or the -ECANCELED last word of the removal): nothing to say. */
        if (!w || w->gen != gen)
            return 0;
        uint64_t tag = w->tag;
        if (cqe->res < 0) {
            bti_io_watch_del(&u->base, fd, tag);
            *ev = (bt_io_event){.tag = tag, .kind = BT_IO_EV_ERROR, .result = cqe->res};
            return 1;
        }
        int rc = (cqe->flags & IORING_CQE_F_MORE) ? 0 : uring_arm(u, fd, gen);
        if (rc < 0) {
            bti_io_watch_del(&u->base, fd, tag);
            *ev = (bt_io_event){.tag = tag, .kind = BT_IO_EV_ERROR, .result = rc};
            return 1;
        }
        *ev = (bt_io_event){.tag = tag, .kind = BT_IO_EV_READABLE, .result = 0};
        *wfd = fd;
        *wgen = gen;
        return 1;
    }
    default: /* URING_UNWATCH: the removal's own result says nothing the caller needs */
        return 0;
    }
}

/* Move completions to evs (at most max); leaves the rest in the CQ for the next call. */
static int uring_reap(uring_be *u, bt_io_event *evs, int max)
{
    int n = 0, fd;
    uint32_t gen;
    unsigned head, seen = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(&u->ring, head, cqe)
    {
        if (n == max)
            break;
        seen++;
        n += uring_translate(u, cqe, &evs[n], &fd, &gen);
    }
    io_uring_cq_advance(&u->ring, seen);
    return n;
}

/*
 * Empty the CQ into the stash, between waits.  Called after the submissions made outside bt_io_wait, whose
 * completions would otherwise pile up in the CQ.  Stops (leaving the rest in the CQ) if memory runs out.
 */
static void uring_stash(uring_be *u)
{
    u->stashing = 1;
    unsigned head, seen = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(&u->ring, head, cqe)
    {
        /* The slot stays put while uring_translate runs: a re-arm there never stashes (see `stashing`). */
        uring_stashed *e = bti_io_fifo_slot(&u->stash, sizeof(*e));
        if (!e)
            break;
        seen++;
        int fd;
        uint32_t gen;
        if (uring_translate(u, cqe, &e->ev, &fd, &gen)) {
            e->fd = fd;
            e->gen = gen;
            u->stash.count++;
        }
    }
    io_uring_cq_advance(&u->ring, seen);
    u->stashing = 0;
}

/* Hand over stashed events, dropping READABLEs of watches removed since they were stashed. */
static int uring_unstash(uring_be *u, bt_io_event *evs, int max)
{
    const uring_stashed *stash = u->stash.buf;
    int n = 0;
    while (n < max && u->stash.head < u->stash.count) {
        const uring_stashed *e = &stash[u->stash.head++];
        if (e->fd >= 0) {
            const bti_io_watch *w = bti_io_watch_get(&u->base, e->fd);
            if (!w || w->gen != e->gen)
                continue;
        }
        evs[n++] = e->ev;
    }
    return n;
}

static int uring_wait(bt_io *io, bt_io_event *evs, int max, int timeout_ms)
{
    uring_be *u = (uring_be *)io;
    int n = uring_unstash(u, evs, max);
    if (n)
        timeout_ms = 0; /* events in hand never wait behind a timeout; still collect what is ready */
    if (n == max) {
        if (io_uring_sq_ready(&u->ring)) {
            int rc = io_uring_submit(&u->ring);
            if (rc < 0 && rc != -EBUSY)
                return rc;
        }
        return n;
    }
    uint64_t deadline = 0; /* set by the first wait that needs it: completions already here skip the clock */
    for (;;) {
        bool ready = io_uring_cq_ready(&u->ring) > 0;
        bool expired = timeout_ms == 0;
        int rc;
        if (ready || timeout_ms == 0) {
            /* Nothing to wait for: submit what is queued; with nothing queued either, a bare
             * io_uring_enter(GETEVENTS) still runs deferred task work and flushes an overflowed CQ. */
            if (io_uring_sq_ready(&u->ring))
                rc = io_uring_submit(&u->ring);
            else
                rc = ready ? 0 : io_uring_get_events(&u->ring);
        } else {
            struct __kernel_timespec ts, *tsp = NULL;
            if (timeout_ms > 0) {
                uint64_t now = bt_now_ns();
                if (deadline == 0)
                    deadline = now + (uint64_t)timeout_ms * 1000000u;
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
        /* -EBUSY: the CQ overflowed and the kernel wants it drained first, which reaping does. */
        if (rc < 0 && rc != -EBUSY)
            return n ? n : rc;
        n += uring_reap(u, evs + n, max - n);
        if (n > 0 || expired) {
            /* Re-arms queued while reaping go out now, not at the caller's next wait. */
            if (io_uring_sq_ready(&u->ring))
                io_uring_submit(&u->ring);
            return n;
        }
        /* Only completions without events (removals, stale polls): wait for what is left of the time. */
    }
}

static void uring_close(bt_io *io)
{
    uring_be *u = (uring_be *)io;
    io_uring_queue_exit(&u->ring);
    free(u->stash.buf);
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
    struct io_uring_params p = {0};
    p.flags = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_CLAMP | IORING_SETUP_CQSIZE;
    /* A CQ well above the SQ: every watch may post a completion per wait on top of the sends, and an
     * overflow makes the kernel end multishot polls (we re-arm, at the price of a repeated READABLE). */
    p.cq_entries = entries * 8 < 4096 ? 4096 : entries * 8;
    int rc = io_uring_queue_init_params(entries, &u->ring, &p);
    if (rc == -EINVAL) {
        memset(&p, 0, sizeof(p));
        p.flags = IORING_SETUP_CLAMP;
        rc = io_uring_queue_init_params(entries, &u->ring, &p);
    }
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
