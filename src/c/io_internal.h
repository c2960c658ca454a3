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
    void (*close)(bt_io *io); /* releases the backend's resources and the handle itself */
} bti_io_ops;

/* One slot of the tag -> fd hash (open addressing, linear probing). */
typedef struct bti_io_slot {
    uint64_t tag;
    int32_t fd;
    int32_t state; /* 0 empty, 1 used, 2 deleted */
} bti_io_slot;

/*
 * Every watch is recorded here, by tag (io_uring completions carry only the tag, and a multishot poll the
 * kernel ended must be re-armed on its fd) and by fd (so both backends refuse a second watch on one fd the
 * same way).  The backends embed bt_io as their first member.
 */
struct bt_io {
    const bti_io_ops *ops;
    int backend;
    bti_io_slot *slots;
    uint32_t nslots; /* power of two, or 0 before the first watch */
    uint32_t used;   /* live entries */
    uint32_t dead;   /* deleted markers still occupying slots */
    uint8_t *fd_watched; /* fd_watched[fd] != 0 while fd has a watch */
    size_t fd_cap;
};

/* Record a watch: -EEXIST when the tag or the fd already has one, -ENOMEM. */
int bti_io_watch_add(bt_io *io, int fd, uint64_t tag);
/* The fd watched under tag, or -ENOENT. */
int bti_io_watch_find(const bt_io *io, uint64_t tag);
/* Forget the watch tag (on fd, or any fd when fd < 0).  Returns its fd, or -ENOENT. */
int bti_io_watch_del(bt_io *io, int fd, uint64_t tag);
/* Free the table (the backends call it from their close). */
void bti_io_watch_fini(bt_io *io);

int bti_io_epoll_open(unsigned entries, bt_io **out);
#ifdef BT_HAVE_LIBURING
int bti_io_uring_open(unsigned entries, bt_io **out);
#endif

#endif
