/*
 * io_internal.h -- the I/O engine's backend vtable and the watch table both backends share.  Private to
 * src/c/io*.c.
 */
#ifndef BATON_IO_INTERNAL_H
#define BATON_IO_INTERNAL_H

#include "baton.h"

typedef struct bti_io_ops {
    int (*watch)(bt_io *io, int fd, uint64_t tag);
    int (*unwatch)(bt_io *io, int fd, uint64_t tag);
    int (*send)(bt_io *io, int fd, const void *buf, uint32_t len, uint64_t tag);
    int (*wait)(bt_io *io, bt_io_event *evs, int max, int timeout_ms);
    void (*close)(bt_io *io); /* releases the backend's resources and the handle (the watch table is gone) */
} bti_io_ops;

/* The watch on one fd.  gen tells a watch apart from an earlier one on the same fd number. */
typedef struct bti_io_watch {
    uint64_t tag;
    uint32_t gen; /* BTI_IO_GEN_BITS wide */
    uint32_t used;
} bti_io_watch;

#define BTI_IO_GEN_BITS 28
#define BTI_IO_GEN_MASK ((1u << BTI_IO_GEN_BITS) - 1)

/*
 * Every watch is recorded here, indexed by fd (fds are small dense integers): both backends refuse a second
 * watch on one fd the same way, and io_uring completions, which carry (gen, fd) rather than the tag, find
 * the tag here and recognise a completion of a watch that no longer exists.  The backends embed bt_io as
 * their first member.
 */
struct bt_io {
    const bti_io_ops *ops;
    int backend;
    uint32_t gen; /* last generation handed out */
    bti_io_watch *watches;
    size_t nwatches; /* slots in watches[] */
};

/* Record a watch: returns its generation (>= 0), or -EEXIST when fd already has one, or -ENOMEM. */
int bti_io_watch_add(bt_io *io, int fd, uint64_t tag);
/* The live watch on fd, or NULL. */
const bti_io_watch *bti_io_watch_get(const bt_io *io, int fd);
/* Forget the watch on fd, which must have this tag: its generation, or -ENOENT. */
int bti_io_watch_del(bt_io *io, int fd, uint64_t tag);

/* Entries of one fixed size, buf[head..count), waiting for the next bt_io_wait: the epoll backend's send
 * results, the io_uring backend's completions taken off the CQ early.  The backend frees buf. */
typedef struct bti_io_fifo {
    void *buf;
    size_t head, count, cap; /* in entries */
} bti_io_fifo;

/* The free slot after the last entry, for one entry of elem bytes (reusing the room of entries already
 * taken, else growing), or NULL when memory runs out.  The caller fills it, then keeps it with count++. */
void *bti_io_fifo_slot(bti_io_fifo *q, size_t elem);

int bti_io_epoll_open(unsigned entries, bt_io **out);
#ifdef BT_HAVE_LIBURING
int bti_io_uring_open(unsigned entries, bt_io **out);
#endif

#endif
