/*
 * router.c -- the data plane of docs/protocol.md: accepts clients, routes their frames, runs the work
 * queues with credit-based dispatch, and talks to the coordinator over a ring pair.  docs/router.md has the
 * design; the short version:
 *
 *   - one thread, one loop; a *turn* reads the coordinator ring, every client ring and the sockets that
 *     have input, routes every frame into per-connection staging buffers (one per priority), and ends by
 *     sending each touched connection's staged bytes with ONE sendmsg (higher priority first) and
 *     publishing everything for the coordinator with ONE ring publish;
 *   - memory is reused: staging buffers, the coordinator batch and queued task records are recycled, so a
 *     frame in steady state costs no malloc;
 *   - nothing a client sends can stop the loop: every length is checked, a bad stream is answered and
 *     closed, a slow reader is closed when its bounded output buffer overflows.
 */
#include "baton.h"
#include "router_internal.h"

#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define RT_OUT_LIMIT_DEFAULT (8u << 20)
#define RT_IN_INITIAL 4096u
#define RT_IN_GROW_MAX (256u << 10)
#define RT_READS_PER_TURN 8       /* socket reads per connection per turn: fairness between clients */
#define RT_RING_RECORDS_PER_TURN 512
#define RT_MAX_EVENTS 256
#define RT_IDLE_WAIT_MS 100       /* a sleeping router wakes this often to check the coordinator is alive */
#define RT_BACKLOG_WAIT_MS 1      /* ... and this often while a ring backlog waits for room */
#define RT_SOCK_POLL_NS 20000ull  /* while rings are busy, poll the sockets at least this often */
#define RT_DRAIN_NS 2000000000ull /* a closing connection gets this long to take what is queued for it */
#define RT_SHRINK_BYTES (1u << 20)

/* Tags of the I/O engine's watches: kind in the low 2 bits, connection slot above. */
#define RT_TAG_LISTEN 0ull
#define RT_TAG_COORD_BELL 1ull
#define RT_TAG_WRITE_EP 2ull
#define RT_TAG_CONN 4ull /* (slot << 2) | 0 socket, | 1 ring doorbell */
#define RT_TAG(slot, kind) ((((uint64_t)(slot) + 1) << 2) | (kind))

enum { RT_OPEN = 1, RT_CLOSING, RT_DRAINING };
enum { RT_RING_NONE = 0, RT_RING_PENDING, RT_RING_ACTIVE };

/* ------------------------------------------------------------------------------------------------ */
/* Small helpers: growable byte buffers, little-endian loads and stores, a u64 -> u32 hash map.       */
/* ------------------------------------------------------------------------------------------------ */

typedef struct rt_buf {
    uint8_t *p;
    size_t len, cap, off; /* bytes [off, len) are live; off is used by buffers consumed from the front */
} rt_buf;

static int buf_reserve(rt_buf *b, size_t extra)
{
    if (b->cap - b->len >= extra)
        return 0;
    if (b->off) { /* reclaim the consumed front before growing */
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->cap - b->len >= extra)
            return 0;
    }
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < extra)
        cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p)
        return -ENOMEM;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_append(rt_buf *b, const void *d, size_t n)
{
    if (n == 0)
        return 0;
    if (buf_reserve(b, n) < 0)
        return -ENOMEM;
    memcpy(b->p + b->len, d, n);
    b->len += n;
    return 0;
}

static size_t buf_live(const rt_buf *b)
{
    return b->len - b->off;
}

static void buf_consume(rt_buf *b, size_t n)
{
    b->off += n;
    if (b->off >= b->len) {
        b->off = b->len = 0;
        if (b->cap > RT_SHRINK_BYTES) { /* a burst is over: give its memory back */
            free(b->p);
            b->p = NULL;
            b->cap = 0;
        }
    }
}

