/*
 * io.c -- the I/O engine's public face: backend choice, argument checks shared by both backends, and the
 * watch table (see io_internal.h).  The backends live in io_epoll.c and io_uring.c.
 */
#include "io_internal.h"

#include <stdlib.h>

int bti_io_watch_add(bt_io *io, int fd, uint64_t tag)
{
    size_t i = (size_t)fd;
    if (i < io->nwatches && io->watches[i].used)
        return -EEXIST;
    if (i >= io->nwatches) {
        size_t n = io->nwatches ? io->nwatches : 64;
        while (n <= i)
            n *= 2;
        bti_io_watch *w = realloc(io->watches, n * sizeof(*w));
        if (!w)
            return -ENOMEM;
        memset(w + io->nwatches, 0, (n - io->nwatches) * sizeof(*w));
        io->watches = w;
        io->nwatches = n;
    }
    io->gen = (io->gen + 1) & BTI_IO_GEN_MASK;
    io->watches[i] = (bti_io_watch){.tag = tag, .gen = io->gen, .used = 1};
    return (int)io->gen;
}

const bti_io_watch *bti_io_watch_get(const bt_io *io, int fd)
{
    if (fd < 0 || (size_t)fd >= io->nwatches || !io->watches[fd].used)
        return NULL;
    return &io->watches[fd];
}

int bti_io_watch_del(bt_io *io, int fd, uint64_t tag)
{
    const bti_io_watch *w = bti_io_watch_get(io, fd);
    if (!w || w->tag != tag)
        return -ENOENT;
    int gen = (int)w->gen;
    io->watches[fd].used = 0;
    return gen;
}

void *bti_io_fifo_slot(bti_io_fifo *q, size_t elem)
{
    if (q->head == q->count)
        q->head = q->count = 0;
    if (q->count == q->cap) {
        if (q->head) {
            memmove(q->buf, (uint8_t *)q->buf + q->head * elem, (q->count - q->head) * elem);
            q->count -= q->head;
            q->head = 0;
        } else {
            size_t cap = q->cap ? q->cap * 2 : 64;
            void *b = realloc(q->buf, cap * elem);
            if (!b)
                return NULL;
            q->buf = b;
            q->cap = cap;
        }
    }
    return (uint8_t *)q->buf + q->count * elem;
}

int bt_io_open(int backend, unsigned entries, bt_io **out)
{
    if (!out)
        return -EINVAL;
    if (entries == 0)
        entries = 256;
    switch (backend) {
    case BT_IO_EPOLL:
        return bti_io_epoll_open(entries, out);
    case BT_IO_URING:
#ifdef BT_HAVE_LIBURING
        return bti_io_uring_open(entries, out);
#else
        return -EOPNOTSUPP;
#endif
    case BT_IO_AUTO: {
#ifdef BT_HAVE_LIBURING
        /* The environment override exists for operators (a kernel whose io_uring misbehaves) and for tests;
         * it only steers the automatic choice, an explicit BT_IO_URING is honoured. */
        const char *env = getenv("BATON_IO");
        if (!env || strcmp(env, "epoll") != 0) {
            if (bti_io_uring_open(entries, out) == 0)
                return 0;
        }
#endif
        return bti_io_epoll_open(entries, out);
    }
    default:
        return -EINVAL;
    }
}

void bt_io_close(bt_io *io)
{
    if (!io)
        return;
    free(io->watches); /* the table is this layer's; the backend then frees the rest and the handle */
    io->ops->close(io);
}

int bt_io_backend(const bt_io *io)
{
    return io ? io->backend : -EINVAL;
}

int bt_io_watch(bt_io *io, int fd, uint64_t tag)
{
    if (!io || fd < 0 || tag > BT_IO_TAG_MAX)
        return -EINVAL;
    return io->ops->watch(io, fd, tag);
}

int bt_io_unwatch(bt_io *io, int fd, uint64_t tag)
{
    if (!io || fd < 0 || tag > BT_IO_TAG_MAX)
        return -EINVAL;
    return io->ops->unwatch(io, fd, tag);
}

int bt_io_send(bt_io *io, int fd, const void *buf, uint32_t len, uint64_t tag)
{
    /* len <= INT32_MAX: the byte count comes back in bt_io_event.result, an int32. */
    if (!io || fd < 0 || tag > BT_IO_TAG_MAX || len > INT32_MAX || (len && !buf))
        return -EINVAL;
    return io->ops->send(io, fd, buf, len, tag);
}

int bt_io_wait(bt_io *io, bt_io_event *evs, int max, int timeout_ms)
{
    if (!io || !evs || max <= 0)
        return -EINVAL;
    return io->ops->wait(io, evs, max, timeout_ms < 0 ? -1 : timeout_ms);
}
