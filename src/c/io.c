/*
 * io.c -- the I/O engine's public face: backend choice, argument checks shared by both backends, and the
 * watch table (see io_internal.h).  The backends live in io_epoll.c and io_uring.c.
 */
#include "io_internal.h"

#include <stdlib.h>

/* Fibonacci hashing: tags are often small consecutive integers, which this spreads over the table. */
static uint32_t io_hash(uint64_t tag, uint32_t nslots)
{
    return (uint32_t)((tag * 0x9E3779B97F4A7C15ull) >> 32) & (nslots - 1);
}

static bti_io_slot *io_slot_find(const bt_io *io, uint64_t tag)
{
    if (!io->nslots)
        return NULL;
    for (uint32_t i = io_hash(tag, io->nslots), k = 0; k < io->nslots; i = (i + 1) & (io->nslots - 1), k++) {
        bti_io_slot *s = &io->slots[i];
        if (s->state == 0)
            return NULL;
        if (s->state == 1 && s->tag == tag)
            return s;
    }
    return NULL;
}

/* Rebuild the hash with room for `want` entries at load <= 1/2, dropping deleted markers. */
static int io_rehash(bt_io *io, uint32_t want)
{
    uint32_t n = 16;
    while (n < want * 2)
        n *= 2;
    bti_io_slot *slots = calloc(n, sizeof(*slots));
    if (!slots)
        return -ENOMEM;
    for (uint32_t j = 0; j < io->nslots; j++) {
        bti_io_slot *s = &io->slots[j];
        if (s->state != 1)
            continue;
        uint32_t i = io_hash(s->tag, n);
        while (slots[i].state)
            i = (i + 1) & (n - 1);
        slots[i] = *s;
    }
    free(io->slots);
    io->slots = slots;
    io->nslots = n;
    io->dead = 0;
    return 0;
}

int bti_io_watch_add(bt_io *io, int fd, uint64_t tag)
{
    if ((size_t)fd < io->fd_cap && io->fd_watched[fd])
        return -EEXIST;
    if (io_slot_find(io, tag))
        return -EEXIST;
    if ((size_t)fd >= io->fd_cap) {
        size_t cap = io->fd_cap ? io->fd_cap : 64;
        while (cap <= (size_t)fd)
            cap *= 2;
        uint8_t *w = realloc(io->fd_watched, cap);
        if (!w)
            return -ENOMEM;
        memset(w + io->fd_cap, 0, cap - io->fd_cap);
        io->fd_watched = w;
        io->fd_cap = cap;
    }
    if ((io->used + io->dead + 1) * 2 > io->nslots) {
        int rc = io_rehash(io, io->used + 1);
        if (rc < 0)
            return rc;
    }
    uint32_t i = io_hash(tag, io->nslots);
    while (io->slots[i].state == 1)
        i = (i + 1) & (io->nslots - 1);
    if (io->slots[i].state == 2)
        io->dead--;
    io->slots[i] = (bti_io_slot){.tag = tag, .fd = fd, .state = 1};
    io->used++;
    io->fd_watched[fd] = 1;
    return 0;
}

int bti_io_watch_find(const bt_io *io, uint64_t tag)
{
    const bti_io_slot *s = io_slot_find(io, tag);
    return s ? s->fd : -ENOENT;
}

int bti_io_watch_del(bt_io *io, int fd, uint64_t tag)
{
    bti_io_slot *s = io_slot_find(io, tag);
    if (!s || (fd >= 0 && s->fd != fd))
        return -ENOENT;
    int wfd = s->fd;
    s->state = 2;
    io->used--;
    io->dead++;
    io->fd_watched[wfd] = 0;
    return wfd;
}

void bti_io_watch_fini(bt_io *io)
{
    free(io->slots);
    free(io->fd_watched);
    io->slots = NULL;
    io->fd_watched = NULL;
    io->nslots = io->used = io->dead = 0;
    io->fd_cap = 0;
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
    if (io)
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