static void buf_free(rt_buf *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

static uint32_t ld32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t ld64(const uint8_t *p)
{
    return (uint64_t)ld32(p) | (uint64_t)ld32(p + 4) << 32;
}

static void st64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

typedef struct rt_map {
    uint64_t *keys;
    uint32_t *vals;
    uint8_t *used;
    uint32_t cap, n; /* cap is a power of two (or 0) */
} rt_map;

static uint32_t map_hash(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return (uint32_t)k;
}

static int map_get(const rt_map *m, uint64_t k, uint32_t *val)
{
    if (!m->cap)
        return 0;
    uint32_t mask = m->cap - 1;
    for (uint32_t i = map_hash(k) & mask;; i = (i + 1) & mask) {
        if (!m->used[i])
            return 0;
        if (m->keys[i] == k) {
            *val = m->vals[i];
            return 1;
        }
    }
}

static int map_grow(rt_map *m);

static int map_put(rt_map *m, uint64_t k, uint32_t v)
{
    if ((m->n + 1) * 2 > m->cap && map_grow(m) < 0)
        return -ENOMEM;
    uint32_t mask = m->cap - 1;
    uint32_t i = map_hash(k) & mask;
    while (m->used[i] && m->keys[i] != k)
        i = (i + 1) & mask;
    if (!m->used[i])
        m->n++;
    m->used[i] = 1;
    m->keys[i] = k;
    m->vals[i] = v;
    return 0;
}

static int map_grow(rt_map *m)
{
    rt_map nm = {0};
    nm.cap = m->cap ? m->cap * 2 : 64;
    nm.keys = malloc(nm.cap * sizeof(*nm.keys));
    nm.vals = malloc(nm.cap * sizeof(*nm.vals));
    nm.used = calloc(nm.cap, 1);
    if (!nm.keys || !nm.vals || !nm.used) {
        free(nm.keys);
        free(nm.vals);
        free(nm.used);
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < m->cap; i++)
        if (m->used[i])
            map_put(&nm, m->keys[i], m->vals[i]); /* cannot grow: half empty */
    free(m->keys);
    free(m->vals);
    free(m->used);
    *m = nm;
    return 0;
}

/* Linear probing with backward-shift deletion: no tombstones, so lookups stay short under churn. */
static void map_del(rt_map *m, uint64_t k)
{
    if (!m->cap)
        return;
    uint32_t mask = m->cap - 1;
    uint32_t i = map_hash(k) & mask;
    while (m->used[i] && m->keys[i] != k)
        i = (i + 1) & mask;
    if (!m->used[i])
        return;
    m->used[i] = 0;
    m->n--;
    for (uint32_t j = (i + 1) & mask; m->used[j]; j = (j + 1) & mask) {
        uint32_t h = map_hash(m->keys[j]) & mask;
        /* The entry at j may stay when its home h lies cyclically in (i, j]. */
        if (i <= j ? (i < h && h <= j) : (i < h || h <= j))
            continue;
        m->keys[i] = m->keys[j];
        m->vals[i] = m->vals[j];
        m->used[i] = 1;
        m->used[j] = 0;
        i = j;
    }
}

static void map_free(rt_map *m)
{
    free(m->keys);
    free(m->vals);
    free(m->used);
    memset(m, 0, sizeof(*m));
}

/* A growable array of u32 (connection slots). */
typedef struct rt_u32v {
    uint32_t *v;
    uint32_t n, cap;
} rt_u32v;

static int u32v_push(rt_u32v *a, uint32_t x)
{
    if (a->n == a->cap) {
        uint32_t cap = a->cap ? a->cap * 2 : 16;
        uint32_t *v = realloc(a->v, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
    return 0;
}

/* Remove x (order not kept); 1 when it was there. */
static int u32v_remove(rt_u32v *a, uint32_t x)
{
    for (uint32_t i = 0; i < a->n; i++) {
        if (a->v[i] == x) {
            a->v[i] = a->v[--a->n];
            return 1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* msgpack writer: just what the notifications need (uints, short strings, arrays, maps).            */
/* ------------------------------------------------------------------------------------------------ */

static void mp_byte(rt_buf *b, uint8_t x)
{
    buf_append(b, &x, 1);
}

static void mp_be(rt_buf *b, uint8_t tag, uint64_t v, int bytes)
{
    uint8_t t[9];
    t[0] = tag;
    for (int i = 0; i < bytes; i++)
        t[1 + i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
    buf_append(b, t, (size_t)bytes + 1);
}

static void mp_uint(rt_buf *b, uint64_t v)
{
    if (v < 128)
        mp_byte(b, (uint8_t)v);
    else if (v <= 0xff)
        mp_be(b, 0xcc, v, 1);
    else if (v <= 0xffff)
        mp_be(b, 0xcd, v, 2);
    else if (v <= 0xffffffffull)
        mp_be(b, 0xce, v, 4);
    else
        mp_be(b, 0xcf, v, 8);
}

static void mp_array(rt_buf *b, uint32_t n)
{
    if (n < 16)
        mp_byte(b, (uint8_t)(0x90 | n));
    else if (n <= 0xffff)
        mp_be(b, 0xdc, n, 2);
    else
        mp_be(b, 0xdd, n, 4);
}

static void mp_map(rt_buf *b, uint32_t n)
{
    if (n < 16)
        mp_byte(b, (uint8_t)(0x80 | n));
    else
        mp_be(b, 0xde, n, 2);
}

static void mp_str(rt_buf *b, const char *s)
{
    size_t n = strlen(s);
    if (n < 32)
        mp_byte(b, (uint8_t)(0xa0 | n));
    else if (n <= 0xff)
        mp_be(b, 0xd9, n, 1);
    else
        mp_be(b, 0xda, n & 0xffff, 2);
    buf_append(b, s, n > 0xffff ? 0xffff : n);
}

/* ------------------------------------------------------------------------------------------------ */
/* State.                                                                                             */
/* ------------------------------------------------------------------------------------------------ */

/* A TASK waiting in a work queue: the whole frame as the coordinator sent it.  Records are recycled
 * through a free list, so a busy queue stops allocating once it has seen its largest task. */
typedef struct rt_task {
    struct rt_task *next;
    uint64_t dispatch_id;
    uint32_t len, cap;
    uint8_t data[];
} rt_task;

typedef struct rt_fifo {
    rt_task *head, *tail;
} rt_fifo;

typedef struct rt_queue {
    uint64_t id;
    rt_fifo fifo[BT_PRIO_COUNT]; /* CRITICAL first */
    uint32_t ntasks;
    rt_u32v agents; /* connection slots serving this queue */
    uint32_t rr;    /* round-robin cursor into agents */
} rt_queue;

/* Topic subscribers or group members. */
typedef struct rt_set {
    uint64_t id;
    rt_u32v slots;
} rt_set;

typedef struct rt_sets {
    rt_map map; /* id -> index in v */
    rt_set *v;
    uint32_t n, cap;
} rt_sets;

typedef struct rt_conn {
    int state;
    int fd;
    uint32_t slot;
    uint64_t ep;
    bt_peercred cred;
    /* input: bytes [0, in_len) not yet parsed */
    uint8_t *in;
    size_t in_len, in_cap;
    int in_listed; /* in the router's readable list */
    int eof;
    /* output */
    rt_buf out;                     /* socket bytes not yet sent */
    rt_buf stage[BT_PRIO_COUNT];    /* this turn's frames for the socket, by priority */
    rt_buf rstage[2];               /* this turn's CRITICAL and HIGH frames for the r2c ring */
    rt_buf backlog;                 /* ring frames that found r2c full, in order */
    size_t staged;                  /* bytes in stage[] and rstage[] */
    int dirty;                      /* in the router's dirty list */
    int write_watched;              /* registered for EPOLLOUT */
    /* agent */
    uint64_t queue;  /* 0: serves no queue */
    uint32_t credit;
    uint64_t *held; /* dispatch ids without RESULT */
    uint32_t nheld, held_cap;
    /* rings */
    int ring_state;
    bt_ring *c2r, *r2c;
    int c2r_bell, r2c_bell;
    uint64_t ring_corr;
    /* closing */
    int drop_output; /* close without flushing (a slow reader, a dead socket) */
    uint64_t drain_deadline;
    char reason[120];
} rt_conn;

typedef struct rt_stats {
    uint64_t accepted, refused, closed, closed_slow, frames_in, frames_out, bytes_out, coord_in, coord_out,
        tasks_in, tasks_queued_peak, dispatched, results, revoked, errors_sent, bad_frames, unknown_dest,
        ring_setups, ring_backlog, coord_full, turns, sleeps;
} rt_stats;

struct bt_router {
    bt_router_config cfg;
    bt_io *io;
    bt_ring *cin, *cout;
    int wep; /* epoll set of connections waiting for room to send (EPOLLOUT) */
    uint32_t next_n;
    int stop, exit_rc, paused, accept_retry;
    /* connections */
    rt_conn **conns;
    uint32_t nslots, conns_cap;
    rt_u32v free_slots;
    rt_map eps; /* endpoint id -> slot */
    uint32_t nopen;
    rt_u32v dirty, readable, closing, ringconns, draining;
    /* routing state */
    rt_sets topics, groups;
    rt_map qmap; /* queue id -> index */
    rt_queue **queues;
    uint32_t nqueues, qcap;
    rt_task *free_tasks;
    uint32_t queued_total;
    /* coordinator output: frames back to back in cbuf with their sizes in clens ([clen_off, nclens) live) */
    rt_buf cbuf;
    uint32_t *clens;
    uint32_t nclens, clens_cap, clen_off;
    rt_buf disp; /* this turn's DISPATCHED pairs, as msgpack uints */
    uint32_t ndisp;
    rt_buf pay;  /* scratch for payloads the router writes */
    rt_buf scratch;
    uint64_t last_sock_poll, last_gone_check;
    bt_io_event evs[RT_MAX_EVENTS];
    rt_stats st;
};

static void conn_mark_close(bt_router *r, rt_conn *c, int drop_output, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void rt_log(bt_router *r, const char *level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* ------------------------------------------------------------------------------------------------ */
/* Output: to the coordinator (ring batch) and to connections (staging, then one send per turn).      */
/* ------------------------------------------------------------------------------------------------ */

static void hdr_init(bt_frame_hdr *h, uint8_t type, uint8_t prio, uint8_t flags, uint64_t src, uint64_t dst,
                     uint64_t corr)
{
    memset(h, 0, sizeof(*h));
    h->type = type;
    h->priority = prio < BT_PRIO_COUNT ? prio : BT_PRIO_NORMAL;
    h->flags = flags;
    h->source = src;
    h->destination = dst;
    h->correlation_id = corr;
    h->send_ts_ns = bt_now_ns();
}

/* Append one frame to the coordinator batch; published at the end of the turn. */
static void coord_emit(bt_router *r, const bt_frame_hdr *h, const void *payload, size_t len)
{
    if (r->nclens == r->clens_cap) {
        if (r->clen_off) { /* reclaim lengths already written to the ring */
            memmove(r->clens, r->clens + r->clen_off, (r->nclens - r->clen_off) * sizeof(*r->clens));
            r->nclens -= r->clen_off;
            r->clen_off = 0;
        }
        if (r->nclens == r->clens_cap) {
            uint32_t cap = r->clens_cap ? r->clens_cap * 2 : 256;
            uint32_t *v = realloc(r->clens, cap * sizeof(*v));
            if (!v)
                return;
            r->clens = v;
            r->clens_cap = cap;
        }
    }
    size_t size = BT_FRAME_HEADER_SIZE + len;
    if (buf_reserve(&r->cbuf, size) < 0)
        return;
    int n = bt_frame_encode(r->cbuf.p + r->cbuf.len, size, h, payload, len);
    if (n < 0)
        return;
    r->cbuf.len += (size_t)n;
    r->clens[r->nclens++] = (uint32_t)n;
    r->st.coord_out++;
}

static void rt_log(bt_router *r, const char *level, const char *fmt, ...)
{
    char msg[240];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    r->pay.len = r->pay.off = 0;
    mp_array(&r->pay, 2);
    mp_str(&r->pay, level);
    mp_str(&r->pay, msg);
    bt_frame_hdr h;
    hdr_init(&h, BT_MSG_ROUTER_LOG, BT_PRIO_NORMAL, 0, BT_EP_NONE, BT_EP_COORDINATOR, 0);
    coord_emit(r, &h, r->pay.p, r->pay.len);
}

static void conn_set_dirty(bt_router *r, rt_conn *c)
{
    if (!c->dirty && u32v_push(&r->dirty, c->slot) == 0)
        c->dirty = 1;
}

static size_t conn_pending(const rt_conn *c)
{
    return buf_live(&c->out) + c->staged + buf_live(&c->backlog);
}

/*
 * Room in connection c's staging buffer for a frame of size bytes at priority prio: the ring's staging for
 * CRITICAL/HIGH once the client has a ring (and the frame fits one record), the socket's otherwise.  NULL
 * when the frame is dropped: the connection is closing, or it would overflow the output bound (then the
 * connection is closed as a slow reader).
 */
static uint8_t *conn_stage(bt_router *r, rt_conn *c, size_t size, int prio)
{
    if (c->state != RT_OPEN)
        return NULL;
    if (prio < 0 || prio >= BT_PRIO_COUNT)
        prio = BT_PRIO_NORMAL;
    if (conn_pending(c) + size > r->cfg.out_limit) {
        r->st.closed_slow++;
        conn_mark_close(r, c, 1, "output buffer limit (%u bytes) exceeded: the client does not read",
                        r->cfg.out_limit);
        return NULL;
    }
    rt_buf *b;
    if (c->ring_state == RT_RING_ACTIVE && prio <= BT_PRIO_HIGH && size <= c->r2c->max_record)
        b = &c->rstage[prio];
    else
        b = &c->stage[prio];
    if (buf_reserve(b, size) < 0) {
        conn_mark_close(r, c, 1, "out of memory for output");
        return NULL;
    }
    uint8_t *p = b->p + b->len;
    b->len += size;
    c->staged += size;
    conn_set_dirty(r, c);
    r->st.frames_out++;
    return p;
}

/* Encode a frame straight into c's staging. */
static void conn_emit(bt_router *r, rt_conn *c, const bt_frame_hdr *h, const void *payload, size_t len)
{
    size_t size = BT_FRAME_HEADER_SIZE + len;
    uint8_t *p = conn_stage(r, c, size, h->priority);
    if (p)
        bt_frame_encode(p, size, h, payload, len);
}

/* Copy an encoded frame into c's staging. */
static void conn_emit_raw(bt_router *r, rt_conn *c, const uint8_t *frame, size_t size, int prio)
{
    uint8_t *p = conn_stage(r, c, size, prio);
    if (p)
        memcpy(p, frame, size);
}

/* Error reply {"code", "message"} of the same type and correlation id, to a connection or (c == NULL) to the
 * coordinator.  A frame that is itself an error (about_flags has F_ERROR) is never answered with an error:
 * two peers must not be able to bounce errors at each other through the router. */
static void send_error_flags(bt_router *r, rt_conn *c, uint8_t type, uint8_t prio, uint64_t corr, const char *code,
                             const char *message, uint8_t about_flags)
{
    if (about_flags & BT_FRAME_F_ERROR)
        return;
    r->pay.len = r->pay.off = 0;
    mp_map(&r->pay, 2);
    mp_str(&r->pay, "code");
    mp_str(&r->pay, code);
    mp_str(&r->pay, "message");
    mp_str(&r->pay, message);
    bt_frame_hdr h;
    hdr_init(&h, type, prio, BT_FRAME_F_REPLY | BT_FRAME_F_ERROR, BT_EP_NONE, c ? c->ep : BT_EP_COORDINATOR,
             corr);
    r->st.errors_sent++;
    if (c)
        conn_emit(r, c, &h, r->pay.p, r->pay.len);
    else
        coord_emit(r, &h, r->pay.p, r->pay.len);
}

static void send_error(bt_router *r, rt_conn *c, uint8_t type, uint8_t prio, uint64_t corr, const char *code,
                       const char *message)
{
    send_error_flags(r, c, type, prio, corr, code, message, 0);
}

static rt_conn *conn_by_ep(bt_router *r, uint64_t ep)
{
    uint32_t slot;
    if (!map_get(&r->eps, ep, &slot))
        return NULL;
    rt_conn *c = r->conns[slot];
    return c && c->state == RT_OPEN ? c : NULL;
}

/* ------------------------------------------------------------------------------------------------ */
/* Flushing a connection: the ring first (CRITICAL/HIGH), then one sendmsg for the socket.            */
/* ------------------------------------------------------------------------------------------------ */

/* Write whole frames from p[0..len) into the ring until it is full; returns the bytes written. */
static size_t ring_push_frames(bt_ring *ring, const uint8_t *p, size_t len)
{
    size_t off = 0;
    while (len - off >= BT_FRAME_HEADER_SIZE) {
        uint32_t size = BT_FRAME_HEADER_SIZE + ld32(p + off + 8);
        void *d = bt_ring_reserve(ring, size);
        if (!d)
            break;
        memcpy(d, p + off, size);
        bt_ring_commit(ring);
        off += size;
    }
    return off;
}

static void conn_flush_ring(bt_router *r, rt_conn *c)
{
    int wrote = 0;
    if (buf_live(&c->backlog)) {
        size_t k = ring_push_frames(c->r2c, c->backlog.p + c->backlog.off, buf_live(&c->backlog));
        buf_consume(&c->backlog, k);
        wrote |= k > 0;
    }
    for (int p = 0; p < 2; p++) {
        rt_buf *s = &c->rstage[p];
        if (!s->len)
            continue;
        size_t k = buf_live(&c->backlog) ? 0 : ring_push_frames(c->r2c, s->p, s->len);
        wrote |= k > 0;
        if (k < s->len) {
            /* Full: keep the rest, in order, for the next turns; never the socket (it would overtake). */
            if (buf_append(&c->backlog, s->p + k, s->len - k) < 0)
                conn_mark_close(r, c, 1, "out of memory for the ring backlog");
            r->st.ring_backlog++;
        }
        c->staged -= s->len;
        s->len = 0;
    }
    if (wrote)
        bt_ring_publish(c->r2c); /* one publish (and at most one doorbell) per connection per turn */
}

static void conn_write_watch(bt_router *r, rt_conn *c, int on)
{
    if (on == c->write_watched)
        return;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLET, .data.u32 = c->slot};
    if (epoll_ctl(r->wep, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, c->fd, &ev) == 0 || !on)
        c->write_watched = on;
}

static void conn_flush_sock(bt_router *r, rt_conn *c)
{
    struct iovec iov[1 + BT_PRIO_COUNT];
    int n = 0;
    size_t pend = buf_live(&c->out), total = pend;
    if (pend)
        iov[n++] = (struct iovec){c->out.p + c->out.off, pend};
    for (int p = 0; p < BT_PRIO_COUNT; p++) {
        if (c->stage[p].len) {
            iov[n++] = (struct iovec){c->stage[p].p, c->stage[p].len};
            total += c->stage[p].len;
        }
    }
    if (total == 0) {
        conn_write_watch(r, c, 0);
        return;
    }
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
    ssize_t w = sendmsg(c->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ENOBUFS) {
            conn_mark_close(r, c, 1, "send failed: %s", strerror(errno));
            w = 0;
        } else {
            w = 0;
        }
    }
    r->st.bytes_out += (uint64_t)w;
    size_t done = (size_t)w;
    /* Whatever was not sent moves into out, in order. */
    if (pend) {
        size_t k = done < pend ? done : pend;
        buf_consume(&c->out, k);
        done -= k;
    }
    for (int p = 0; p < BT_PRIO_COUNT; p++) {
        rt_buf *s = &c->stage[p];
        if (!s->len)
            continue;
        size_t k = done < s->len ? done : s->len;
        done -= k;
        if (k < s->len && c->state != RT_DRAINING && !c->drop_output && buf_append(&c->out, s->p + k, s->len - k) < 0)
            conn_mark_close(r, c, 1, "out of memory for output");
        c->staged -= s->len;
        s->len = 0;
    }
    conn_write_watch(r, c, buf_live(&c->out) > 0);
}

static void conn_flush(bt_router *r, rt_conn *c)
{
    if (c->drop_output)
        return;
    if (c->ring_state == RT_RING_ACTIVE)
        conn_flush_ring(r, c);
    conn_flush_sock(r, c);
}

/* ------------------------------------------------------------------------------------------------ */
/* Work queues and credit.                                                                           */
/* ------------------------------------------------------------------------------------------------ */

static rt_queue *queue_get(bt_router *r, uint64_t id, int create)
{
    uint32_t idx;
    if (map_get(&r->qmap, id, &idx))
        return r->queues[idx];
    if (!create)
        return NULL;
    if (r->nqueues == r->qcap) {
        uint32_t cap = r->qcap ? r->qcap * 2 : 16;
        rt_queue **v = realloc(r->queues, cap * sizeof(*v));
        if (!v)
            return NULL;
        r->queues = v;
        r->qcap = cap;
    }
    rt_queue *q = calloc(1, sizeof(*q));
    if (!q || map_put(&r->qmap, id, r->nqueues) < 0) {
        free(q);
        return NULL;
    }
    q->id = id;
    r->queues[r->nqueues++] = q;
    return q;
}

static rt_task *task_alloc(bt_router *r, uint32_t len)
{
    rt_task **pp = &r->free_tasks;
    for (int i = 0; *pp && i < 8; i++, pp = &(*pp)->next) {
        if ((*pp)->cap >= len) {
            rt_task *t = *pp;
            *pp = t->next;
            return t;
        }
    }
    rt_task *t = malloc(sizeof(*t) + len);
    if (t)
        t->cap = len;
    return t;
}

static void task_free(bt_router *r, rt_task *t)
{
    t->next = r->free_tasks;
    r->free_tasks = t;
}

static rt_task *queue_pop(rt_queue *q)
{
    for (int p = 0; p < BT_PRIO_COUNT; p++) {
        rt_fifo *f = &q->fifo[p];
        if (f->head) {
            rt_task *t = f->head;
            f->head = t->next;
            if (!f->head)
                f->tail = NULL;
            q->ntasks--;
            return t;
        }
    }
    return NULL;
}

static int conn_hold(rt_conn *c, uint64_t dispatch_id)
{
    if (c->nheld == c->held_cap) {
        uint32_t cap = c->held_cap ? c->held_cap * 2 : 8;
        uint64_t *v = realloc(c->held, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        c->held = v;
        c->held_cap = cap;
    }
    c->held[c->nheld++] = dispatch_id;
    return 0;
}

/* Among the queue's agents with free credit: the fewest held, then round robin from the cursor. */
static rt_conn *queue_pick(bt_router *r, rt_queue *q)
{
    uint32_t n = q->agents.n, best_i = 0;
    rt_conn *best = NULL;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = (q->rr + k) % n;
        rt_conn *c = r->conns[q->agents.v[i]];
        if (!c || c->state != RT_OPEN || c->nheld >= c->credit)
            continue;
        if (!best || c->nheld < best->nheld) {
            best = c;
            best_i = i;
        }
    }
    if (best)
        q->rr = (best_i + 1) % n;
    return best;
}

/* Hand one TASK frame (as the coordinator sent it) to agent c: destination becomes the agent, the CRC (if
 * any) is recomputed in place, the dispatch is held against c's credit and reported in DISPATCHED. */
static void dispatch(bt_router *r, rt_conn *c, const uint8_t *frame, uint32_t size, uint64_t dispatch_id)
{
    if (conn_hold(c, dispatch_id) < 0) {
        rt_log(r, "error", "out of memory holding dispatch %llu", (unsigned long long)dispatch_id);
        return;
    }
    uint8_t *p = conn_stage(r, c, size, frame[6]);
    if (p) {
        memcpy(p, frame, size);
        st64(p + 24, c->ep);
        if (p[7] & BT_FRAME_F_CRC) {
            /* Re-encode the header only: decode it (the frame was validated on the way in), re-encode with
             * the new destination into a scratch copy, and take its CRC. */
            bt_frame_hdr h;
            if (bt_frame_decode(frame, size, BT_FRAME_MAX_PAYLOAD_LIMIT, &h) == (int)size) {
                h.destination = c->ep;
                bt_frame_encode(p, size, &h, frame + BT_FRAME_HEADER_SIZE, size - BT_FRAME_HEADER_SIZE);
            }
        }
    }
    mp_uint(&r->disp, c->ep);
    mp_uint(&r->disp, dispatch_id);
    r->ndisp++;
    r->st.dispatched++;
}

static void queue_pump(bt_router *r, rt_queue *q)
{
    while (!r->paused && q->ntasks) {
        rt_conn *c = queue_pick(r, q);
        if (!c)
            return;
        rt_task *t = queue_pop(q);
        r->queued_total--;
        dispatch(r, c, t->data, t->len, t->dispatch_id);
        task_free(r, t);
    }
}

static void task_push(bt_router *r, const bt_frame_hdr *h, const uint8_t *frame, uint32_t size)
{
    r->st.tasks_in++;
    rt_queue *q = queue_get(r, h->destination, 1);
    if (!q) {
        send_error(r, NULL, BT_MSG_TASK, h->priority, h->correlation_id, "internal", "router out of memory");
        return;
    }
    if (!r->paused && q->ntasks == 0) {
        rt_conn *c = queue_pick(r, q);
        if (c) { /* the common case under load: straight through, never copied into the queue */
            dispatch(r, c, frame, size, h->correlation_id);
            return;
        }
    }
    rt_task *t = task_alloc(r, size);
    if (!t) {
        send_error(r, NULL, BT_MSG_TASK, h->priority, h->correlation_id, "internal", "router out of memory");
        return;
    }
    t->next = NULL;
    t->dispatch_id = h->correlation_id;
    t->len = size;
    memcpy(t->data, frame, size);
    rt_fifo *f = &q->fifo[h->priority];
    if (f->tail)
        f->tail->next = t;
    else
        f->head = t;
    f->tail = t;
    q->ntasks++;
    if (++r->queued_total > r->st.tasks_queued_peak)
        r->st.tasks_queued_peak = r->queued_total;
}

static int queue_revoke(bt_router *r, uint64_t qid, uint64_t dispatch_id)
{
    rt_queue *q = queue_get(r, qid, 0);
    if (!q)
        return 0;
    for (int p = 0; p < BT_PRIO_COUNT; p++) {
        rt_task *prev = NULL;
        for (rt_task *t = q->fifo[p].head; t; prev = t, t = t->next) {
            if (t->dispatch_id != dispatch_id)
                continue;
            if (prev)
                prev->next = t->next;
            else
                q->fifo[p].head = t->next;
            if (q->fifo[p].tail == t)
                q->fifo[p].tail = prev;
            q->ntasks--;
            r->queued_total--;
            task_free(r, t);
            r->st.revoked++;
            return 1;
        }
    }
    return 0;
}

static void agent_leave_queue(bt_router *r, rt_conn *c)
{
    if (!c->queue)
        return;
    rt_queue *q = queue_get(r, c->queue, 0);
    if (q) {
        u32v_remove(&q->agents, c->slot);
        if (q->rr >= q->agents.n)
            q->rr = 0;
    }
    c->queue = 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Topics and groups.                                                                                 */
/* ------------------------------------------------------------------------------------------------ */

static rt_set *sets_get(rt_sets *s, uint64_t id)
{
    uint32_t idx;
    return map_get(&s->map, id, &idx) ? &s->v[idx] : NULL;
}

static int sets_add(rt_sets *s, uint64_t id, uint32_t slot)
{
    rt_set *set = sets_get(s, id);
    if (!set) {
        if (s->n == s->cap) {
            uint32_t cap = s->cap ? s->cap * 2 : 16;
            rt_set *v = realloc(s->v, cap * sizeof(*v));
            if (!v)
                return -ENOMEM;
            s->v = v;
            s->cap = cap;
        }
        if (map_put(&s->map, id, s->n) < 0)
            return -ENOMEM;
        set = &s->v[s->n++];
        memset(set, 0, sizeof(*set));
        set->id = id;
    }
    for (uint32_t i = 0; i < set->slots.n; i++)
        if (set->slots.v[i] == slot)
            return 0;
    return u32v_push(&set->slots, slot);
}

/* Drop the set at idx (empty): the last set moves into its place. */
static void sets_drop(rt_sets *s, uint32_t idx)
{
    map_del(&s->map, s->v[idx].id);
    free(s->v[idx].slots.v);
    if (idx != s->n - 1) {
        s->v[idx] = s->v[s->n - 1];
        map_put(&s->map, s->v[idx].id, idx); /* replaces: cannot grow */
    }
    s->n--;
}

static void sets_remove(rt_sets *s, uint64_t id, uint32_t slot)
{
    uint32_t idx;
    if (!map_get(&s->map, id, &idx))
        return;
    u32v_remove(&s->v[idx].slots, slot);
    if (s->v[idx].slots.n == 0)
        sets_drop(s, idx);
}

static void sets_remove_everywhere(rt_sets *s, uint32_t slot)
{
    /* Downwards: sets_drop moves the last set into idx, and that one was already visited. */
    for (uint32_t i = s->n; i-- > 0;) {
        if (u32v_remove(&s->v[i].slots, slot) && s->v[i].slots.n == 0)
            sets_drop(s, i);
    }
}

static void sets_free(rt_sets *s)
{
    for (uint32_t i = 0; i < s->n; i++)
        free(s->v[i].slots.v);
    free(s->v);
    map_free(&s->map);
    memset(s, 0, sizeof(*s));
}

/* ------------------------------------------------------------------------------------------------ */
/* Connections: accept, teardown.                                                                    */
/* ------------------------------------------------------------------------------------------------ */

static void conn_mark_close(bt_router *r, rt_conn *c, int drop_output, const char *fmt, ...)
{
    if (drop_output)
        c->drop_output = 1;
    if (c->state != RT_OPEN)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->reason, sizeof(c->reason), fmt, ap);
    va_end(ap);
    c->state = RT_CLOSING;
    u32v_push(&r->closing, c->slot);
}

static int conn_new(bt_router *r, int fd, const bt_peercred *cred, rt_conn **out)
{
    uint32_t slot;
    if (r->free_slots.n) {
        slot = r->free_slots.v[--r->free_slots.n];
    } else {
        if (r->nslots == r->conns_cap) {
            uint32_t cap = r->conns_cap ? r->conns_cap * 2 : 16;
            rt_conn **v = realloc(r->conns, cap * sizeof(*v));
            if (!v)
                return -ENOMEM;
            r->conns = v;
            r->conns_cap = cap;
        }
        slot = r->nslots++;
        r->conns[slot] = NULL;
    }
    rt_conn *c = calloc(1, sizeof(*c));
    if (!c) {
        u32v_push(&r->free_slots, slot);
        return -ENOMEM;
    }
    c->state = RT_OPEN;
    c->fd = fd;
    c->slot = slot;
    c->cred = *cred;
    c->c2r_bell = c->r2c_bell = -1;
    c->ep = ((uint64_t)r->cfg.generation << 32) | r->next_n;
    r->next_n = r->next_n == UINT32_MAX ? 2 : r->next_n + 1;
    if (map_put(&r->eps, c->ep, slot) < 0) {
        free(c);
        u32v_push(&r->free_slots, slot);
        return -ENOMEM;
    }
    r->conns[slot] = c;
    r->nopen++;
    /* EP_OPEN before any frame of this endpoint: the coordinator batch is in order. */
    r->pay.len = r->pay.off = 0;
    mp_array(&r->pay, 3);
    mp_uint(&r->pay, cred->pid < 0 ? 0 : (uint64_t)cred->pid);
    mp_uint(&r->pay, cred->uid);
    mp_uint(&r->pay, cred->gid);
    bt_frame_hdr h;
    hdr_init(&h, BT_MSG_EP_OPEN, BT_PRIO_HIGH, 0, c->ep, BT_EP_COORDINATOR, 0);
    coord_emit(r, &h, r->pay.p, r->pay.len);
    *out = c;
    return 0;
}

static void conn_free(bt_router *r, rt_conn *c)
{
    if (c->write_watched)
        conn_write_watch(r, c, 0);
    if (c->fd >= 0)
        close(c->fd);
    free(c->in);
    buf_free(&c->out);
    buf_free(&c->backlog);
    for (int p = 0; p < BT_PRIO_COUNT; p++)
        buf_free(&c->stage[p]);
    buf_free(&c->rstage[0]);
    buf_free(&c->rstage[1]);
    free(c->held);
    r->conns[c->slot] = NULL;
    u32v_push(&r->free_slots, c->slot);
    free(c);
}

/* Remove c from everything that routes to it, report its undelivered dispatches, release its rings. */
static void conn_unroute(bt_router *r, rt_conn *c, int notify)
{
    map_del(&r->eps, c->ep);
    sets_remove_everywhere(&r->topics, c->slot);
    sets_remove_everywhere(&r->groups, c->slot);
    agent_leave_queue(r, c);
    bt_io_unwatch(r->io, c->fd, RT_TAG(c->slot, 0));
    if (c->ring_state != RT_RING_NONE) {
        if (c->ring_state == RT_RING_ACTIVE) {
            bt_io_unwatch(r->io, c->c2r_bell, RT_TAG(c->slot, 1));
            u32v_remove(&r->ringconns, c->slot);
        }
        bt_ring_close(c->c2r);
        bt_ring_close(c->r2c);
        close(c->c2r_bell);
        close(c->r2c_bell);
        c->c2r = c->r2c = NULL;
        c->c2r_bell = c->r2c_bell = -1;
        c->ring_state = RT_RING_NONE;
    }
    r->nopen--;
    r->st.closed++;
    if (notify) {
        r->pay.len = r->pay.off = 0;
        mp_array(&r->pay, c->nheld);
        for (uint32_t i = 0; i < c->nheld; i++)
            mp_uint(&r->pay, c->held[i]);
        bt_frame_hdr h;
        hdr_init(&h, BT_MSG_EP_CLOSED, BT_PRIO_HIGH, 0, c->ep, BT_EP_COORDINATOR, 0);
        coord_emit(r, &h, r->pay.p, r->pay.len);
    }
    c->nheld = 0;
}

/* The end of a closing connection: flush what may still go, unroute, then drain or free. */
static void conn_finish_close(bt_router *r, rt_conn *c)
{
    conn_flush(r, c);
    if (c->reason[0])
        rt_log(r, c->drop_output ? "warning" : "info", "endpoint %llu closed: %s", (unsigned long long)c->ep,
               c->reason);
    conn_unroute(r, c, 1);
    if (!c->drop_output && buf_live(&c->out)) {
        /* Let the client take what is queued for it (an error reply, CTL_CLOSE's flush), bounded in time. */
        c->state = RT_DRAINING;
        c->drain_deadline = bt_now_ns() + RT_DRAIN_NS;
        shutdown(c->fd, SHUT_RD);
        u32v_push(&r->draining, c->slot);
        return;
    }
    conn_free(r, c);
}

static void rt_accept(bt_router *r)
{
    for (;;) {
        /* The listening socket is the daemon's and may be blocking (its file description is shared, so we do
         * not change its flags): ask first, so accept never waits. */
        struct pollfd pfd = {.fd = r->cfg.listen_fd, .events = POLLIN};
        if (poll(&pfd, 1, 0) <= 0 || !(pfd.revents & POLLIN)) {
            r->accept_retry = 0;
            return;
        }
        int fd = bt_sock_accept(r->cfg.listen_fd);
        if (fd == -EAGAIN) {
            r->accept_retry = 0;
            return;
        }
        if (fd < 0) {
            if (fd == -ECONNABORTED || fd == -EINTR)
                continue;
            /* EMFILE and friends: the edge is consumed, so retry on the next idle wake-up. */
            if (!r->accept_retry)
                rt_log(r, "error", "accept failed: %s", strerror(-fd));
            r->accept_retry = 1;
            return;
        }
        bt_peercred cred;
        int rc = bt_sock_peercred(fd, &cred);
        int ok = rc == 0 && (cred.uid == r->cfg.allowed_uid ||
                             (r->cfg.allowed_gid >= 0 && cred.gid == (uint64_t)r->cfg.allowed_gid));
        if (!ok) {
            r->st.refused++;
            r->pay.len = r->pay.off = 0;
            mp_map(&r->pay, 2);
            mp_str(&r->pay, "code");
            mp_str(&r->pay, "refused");
            mp_str(&r->pay, "message");
            mp_str(&r->pay, "peer uid is not allowed to connect");
            bt_frame_hdr h;
            hdr_init(&h, BT_MSG_HELLO, BT_PRIO_HIGH, BT_FRAME_F_REPLY | BT_FRAME_F_ERROR, BT_EP_NONE, BT_EP_NONE,
                     0);
            uint8_t frame[BT_FRAME_HEADER_SIZE + 96];
            int n = bt_frame_encode(frame, sizeof(frame), &h, r->pay.p, r->pay.len);
            if (n > 0)
                (void)!send(fd, frame, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
            rt_log(r, "warning", "refused a connection from pid %d uid %u gid %u", rc == 0 ? cred.pid : -1,
                   rc == 0 ? cred.uid : 0, rc == 0 ? cred.gid : 0);
            close(fd);
            continue;
        }
        rt_conn *c;
        if (conn_new(r, fd, &cred, &c) < 0) {
            close(fd);
            continue;
        }
        r->st.accepted++;
        /* Reported at once when bytes already wait (the watch is level-checked when made). */
        if (bt_io_watch(r->io, fd, RT_TAG(c->slot, 0)) < 0)
            conn_mark_close(r, c, 1, "cannot watch the socket");
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Frames from clients.                                                                              */
/* ------------------------------------------------------------------------------------------------ */

static void ring_setup(bt_router *r, rt_conn *c, const bt_frame_hdr *h)
{
    uint64_t cap = h->destination ? h->destination : BT_RING_SETUP_DEFAULT_CAPACITY;
    const char *why = NULL;
    if (c->ring_state != RT_RING_NONE)
        why = "this connection already has rings";
    else if (cap < BT_RING_MIN_CAPACITY || cap > BT_RING_SETUP_MAX_CAPACITY || (cap & (cap - 1)))
        why = "ring capacity must be a power of two between 4 KiB and 16 MiB";
    if (!why) {
        int rc = bt_ring_create(cap, BT_RING_CONSUMER, c->ep, &c->c2r);
        if (rc == 0 && (rc = bt_ring_create(cap, BT_RING_PRODUCER, c->ep, &c->r2c)) < 0)
            bt_ring_close(c->c2r);
        if (rc == 0) {
            c->c2r_bell = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
            c->r2c_bell = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
            if (c->c2r_bell < 0 || c->r2c_bell < 0) {
                rc = -errno;
                if (c->c2r_bell >= 0)
                    close(c->c2r_bell);
                if (c->r2c_bell >= 0)
                    close(c->r2c_bell);
                bt_ring_close(c->c2r);
                bt_ring_close(c->r2c);
            }
        }
        if (rc < 0) {
            c->c2r = c->r2c = NULL;
            c->c2r_bell = c->r2c_bell = -1;
            why = "the router could not create the rings";
        }
    }
    if (why) {
        send_error(r, c, BT_MSG_RING_SETUP, h->priority, h->correlation_id, "ring_unavailable", why);
        return;
    }
    bt_ring_set_doorbell(c->r2c, c->r2c_bell);
    bt_ring_set_spin(c->c2r, 0);
    c->ring_state = RT_RING_PENDING; /* RING_READY goes out after the socket bytes before it (end of turn) */
    c->ring_corr = h->correlation_id;
    conn_set_dirty(r, c);
    r->st.ring_setups++;
}

/* Send RING_READY with the four descriptors once nothing else waits on the socket before it. */
static void ring_ready_send(bt_router *r, rt_conn *c)
{
    if (buf_live(&c->out))
        return;
    uint8_t frame[BT_FRAME_HEADER_SIZE];
    bt_frame_hdr h;
    hdr_init(&h, BT_MSG_RING_READY, BT_PRIO_HIGH, BT_FRAME_F_REPLY, BT_EP_NONE, c->ep, c->ring_corr);
    bt_frame_encode(frame, sizeof(frame), &h, NULL, 0);
    int fds[4] = {bt_ring_fd(c->c2r), bt_ring_fd(c->r2c), c->c2r_bell, c->r2c_bell};
    int rc = bt_sock_send_fds(c->fd, frame, sizeof(frame), fds, 4);
    if (rc == -EAGAIN || rc == -EWOULDBLOCK || rc == -EINTR) {
        conn_write_watch(r, c, 1); /* try again when there is room */
        return;
    }
    if (rc != (int)sizeof(frame)) {
        /* A short send would leave half a frame on the stream: the connection cannot go on. */
        conn_mark_close(r, c, 1, "sending RING_READY failed (%d)", rc);
        return;
    }
    r->st.frames_out++;
    if (bt_io_watch(r->io, c->c2r_bell, RT_TAG(c->slot, 1)) < 0 || u32v_push(&r->ringconns, c->slot) < 0) {
        conn_mark_close(r, c, 1, "cannot watch the ring doorbell");
        return;
    }
    c->ring_state = RT_RING_ACTIVE;
}

/* Fan out one frame (already encoded, source set) to every member of a set, maybe except one slot. */
static void fanout(bt_router *r, rt_set *set, const uint8_t *frame, size_t size, int prio, int64_t except)
{
    if (!set)
        return;
    for (uint32_t i = 0; i < set->slots.n; i++) {
        uint32_t slot = set->slots.v[i];
        if ((int64_t)slot == except)
            continue;
        rt_conn *c = r->conns[slot];
        if (c)
            conn_emit_raw(r, c, frame, size, prio);
    }
}

/* Encode h + payload once into the scratch buffer (for fan-out). */
static const uint8_t *encode_scratch(bt_router *r, const bt_frame_hdr *h, const void *payload, size_t len,
                                     size_t *size)
{
    *size = BT_FRAME_HEADER_SIZE + len;
    r->scratch.len = r->scratch.off = 0;
    if (buf_reserve(&r->scratch, *size) < 0)
        return NULL;
    if (bt_frame_encode(r->scratch.p, *size, h, payload, len) < 0)
        return NULL;
    return r->scratch.p;
}

/* Routing shared by client and coordinator frames; from == NULL is the coordinator. */
static void route_common(bt_router *r, rt_conn *from, const bt_frame_hdr *h, const uint8_t *payload)
{
    size_t size;
    const uint8_t *frame;
    switch (h->type) {
    case BT_MSG_PUBLISH:
        frame = encode_scratch(r, h, payload, h->payload_len, &size);
        if (frame)
            fanout(r, sets_get(&r->topics, h->destination), frame, size, h->priority, -1);
        return;
    case BT_MSG_MULTICAST:
        frame = encode_scratch(r, h, payload, h->payload_len, &size);
        if (frame)
            fanout(r, sets_get(&r->groups, h->destination), frame, size, h->priority,
                   from ? (int64_t)from->slot : -1);
        return;
    case BT_MSG_BROADCAST:
        frame = encode_scratch(r, h, payload, h->payload_len, &size);
        if (!frame)
            return;
        for (uint32_t s = 0; s < r->nslots; s++) {
            rt_conn *c = r->conns[s];
            if (c && c != from)
                conn_emit_raw(r, c, frame, size, h->priority);
        }
        return;
    default: {
        /* DIRECT, and anything else addressed to one endpoint. */
        if (h->destination == BT_EP_COORDINATOR && from) {
            coord_emit(r, h, payload, h->payload_len);
            return;
        }
        rt_conn *to = conn_by_ep(r, h->destination);
        if (to) {
            conn_emit(r, to, h, payload, h->payload_len);
            return;
        }
        r->st.unknown_dest++;
        if (!from && (h->flags & BT_FRAME_F_REPLY))
            return; /* a reply for an endpoint that has gone: nobody to tell */
        char msg[96];
        snprintf(msg, sizeof(msg), "no endpoint %llu", (unsigned long long)h->destination);
        send_error_flags(r, from, h->type, h->priority, h->correlation_id, "no_such_endpoint", msg, h->flags);
        return;
    }
    }
}

static void membership(bt_router *r, rt_conn *c, const bt_frame_hdr *h)
{
    int rc = 0;
    switch (h->type) {
    case BT_MSG_SUBSCRIBE:
        rc = sets_add(&r->topics, h->destination, c->slot);
        break;
    case BT_MSG_UNSUBSCRIBE:
        sets_remove(&r->topics, h->destination, c->slot);
        break;
    case BT_MSG_JOIN:
        rc = sets_add(&r->groups, h->destination, c->slot);
        break;
    default:
        sets_remove(&r->groups, h->destination, c->slot);
        break;
    }
    if (rc < 0) {
        send_error(r, c, h->type, h->priority, h->correlation_id, "internal", "router out of memory");
        return;
    }
    if (h->correlation_id) {
        bt_frame_hdr a;
        hdr_init(&a, h->type, h->priority, BT_FRAME_F_REPLY, BT_EP_NONE, c->ep, h->correlation_id);
        a.destination = h->destination;
        conn_emit(r, c, &a, NULL, 0);
    }
}

static void result_in(bt_router *r, rt_conn *c, const bt_frame_hdr *h, const uint8_t *payload)
{
    r->st.results++;
    int found = 0;
    for (uint32_t i = 0; i < c->nheld; i++) {
        if (c->held[i] == h->correlation_id) {
            c->held[i] = c->held[--c->nheld];
            found = 1;
            break;
        }
    }
    coord_emit(r, h, payload, h->payload_len);
    if (!found || !c->queue || r->paused)
        return;
    /* The handoff: this agent's next task goes out in this same turn, without the coordinator. */
    rt_queue *q = queue_get(r, c->queue, 0);
    if (q && q->ntasks && c->nheld < c->credit) {
        rt_task *t = queue_pop(q);
        r->queued_total--;
        dispatch(r, c, t->data, t->len, t->dispatch_id);
        task_free(r, t);
    }
    if (q)
        queue_pump(r, q);
}

/* One validated frame from client c (payload is h->payload_len bytes). */
static void conn_frame(bt_router *r, rt_conn *c, bt_frame_hdr *h, const uint8_t *payload)
{
    r->st.frames_in++;
    h->source = c->ep; /* nobody speaks for another endpoint */
    switch (h->type) {
    case BT_MSG_HELLO:
    case BT_MSG_CALL:
    case BT_MSG_HEARTBEAT:
        coord_emit(r, h, payload, h->payload_len);
        return;
    case BT_MSG_RESULT:
        result_in(r, c, h, payload);
        return;
    case BT_MSG_DIRECT:
    case BT_MSG_PUBLISH:
    case BT_MSG_MULTICAST:
    case BT_MSG_BROADCAST:
        route_common(r, c, h, payload);
        return;
    case BT_MSG_SUBSCRIBE:
    case BT_MSG_UNSUBSCRIBE:
    case BT_MSG_JOIN:
    case BT_MSG_LEAVE:
        membership(r, c, h);
        return;
    case BT_MSG_RING_SETUP:
        ring_setup(r, c, h);
        return;
    case BT_MSG_PING: {
        bt_frame_hdr a;
        hdr_init(&a, BT_MSG_PING, h->priority, BT_FRAME_F_REPLY, BT_EP_NONE, c->ep, h->correlation_id);
        conn_emit(r, c, &a, payload, h->payload_len);
        return;
    }
    case BT_MSG_WELCOME:
    case BT_MSG_TASK:
    case BT_MSG_RING_READY:
    case BT_MSG_EP_OPEN:
    case BT_MSG_EP_CLOSED:
    case BT_MSG_DISPATCHED:
    case BT_MSG_ROUTER_LOG:
    case BT_MSG_ROUTER_STATS:
    case BT_MSG_CTL_AGENT:
    case BT_MSG_CTL_CLOSE:
    case BT_MSG_CTL_REVOKE:
    case BT_MSG_CTL_PAUSE:
    case BT_MSG_CTL_STATS:
    case BT_MSG_CTL_SHUTDOWN:
        send_error_flags(r, c, h->type, h->priority, h->correlation_id, "forbidden",
                         "only the coordinator may send this frame type", h->flags);
        return;
    default: {
        char msg[64];
        snprintf(msg, sizeof(msg), "unknown frame type %u", h->type);
        send_error_flags(r, c, h->type, h->priority, h->correlation_id, "unknown_type", msg, h->flags);
        return;
    }
    }
}

/* A stream that cannot be resynchronised: answer (with the header's type and corr when they can be
 * trusted) and close after the reply. */
static void conn_bad_stream(bt_router *r, rt_conn *c, const uint8_t *p, size_t avail, int rc)
{
    uint8_t type = 0, prio = BT_PRIO_HIGH;
    uint64_t corr = 0;
    if (avail >= BT_FRAME_HEADER_SIZE && ld32(p) == BT_FRAME_MAGIC && p[4] == BT_FRAME_VERSION) {
        type = p[5];
        corr = ld64(p + 32);
        if (p[6] < BT_PRIO_COUNT)
            prio = p[6];
    }
    /* The last frame before the end of the stream goes on the socket, where the client will see the end. */
    if (c->ring_state == RT_RING_ACTIVE && prio <= BT_PRIO_HIGH)
        prio = BT_PRIO_NORMAL;
    r->st.bad_frames++;
    if (rc == -EMSGSIZE) {
        char msg[96];
        snprintf(msg, sizeof(msg), "payload of %u bytes is above the limit of %u", ld32(p + 8),
                 r->cfg.max_payload);
        send_error(r, c, type, prio, corr, "too_large", msg);
    } else {
        send_error(r, c, type, prio, corr, "bad_frame", strerror(-rc));
    }
    conn_mark_close(r, c, 0, "%s: %s", rc == -EMSGSIZE ? "frame too large" : "malformed frame", strerror(-rc));
}

/* Route every complete frame in c's input buffer; keep a partial one. */
static void conn_parse(bt_router *r, rt_conn *c)
{
    size_t off = 0;
    while (c->state == RT_OPEN && off < c->in_len) {
        bt_frame_hdr h;
        int rc = bt_frame_decode(c->in + off, c->in_len - off, r->cfg.max_payload, &h);
        if (rc == -ENODATA)
            break;
        if (rc < 0) {
            conn_bad_stream(r, c, c->in + off, c->in_len - off, rc);
            off = c->in_len;
            break;
        }
        conn_frame(r, c, &h, c->in + off + BT_FRAME_HEADER_SIZE);
        off += (size_t)rc;
    }
    if (c->state != RT_OPEN)
        off = c->in_len;
    if (off) {
        memmove(c->in, c->in + off, c->in_len - off);
        c->in_len -= off;
    }
}

/* Make room for at least want more input bytes (want <= limit - in_len). */
static int conn_in_reserve(rt_conn *c, size_t want, size_t limit)
{
    if (c->in_cap - c->in_len >= want)
        return 0;
    size_t cap = c->in_cap ? c->in_cap : RT_IN_INITIAL;
    while (cap - c->in_len < want)
        cap *= 2;
    if (cap > limit)
        cap = limit;
    uint8_t *p = realloc(c->in, cap);
    if (!p)
        return -ENOMEM;
    c->in = p;
    c->in_cap = cap;
    return 0;
}

static size_t in_limit(const bt_router *r)
{
    return (size_t)BT_FRAME_HEADER_SIZE + r->cfg.max_payload;
}

/* Read c's socket (a bounded number of times per turn); 1 when more may be waiting. */
static int conn_read(bt_router *r, rt_conn *c)
{
    size_t limit = in_limit(r);
    for (int i = 0; i < RT_READS_PER_TURN && c->state == RT_OPEN; i++) {
        /* Room for what completes the pending frame, else a buffer-full; double after a full read. */
        size_t want = c->in_cap > c->in_len ? c->in_cap - c->in_len : 0;
        if (c->in_len >= BT_FRAME_HEADER_SIZE) {
            uint32_t plen = ld32(c->in + 8);
            size_t need = (size_t)BT_FRAME_HEADER_SIZE + plen;
            if (plen <= r->cfg.max_payload && need > c->in_len && need - c->in_len > want)
                want = need - c->in_len;
        }
        if (want < 512)
            want = c->in_cap ? c->in_cap : RT_IN_INITIAL;
        if (want > limit - c->in_len)
            want = limit - c->in_len;
        if (want == 0 || conn_in_reserve(c, want, limit) < 0) {
            conn_mark_close(r, c, 1, "input buffer exhausted");
            return 0;
        }
        size_t room = c->in_cap - c->in_len;
        ssize_t n = recv(c->fd, c->in + c->in_len, room, MSG_DONTWAIT);
        if (n == 0) {
            conn_mark_close(r, c, 1, "%s", "");
            c->reason[0] = '\0'; /* an orderly end of stream is not worth a log line */
            return 0;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            if (errno == EINTR)
                continue;
            conn_mark_close(r, c, 1, "receive failed: %s", strerror(errno));
            return 0;
        }
        c->in_len += (size_t)n;
        conn_parse(r, c);
        if ((size_t)n == room && c->in_cap < RT_IN_GROW_MAX && c->in_cap < limit)
            conn_in_reserve(c, c->in_cap, limit); /* the stream outpaces the buffer: double it */
    }
    return c->state == RT_OPEN;
}

/* A client's c2r ring: each record is one frame. */
static int conn_poll_ring(bt_router *r, rt_conn *c)
{
    int n = 0;
    while (n < RT_RING_RECORDS_PER_TURN && c->state == RT_OPEN) {
        const void *p;
        int len = bt_ring_peek(c->c2r, &p);
        if (len == -EAGAIN)
            break;
        if (len < 0) {
            r->st.bad_frames++;
            conn_mark_close(r, c, 1, "corrupt ring from the client");
            break;
        }
        bt_frame_hdr h;
        int rc = bt_frame_decode(p, (size_t)len, r->cfg.max_payload, &h);
        if (rc != len) {
            conn_bad_stream(r, c, p, (size_t)len, rc < 0 && rc != -ENODATA ? rc : -EBADMSG);
            break;
        }
        conn_frame(r, c, &h, (const uint8_t *)p + BT_FRAME_HEADER_SIZE);
        bt_ring_consume(c->c2r, (uint32_t)len);
        n++;
    }
    bt_ring_release(c->c2r);
    return n;
}

/* ------------------------------------------------------------------------------------------------ */
/* Frames from the coordinator.                                                                      */
/* ------------------------------------------------------------------------------------------------ */

static void ctl_bad(bt_router *r, const bt_frame_hdr *h, size_t want)
{
    char msg[96];
    snprintf(msg, sizeof(msg), "control type %u needs a %zu-byte payload, got %u", h->type, want, h->payload_len);
    send_error(r, NULL, h->type, h->priority, h->correlation_id, "invalid_request", msg);
}

static void stats_reply(bt_router *r, const bt_frame_hdr *req)
{
    const rt_stats *s = &r->st;
    const struct {
        const char *name;
        uint64_t v;
    } kv[] = {
        {"accepted", s->accepted},       {"refused", s->refused},
        {"closed", s->closed},           {"closed_slow", s->closed_slow},
        {"connections", r->nopen},       {"frames_in", s->frames_in},
        {"frames_out", s->frames_out},   {"bytes_out", s->bytes_out},
        {"coord_in", s->coord_in},       {"coord_out", s->coord_out},
        {"tasks_in", s->tasks_in},       {"tasks_queued", r->queued_total},
        {"tasks_queued_peak", s->tasks_queued_peak}, {"dispatched", s->dispatched},
        {"results", s->results},         {"revoked", s->revoked},
        {"errors_sent", s->errors_sent}, {"bad_frames", s->bad_frames},
        {"unknown_destination", s->unknown_dest}, {"ring_setups", s->ring_setups},
        {"ring_backlog_events", s->ring_backlog}, {"coord_ring_full", s->coord_full},
        {"turns", s->turns},             {"sleeps", s->sleeps},
        {"paused", (uint64_t)r->paused}, {"queues", r->nqueues},
        {"topics", r->topics.n},         {"groups", r->groups.n},
    };
    uint32_t n = (uint32_t)(sizeof(kv) / sizeof(kv[0]));
    r->pay.len = r->pay.off = 0;
    mp_map(&r->pay, n);
    for (uint32_t i = 0; i < n; i++) {
        mp_str(&r->pay, kv[i].name);
        mp_uint(&r->pay, kv[i].v);
    }
    bt_frame_hdr h;
    hdr_init(&h, BT_MSG_ROUTER_STATS, req->priority, BT_FRAME_F_REPLY, BT_EP_NONE, BT_EP_COORDINATOR,
             req->correlation_id);
    coord_emit(r, &h, r->pay.p, r->pay.len);
}

static void coord_frame(bt_router *r, const bt_frame_hdr *h, const uint8_t *frame, uint32_t size)
{
    const uint8_t *payload = frame + BT_FRAME_HEADER_SIZE;
    uint32_t plen = h->payload_len;
    r->st.coord_in++;
    switch (h->type) {
    case BT_MSG_TASK:
        task_push(r, h, frame, size);
        return;
    case BT_MSG_CTL_AGENT: {
        if (plen != BT_CTL_AGENT_SIZE) {
            ctl_bad(r, h, BT_CTL_AGENT_SIZE);
            return;
        }
        uint64_t ep = ld64(payload), qid = ld64(payload + 8);
        uint32_t credit = ld32(payload + 16);
        rt_conn *c = conn_by_ep(r, ep);
        if (!c) {
            rt_log(r, "debug", "CTL_AGENT for endpoint %llu, which is not connected", (unsigned long long)ep);
            return;
        }
        if (c->queue != qid) {
            agent_leave_queue(r, c);
            if (qid) {
                rt_queue *q = queue_get(r, qid, 1);
                if (!q || u32v_push(&q->agents, c->slot) < 0) {
                    rt_log(r, "error", "out of memory adding an agent to a queue");
                    return;
                }
                c->queue = qid;
            }
        }
        c->credit = credit;
        if (c->queue) {
            rt_queue *q = queue_get(r, c->queue, 0);
            if (q)
                queue_pump(r, q);
        }
        return;
    }
    case BT_MSG_CTL_CLOSE: {
        if (plen != BT_CTL_CLOSE_SIZE) {
            ctl_bad(r, h, BT_CTL_CLOSE_SIZE);
            return;
        }
        rt_conn *c = conn_by_ep(r, ld64(payload));
        if (c)
            conn_mark_close(r, c, 0, "closed by the coordinator");
        return;
    }
    case BT_MSG_CTL_REVOKE: {
        if (plen != BT_CTL_REVOKE_SIZE) {
            ctl_bad(r, h, BT_CTL_REVOKE_SIZE);
            return;
        }
        uint64_t did = ld64(payload + 8);
        int found = queue_revoke(r, ld64(payload), did);
        r->pay.len = r->pay.off = 0;
        mp_array(&r->pay, 2);
        mp_uint(&r->pay, did);
        mp_uint(&r->pay, (uint64_t)found);
        bt_frame_hdr a;
        hdr_init(&a, BT_MSG_CTL_REVOKE, h->priority, BT_FRAME_F_REPLY, BT_EP_NONE, BT_EP_COORDINATOR,
                 h->correlation_id);
        coord_emit(r, &a, r->pay.p, r->pay.len);
        return;
    }
    case BT_MSG_CTL_PAUSE:
        if (plen != BT_CTL_PAUSE_SIZE) {
            ctl_bad(r, h, BT_CTL_PAUSE_SIZE);
            return;
        }
        r->paused = ld32(payload) != 0;
        if (!r->paused)
            for (uint32_t i = 0; i < r->nqueues; i++)
                queue_pump(r, r->queues[i]);
        return;
    case BT_MSG_CTL_STATS:
        stats_reply(r, h);
        return;
    case BT_MSG_CTL_SHUTDOWN:
        r->stop = 1;
        r->exit_rc = 0;
        return;
    case BT_MSG_SUBSCRIBE:
    case BT_MSG_UNSUBSCRIBE:
    case BT_MSG_JOIN:
    case BT_MSG_LEAVE:
    case BT_MSG_RING_SETUP:
        rt_log(r, "warning", "the coordinator sent frame type %u, which only clients send; ignored", h->type);
        return;
    default:
        route_common(r, NULL, h, payload);
        return;
    }
}

static int poll_coord(bt_router *r)
{
    int n = 0;
    while (n < RT_RING_RECORDS_PER_TURN && !r->stop) {
        const void *p;
        int len = bt_ring_peek(r->cin, &p);
        if (len == -EAGAIN)
            break;
        if (len < 0) {
            r->stop = 1;
            r->exit_rc = len;
            break;
        }
        bt_frame_hdr h;
        int rc = bt_frame_decode(p, (size_t)len, BT_FRAME_MAX_PAYLOAD_LIMIT, &h);
        if (rc == len)
            coord_frame(r, &h, p, (uint32_t)len);
        else
            rt_log(r, "error", "dropped a malformed frame from the coordinator (%d)", rc);
        bt_ring_consume(r->cin, (uint32_t)len);
        n++;
    }
    bt_ring_release(r->cin);
    return n;
}

/* ------------------------------------------------------------------------------------------------ */
/* The loop.                                                                                         */
/* ------------------------------------------------------------------------------------------------ */

static void drain_eventfd(int fd)
{
    uint64_t v;
    while (read(fd, &v, sizeof(v)) == (ssize_t)sizeof(v))
        ;
}

static void rt_write_events(bt_router *r)
{
    struct epoll_event ev[64];
    int n;
    while ((n = epoll_wait(r->wep, ev, 64, 0)) > 0) {
        for (int i = 0; i < n; i++) {
            uint32_t slot = ev[i].data.u32;
            rt_conn *c = slot < r->nslots ? r->conns[slot] : NULL;
            if (c)
                conn_set_dirty(r, c);
        }
        if (n < 64)
            break;
    }
}

static void rt_events(bt_router *r, int n)
{
    for (int i = 0; i < n; i++) {
        bt_io_event *e = &r->evs[i];
        if (e->kind == BT_IO_EV_SENT)
            continue;
        uint64_t tag = e->tag;
        if (tag == RT_TAG_LISTEN) {
            rt_accept(r);
            continue;
        }
        if (tag == RT_TAG_COORD_BELL) {
            drain_eventfd(r->cfg.coord_in_bell);
            continue;
        }
        if (tag == RT_TAG_WRITE_EP) {
            rt_write_events(r);
            continue;
        }
        uint64_t slot = (tag >> 2) - 1;
        rt_conn *c = slot < r->nslots ? r->conns[slot] : NULL;
        if (!c || c->state != RT_OPEN)
            continue;
        if (tag & 1) {
            drain_eventfd(c->c2r_bell);
            continue;
        }
        if (e->kind == BT_IO_EV_ERROR) {
            conn_mark_close(r, c, 1, "socket watch failed: %s", strerror(-e->result));
            continue;
        }
        if (!c->in_listed && u32v_push(&r->readable, c->slot) == 0)
            c->in_listed = 1;
    }
}

static int rt_read_sockets(bt_router *r)
{
    uint32_t n = r->readable.n, kept = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t slot = r->readable.v[i];
        rt_conn *c = r->conns[slot];
        if (!c || !c->in_listed)
            continue;
        if (c->state == RT_OPEN && conn_read(r, c))
            r->readable.v[kept++] = slot; /* more may be waiting: next turn, after the others */
        else
            c->in_listed = 0;
    }
    r->readable.n = kept;
    return (int)n;
}

static void rt_end_turn(bt_router *r)
{
    /* Frames first, so a closing connection's last replies are staged before it goes. */
    for (uint32_t i = 0; i < r->dirty.n; i++) {
        rt_conn *c = r->conns[r->dirty.v[i]];
        if (!c)
            continue;
        c->dirty = 0;
        if (c->state == RT_OPEN) {
            conn_flush(r, c);
            if (c->ring_state == RT_RING_PENDING && c->state == RT_OPEN)
                ring_ready_send(r, c);
        } else if (c->state == RT_DRAINING) {
            conn_flush_sock(r, c);
            if (!buf_live(&c->out)) {
                u32v_remove(&r->draining, c->slot);
                conn_free(r, c);
            }
        }
    }
    r->dirty.n = 0;
    if (r->ndisp) {
        /* The DISPATCHED batch goes before any EP_CLOSED of this turn, which may name the same ids. */
        size_t body = buf_live(&r->disp);
        rt_buf *pay = &r->pay;
        pay->len = pay->off = 0;
        mp_array(pay, r->ndisp * 2);
        buf_append(pay, r->disp.p, body);
        bt_frame_hdr h;
        hdr_init(&h, BT_MSG_DISPATCHED, BT_PRIO_HIGH, 0, BT_EP_NONE, BT_EP_COORDINATOR, 0);
        coord_emit(r, &h, pay->p, pay->len);
        r->disp.len = r->disp.off = 0;
        r->ndisp = 0;
    }
    for (uint32_t i = 0; i < r->closing.n; i++) {
        rt_conn *c = r->conns[r->closing.v[i]];
        if (c && c->state == RT_CLOSING)
            conn_finish_close(r, c);
    }
    r->closing.n = 0;
    /* One publish for everything the coordinator gets this turn. */
    while (r->nclens > r->clen_off) {
        int n = bt_ring_write_batch(r->cout, r->cbuf.p + r->cbuf.off, r->clens + r->clen_off,
                                    (int)(r->nclens - r->clen_off));
        if (n == -EMSGSIZE) { /* larger than a record can ever be: drop it, say so */
            buf_consume(&r->cbuf, r->clens[r->clen_off++]);
            rt_log(r, "error", "a frame for the coordinator is larger than its ring's records; dropped");
            continue;
        }
        if (n <= 0) {
            r->st.coord_full++;
            break; /* full (or a corrupt head): keep them, retry next turn */
        }
        for (int k = 0; k < n; k++)
            buf_consume(&r->cbuf, r->clens[r->clen_off++]);
    }
    if (r->clen_off == r->nclens)
        r->clen_off = r->nclens = 0;
}

/* Anything that must be retried without an event: a coordinator backlog, client ring backlogs. */
static int rt_backlogged(bt_router *r)
{
    if (r->nclens > r->clen_off)
        return 1;
    for (uint32_t i = 0; i < r->ringconns.n; i++) {
        rt_conn *c = r->conns[r->ringconns.v[i]];
        if (c && buf_live(&c->backlog)) {
            conn_set_dirty(r, c);
            return 1;
        }
    }
    return 0;
}

static int rt_poll_rings(bt_router *r)
{
    int work = poll_coord(r);
    for (uint32_t i = 0; i < r->ringconns.n; i++) {
        rt_conn *c = r->conns[r->ringconns.v[i]];
        if (c && c->state == RT_OPEN) {
            work += conn_poll_ring(r, c);
            if (buf_live(&c->backlog))
                conn_set_dirty(r, c);
        }
    }
    return work;
}

static void rt_check_coord(bt_router *r, uint64_t now)
{
    if (now < r->last_gone_check + 100000000ull)
        return; /* (callers pass clock readings of different ages: never subtract them) */
    r->last_gone_check = now;
    if (bt_ring_producer_gone(r->cin) == 1) {
        const void *p;
        if (bt_ring_peek(r->cin, &p) == -EAGAIN) {
            r->stop = 1;
            r->exit_rc = -EPIPE;
        }
    }
}

static void rt_timers(bt_router *r)
{
    uint64_t now = bt_now_ns();
    rt_check_coord(r, now);
    if (r->accept_retry)
        rt_accept(r);
    for (uint32_t i = r->draining.n; i-- > 0;) {
        rt_conn *c = r->conns[r->draining.v[i]];
        if (c && c->state == RT_DRAINING && now >= c->drain_deadline) {
            r->draining.v[i] = r->draining.v[--r->draining.n];
            conn_free(r, c);
        }
    }
    /* Edge-triggered write readiness can be missed if a send raced it; a periodic retry costs nothing. */
    for (uint32_t s = 0; s < r->nslots; s++) {
        rt_conn *c = r->conns[s];
        if (c && buf_live(&c->out))
            conn_set_dirty(r, c);
    }
}

/* One turn; returns how much work it found. */
static int rt_turn(bt_router *r, int timeout_ms)
{
    r->st.turns++;
    int work = rt_poll_rings(r);
    uint64_t now = bt_now_ns();
    int n = 0;
    if (timeout_ms != 0 || !work || now >= r->last_sock_poll + RT_SOCK_POLL_NS) {
        r->last_sock_poll = now;
        n = bt_io_wait(r->io, r->evs, RT_MAX_EVENTS, timeout_ms);
        if (n > 0)
            rt_events(r, n);
        else
            n = 0;
    }
    if (timeout_ms != 0 && n == 0)
        rt_timers(r);
    work += n;
    work += rt_read_sockets(r);
    rt_end_turn(r);
    rt_check_coord(r, now);
    return work;
}

static inline void rt_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

static int rt_rings_ready(bt_router *r)
{
    const void *p;
    if (bt_ring_peek(r->cin, &p) != -EAGAIN)
        return 1;
    for (uint32_t i = 0; i < r->ringconns.n; i++) {
        rt_conn *c = r->conns[r->ringconns.v[i]];
        if (c && c->state == RT_OPEN && bt_ring_peek(c->c2r, &p) != -EAGAIN)
            return 1;
    }
    return 0;
}

/* Idle: poll the rings (and now and then the sockets) for up to the spin budget.  1 when work came. */
static int rt_spin(bt_router *r)
{
    if (!r->cfg.spin_ns)
        return 0;
    uint64_t start = bt_now_ns(), now = start, last_io = start;
    while (now - start < r->cfg.spin_ns) {
        for (int i = 0; i < 32; i++) {
            rt_relax();
            if (rt_rings_ready(r))
                return 1;
        }
        now = bt_now_ns();
        if (now - last_io >= RT_SOCK_POLL_NS) {
            last_io = now;
            int n = bt_io_wait(r->io, r->evs, RT_MAX_EVENTS, 0);
            if (n > 0) {
                rt_events(r, n);
                return 1;
            }
        }
    }
    return 0;
}

/* Arm every consumer ring and sleep in the engine.  Armed rings ring their doorbells, which are watched. */
static void rt_sleep(bt_router *r)
{
    int rc = bt_ring_arm(r->cin);
    if (rc != 0) {
        if (rc < 0) { /* the coordinator closed its ring (-EPIPE) or corrupted it (-EPROTO) */
            r->stop = 1;
            r->exit_rc = rc;
        }
        return;
    }
    int ready = 0;
    for (uint32_t i = 0; i < r->ringconns.n && !ready; i++) {
        rt_conn *c = r->conns[r->ringconns.v[i]];
        /* -EPIPE (the client closed its ring) is nothing to read: its socket's end closes the connection. */
        if (c && c->state == RT_OPEN && (rc = bt_ring_arm(c->c2r)) != 0 && rc != -EPIPE)
            ready = 1;
    }
    if (!ready) {
        r->st.sleeps++;
        int timeout = rt_backlogged(r) ? RT_BACKLOG_WAIT_MS : RT_IDLE_WAIT_MS;
        int n = bt_io_wait(r->io, r->evs, RT_MAX_EVENTS, timeout);
        r->last_sock_poll = bt_now_ns();
        if (n > 0)
            rt_events(r, n);
        else
            rt_timers(r);
    }
    /* Awake: the producers stop ringing until the next sleep.  Disarming a ring that was not armed is a
     * harmless store. */
    bt_ring_disarm(r->cin);
    for (uint32_t i = 0; i < r->ringconns.n; i++) {
        rt_conn *c = r->conns[r->ringconns.v[i]];
        if (c && c->c2r)
            bt_ring_disarm(c->c2r);
    }
}

static void rt_shutdown(bt_router *r)
{
    rt_end_turn(r);
    for (uint32_t s = 0; s < r->nslots; s++) {
        rt_conn *c = r->conns[s];
        if (c && c->state == RT_OPEN)
            conn_mark_close(r, c, 0, "%s", "router shutting down");
    }
    rt_end_turn(r);
    if (r->exit_rc == 0)
        rt_log(r, "info", "router stopped");
    rt_end_turn(r);
}

int bt_router_run(bt_router *r)
{
    if (!r)
        return -EINVAL;
    rt_log(r, "info", "router started: backend %s, generation %u, max payload %u",
           bt_io_backend(r->io) == BT_IO_URING ? "io_uring" : "epoll", r->cfg.generation, r->cfg.max_payload);
    rt_accept(r);
    while (!r->stop) {
        if (rt_turn(r, 0) || r->stop)
            continue;
        if (rt_spin(r))
            continue;
        rt_sleep(r);
    }
    rt_shutdown(r);
    return r->exit_rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* Lifecycle.                                                                                        */
/* ------------------------------------------------------------------------------------------------ */

int bt_router_open(const bt_router_config *cfg, bt_router **out)
{
    if (!cfg || !out || cfg->listen_fd < 0 || cfg->coord_in_ring_fd < 0 || cfg->coord_out_ring_fd < 0 ||
        cfg->coord_in_bell < 0 || cfg->coord_out_bell < 0 || cfg->max_payload > BT_FRAME_MAX_PAYLOAD_LIMIT)
        return -EINVAL;
    bt_router *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    r->cfg = *cfg;
    if (!r->cfg.max_payload)
        r->cfg.max_payload = BT_FRAME_MAX_PAYLOAD_DEFAULT;
    if (!r->cfg.out_limit)
        r->cfg.out_limit = RT_OUT_LIMIT_DEFAULT;
    /* A connection must be able to hold at least one maximal frame in flight. */
    if (r->cfg.out_limit < 2 * (BT_FRAME_HEADER_SIZE + r->cfg.max_payload))
        r->cfg.out_limit = 2 * (BT_FRAME_HEADER_SIZE + r->cfg.max_payload);
    r->next_n = 2;
    r->wep = -1;
    int rc = bt_ring_attach(cfg->coord_in_ring_fd, BT_RING_CONSUMER, &r->cin);
    if (rc < 0)
        goto fail;
    rc = bt_ring_attach(cfg->coord_out_ring_fd, BT_RING_PRODUCER, &r->cout);
    if (rc < 0)
        goto fail;
    bt_ring_set_doorbell(r->cout, cfg->coord_out_bell);
    rc = bt_io_open(cfg->io_backend, 512, &r->io);
    if (rc < 0)
        goto fail;
    r->wep = epoll_create1(EPOLL_CLOEXEC);
    if (r->wep < 0) {
        rc = -errno;
        goto fail;
    }
    if ((rc = bt_io_watch(r->io, cfg->listen_fd, RT_TAG_LISTEN)) < 0 ||
        (rc = bt_io_watch(r->io, cfg->coord_in_bell, RT_TAG_COORD_BELL)) < 0 ||
        (rc = bt_io_watch(r->io, r->wep, RT_TAG_WRITE_EP)) < 0)
        goto fail;
    *out = r;
    return 0;
fail:
    bt_router_close(r);
    return rc;
}

void bt_router_close(bt_router *r)
{
    if (!r)
        return;
    for (uint32_t s = 0; s < r->nslots; s++) {
        rt_conn *c = r->conns[s];
        if (!c)
            continue;
        if (c->state != RT_DRAINING)
            conn_unroute(r, c, 0);
        conn_free(r, c);
    }
    if (r->io)
        bt_io_close(r->io); /* before the watched fds below go away */
    if (r->wep >= 0)
        close(r->wep);
    bt_ring_close(r->cin);
    bt_ring_close(r->cout);
    for (uint32_t i = 0; i < r->nqueues; i++) {
        rt_queue *q = r->queues[i];
        rt_task *t;
        while ((t = queue_pop(q)))
            free(t);
        free(q->agents.v);
        free(q);
    }
    while (r->free_tasks) {
        rt_task *t = r->free_tasks;
        r->free_tasks = t->next;
        free(t);
    }
    free(r->queues);
    map_free(&r->qmap);
    map_free(&r->eps);
    sets_free(&r->topics);
    sets_free(&r->groups);
    free(r->conns);
    free(r->free_slots.v);
    free(r->dirty.v);
    free(r->readable.v);
    free(r->closing.v);
    free(r->ringconns.v);
    free(r->draining.v);
    buf_free(&r->cbuf);
    free(r->clens);
    buf_free(&r->disp);
    buf_free(&r->pay);
    buf_free(&r->scratch);
    free(r);
}

int bt_router_backend(const bt_router *r)
{
    return r ? bt_io_backend(r->io) : -EINVAL;
}

/* ------------------------------------------------------------------------------------------------ */
/* Test hooks (router_internal.h).                                                                   */
/* ------------------------------------------------------------------------------------------------ */

int bti_router_adopt(bt_router *r, int fd, const bt_peercred *cred, uint64_t *ep)
{
    rt_conn *c;
    int rc = conn_new(r, fd, cred, &c);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    if ((rc = bt_io_watch(r->io, fd, RT_TAG(c->slot, 0))) < 0)
        conn_mark_close(r, c, 1, "cannot watch the socket");
    if (ep)
        *ep = c->ep;
    return 0;
}

int bti_router_feed(bt_router *r, uint64_t ep, const void *data, size_t len)
{
    rt_conn *c = conn_by_ep(r, ep);
    if (!c)
        return -ENOENT;
    const uint8_t *p = data;
    size_t limit = in_limit(r);
    while (len && c->state == RT_OPEN) {
        size_t k = limit - c->in_len;
        if (k > len)
            k = len;
        if (conn_in_reserve(c, k, limit) < 0)
            return -ENOMEM;
        memcpy(c->in + c->in_len, p, k);
        c->in_len += k;
        p += k;
        len -= k;
        conn_parse(r, c);
    }
    return 0;
}

int bti_router_turn(bt_router *r, int timeout_ms)
{
    if (!r->stop)
        rt_turn(r, timeout_ms);
    return r->stop;
}

void bti_router_end_turn(bt_router *r)
{
    rt_end_turn(r);
}

int bti_router_drop(bt_router *r, uint64_t ep)
{
    rt_conn *c = conn_by_ep(r, ep);
    if (!c)
        return -ENOENT;
    conn_mark_close(r, c, 1, "dropped");
    return 0;
}
