/*
 * router_internal.h -- the router's private header: the state shared by its modules and the bti_router_*
 * functions they call in each other, plus hooks for the C tests and the fuzz harness.  Not part of the public
 * API.  docs/router.md has the file map:
 *
 *   router.c        open/close, the loop (turns, spin, sleep, timers) and accept with the peer check
 *   router_conn.c   a connection's life: input parsing, staging, flushing to the socket, close and drain
 *   router_route.c  what a client frame does: direct/pubsub/groups/broadcast, work queues, credit, dispatch
 *   router_ring.c   RING_SETUP and the clients' ring pairs
 *   router_coord.c  the coordinator link: its ring, notifications (EP_OPEN/EP_CLOSED/DISPATCHED/CONTINUED/
 *                   ROUTER_LOG) and controls
 *   result_ok.c     bt_result_ok: does a RESULT payload say "ok": true (continuations, CTL_CONTINUE)?
 *
 * The small containers below (byte buffers, the u64 -> u32 map, slot arrays, the msgpack writer) are static
 * inline: every module uses them on the per-frame path.
 */
#ifndef BATON_ROUTER_INTERNAL_H
#define BATON_ROUTER_INTERNAL_H

#include "baton.h"

#include <stdlib.h>

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
/* Continuations (CTL_CONTINUE) the router keeps at most, over every parent: each is a copy of a TASK frame, so
 * this bounds the memory a coordinator bug could pin.  Beyond it the parent is refused (CONTINUED [parent, 0]). */
#define RT_CONT_MAX (1u << 20)

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

static inline int buf_reserve(rt_buf *b, size_t extra)
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

static inline int buf_append(rt_buf *b, const void *d, size_t n)
{
    if (n == 0)
        return 0;
    if (buf_reserve(b, n) < 0)
        return -ENOMEM;
    memcpy(b->p + b->len, d, n);
    b->len += n;
    return 0;
}

static inline size_t buf_live(const rt_buf *b)
{
    return b->len - b->off;
}

static inline void buf_consume(rt_buf *b, size_t n)
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

static inline void buf_free(rt_buf *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

static inline uint32_t ld32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t ld64(const uint8_t *p)
{
    return (uint64_t)ld32(p) | (uint64_t)ld32(p + 4) << 32;
}

static inline void st64(uint8_t *p, uint64_t v)
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

static inline uint32_t map_hash(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return (uint32_t)k;
}

static inline int map_get(const rt_map *m, uint64_t k, uint32_t *val)
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

static inline int map_grow(rt_map *m);

static inline int map_put(rt_map *m, uint64_t k, uint32_t v)
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

static inline int map_grow(rt_map *m)
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
static inline void map_del(rt_map *m, uint64_t k)
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

static inline void map_free(rt_map *m)
{
    free(m->keys);
    free(m->vals);
    free(m->used);
    memset(m, 0, sizeof(*m));
}

/* The growth of every array the router appends to: double *cap (first: the initial capacity) and return the
 * array moved to it, or NULL with v and *cap untouched. */
static inline void *array_grow(void *v, uint32_t *cap, uint32_t first, size_t elem)
{
    uint32_t ncap = *cap ? *cap * 2 : first;
    void *nv = realloc(v, (size_t)ncap * elem);
    if (nv)
        *cap = ncap;
    return nv;
}

/* A growable array of u32 (connection slots). */
typedef struct rt_u32v {
    uint32_t *v;
    uint32_t n, cap;
} rt_u32v;

static inline int u32v_push(rt_u32v *a, uint32_t x)
{
    if (a->n == a->cap) {
        uint32_t *v = array_grow(a->v, &a->cap, 16, sizeof(*v));
        if (!v)
            return -ENOMEM;
        a->v = v;
    }
    a->v[a->n++] = x;
    return 0;
}

/* Remove x (order not kept); 1 when it was there. */
static inline int u32v_remove(rt_u32v *a, uint32_t x)
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

static inline void mp_byte(rt_buf *b, uint8_t x)
{
    buf_append(b, &x, 1);
}

static inline void mp_be(rt_buf *b, uint8_t tag, uint64_t v, int bytes)
{
    uint8_t t[9];
    t[0] = tag;
    for (int i = 0; i < bytes; i++)
        t[1 + i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
    buf_append(b, t, (size_t)bytes + 1);
}

static inline void mp_uint(rt_buf *b, uint64_t v)
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

/* An array or map header: fix is its fixarray/fixmap base, tag16 its 16-bit form (the 32-bit form follows). */
static inline void mp_container(rt_buf *b, uint8_t fix, uint8_t tag16, uint32_t n)
{
    if (n < 16)
        mp_byte(b, (uint8_t)(fix | n));
    else if (n <= 0xffff)
        mp_be(b, tag16, n, 2);
    else
        mp_be(b, (uint8_t)(tag16 + 1), n, 4);
}

static inline void mp_array(rt_buf *b, uint32_t n)
{
    mp_container(b, 0x90, 0xdc, n);
}

static inline void mp_map(rt_buf *b, uint32_t n)
{
    mp_container(b, 0x80, 0xde, n);
}

/* A string, cut at 64 KiB. */
static inline void mp_str(rt_buf *b, const char *s)
{
    size_t n = strlen(s);
    if (n > 0xffff)
        n = 0xffff;
    if (n < 32)
        mp_byte(b, (uint8_t)(0xa0 | n));
    else if (n <= 0xff)
        mp_be(b, 0xd9, n, 1);
    else
        mp_be(b, 0xda, n, 2);
    buf_append(b, s, n);
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

/* The continuations of one parent dispatch: TASK frames (rt_task.dispatch_id = the child's), in arrival order. */
typedef struct rt_conts {
    uint64_t parent;
    rt_fifo tasks;
} rt_conts;

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

/* Routing patterns of the frames a router takes in (ROUTER_STATS "by_pattern", docs/protocol.md).  CONTROL is
 * 0 so that every type bti_router_pattern_of does not name counts as control. */
enum {
    RT_PAT_CONTROL = 0,
    RT_PAT_DIRECT,   /* DIRECT, correlation id 0 */
    RT_PAT_REQUEST,  /* DIRECT, correlation id != 0, no F_REPLY */
    RT_PAT_REPLY,    /* DIRECT with F_REPLY */
    RT_PAT_PUBLISH,
    RT_PAT_MULTICAST,
    RT_PAT_BROADCAST,
    RT_PAT_TASK,
    RT_PAT_RESULT,
    RT_PAT_COUNT
};

typedef struct rt_stats {
    uint64_t accepted, refused, closed, closed_slow, frames_in, frames_out, bytes_out, coord_in, coord_out,
        tasks_in, tasks_queued_peak, dispatched, results, revoked, errors_sent, bad_frames, unknown_dest,
        ring_setups, ring_backlog, coord_full, turns, sleeps, continued, cont_discarded;
    uint64_t in[RT_PAT_COUNT][BT_PRIO_COUNT][2]; /* frames taken in by pattern and priority: [0] frames, [1] bytes */
} rt_stats;

/* Frame type -> RT_PAT_* (router_route.c); DIRECT maps to RT_PAT_DIRECT and rt_count_in refines it. */
extern const uint8_t bti_router_pattern_of[256];
extern const char *const bti_router_pattern_names[RT_PAT_COUNT];

/* Count one frame taken in (validated: priority < BT_PRIO_COUNT) under its pattern and priority.  The hot
 * path: a table load, no branch (DIRECT's request/reply split is arithmetic), an index and two adds. */
static inline void rt_count_in(rt_stats *st, const bt_frame_hdr *h)
{
    unsigned direct = h->type == BT_MSG_DIRECT;
    unsigned reply = (h->flags & BT_FRAME_F_REPLY) != 0;
    unsigned request = (h->correlation_id != 0) & !reply;
    unsigned pat = bti_router_pattern_of[h->type] + direct * (request + 2 * reply);
    uint64_t *cell = st->in[pat][h->priority];
    cell[0]++;
    cell[1] += BT_FRAME_HEADER_SIZE + (uint64_t)h->payload_len;
}

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
    rt_map qids; /* dispatch id -> how many queued tasks carry it: "is this parent known?" (CTL_CONTINUE) */
    /* continuations (CTL_CONTINUE): parent dispatch id -> index in conts; each parent's TASK frames in arrival
     * order, in rt_task records shared with the queues' free list */
    rt_map cmap;
    struct rt_conts *conts;
    uint32_t nparents, parents_cap;
    uint32_t nconts; /* stored continuations over every parent; 0 lets a RESULT skip all of this */
    rt_buf contd;    /* this turn's CONTINUED pairs [parent, released], as msgpack uints */
    uint32_t ncontd;
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

static inline void hdr_init(bt_frame_hdr *h, uint8_t type, uint8_t prio, uint8_t flags, uint64_t src, uint64_t dst,
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

/* Start a router-written payload in the shared scratch r->pay (every notification and error reply). */
static inline rt_buf *pay_begin(bt_router *r)
{
    r->pay.len = r->pay.off = 0;
    return &r->pay;
}

/* ---- router_coord.c: the coordinator link ---- */

/* Append one frame to the coordinator batch; published at the end of the turn (bti_router_coord_publish). */
void bti_router_coord_emit(bt_router *r, const bt_frame_hdr *h, const void *payload, size_t len);
/* ROUTER_LOG to the coordinator. */
void bti_router_log(bt_router *r, const char *level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void bti_router_ep_open(bt_router *r, const rt_conn *c);
void bti_router_ep_closed(bt_router *r, const rt_conn *c);
/* This turn's DISPATCHED batch, if any (before the turn's EP_CLOSED, which may name the same ids). */
void bti_router_dispatched(bt_router *r);
/* The CONTINUED pairs gathered so far, if any: before DISPATCHED (which may hand out released children). */
void bti_router_continued(bt_router *r);
/* One ring publish for everything queued for the coordinator; what does not fit waits for the next turn. */
void bti_router_coord_publish(bt_router *r);
/* Read up to RT_RING_RECORDS_PER_TURN frames from the coordinator ring; returns how many. */
int bti_router_poll_coord(bt_router *r);
/* At most every 100 ms: stop (-EPIPE) when the coordinator has gone and its ring is empty. */
void bti_router_check_coord(bt_router *r, uint64_t now);

/* ---- router_conn.c: connections ---- */

/* A new connection for fd, then watch the socket; fd is closed on failure.  A failed watch closes the
 * connection. */
int bti_router_conn_open(bt_router *r, int fd, const bt_peercred *cred, rt_conn **out);
void bti_router_conn_free(bt_router *r, rt_conn *c);
void bti_router_conn_unroute(bt_router *r, rt_conn *c, int notify);
void bti_router_conn_finish_close(bt_router *r, rt_conn *c);
void bti_router_conn_mark_close(bt_router *r, rt_conn *c, int drop_output, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
rt_conn *bti_router_conn_by_ep(bt_router *r, uint64_t ep);
void bti_router_conn_set_dirty(bt_router *r, rt_conn *c);
uint8_t *bti_router_conn_stage(bt_router *r, rt_conn *c, size_t size, int prio);
void bti_router_conn_emit(bt_router *r, rt_conn *c, const bt_frame_hdr *h, const void *payload, size_t len);
void bti_router_conn_emit_raw(bt_router *r, rt_conn *c, const uint8_t *frame, size_t size, int prio);
void bti_router_conn_write_watch(bt_router *r, rt_conn *c, int on);
void bti_router_conn_flush_sock(bt_router *r, rt_conn *c);
void bti_router_conn_flush(bt_router *r, rt_conn *c);
void bti_router_conn_bad_stream(bt_router *r, rt_conn *c, const uint8_t *p, size_t avail, int rc);
int bti_router_conn_read(bt_router *r, rt_conn *c);
/* {"code": code, "message": message} into r->pay. */
void bti_router_error_payload(bt_router *r, const char *code, const char *message);
void bti_router_send_error_flags(bt_router *r, rt_conn *c, uint8_t type, uint8_t prio, uint64_t corr,
                                 const char *code, const char *message, uint8_t about_flags);
void bti_router_send_error(bt_router *r, rt_conn *c, uint8_t type, uint8_t prio, uint64_t corr, const char *code,
                           const char *message);

/* ---- router_route.c: routing, work queues and credit ---- */

void bti_router_conn_frame(bt_router *r, rt_conn *c, bt_frame_hdr *h, const uint8_t *payload);
void bti_router_route_common(bt_router *r, rt_conn *from, const bt_frame_hdr *h, const uint8_t *payload);
void bti_router_task_push(bt_router *r, const bt_frame_hdr *h, const uint8_t *frame, uint32_t size);
int bti_router_queue_revoke(bt_router *r, uint64_t qid, uint64_t dispatch_id);
void bti_router_agent_set(bt_router *r, rt_conn *c, uint64_t qid, uint32_t credit);
void bti_router_set_paused(bt_router *r, int paused);
/* CTL_CONTINUE (payload plen bytes): keep the embedded TASK for its parent, or refuse it (CONTINUED [parent, 0]). */
void bti_router_ctl_continue(bt_router *r, const uint8_t *payload, uint32_t plen);
/* The end of connection c: the continuations of every dispatch it still holds are discarded. */
void bti_router_conts_held_gone(bt_router *r, const rt_conn *c);
/* CTL_SHUTDOWN: every continuation is dropped without a report (the coordinator is stopping). */
void bti_router_conts_clear(bt_router *r);
/* Remove c from every topic, group and queue. */
void bti_router_route_forget(bt_router *r, rt_conn *c);
/* Free the queues, their tasks, the task free list, topics and groups (bt_router_close). */
void bti_router_route_fini(bt_router *r);

/*
 * result_ok.c: 1 when the msgpack payload p[0..n) is one map whose last "ok" key (a str) has the value true
 * (0xc3), else 0 -- also for anything malformed, cut, followed by extra bytes, or nested deeper than msgpack's
 * own unpacker allows.  Reads nothing outside p[0..n); the Python router decides identically.
 */
int bt_result_ok(const uint8_t *p, size_t n);

/* ---- router_ring.c: clients' rings ---- */

void bti_router_ring_setup(bt_router *r, rt_conn *c, const bt_frame_hdr *h);
void bti_router_ring_ready_send(bt_router *r, rt_conn *c);
void bti_router_ring_release(bt_router *r, rt_conn *c);
void bti_router_conn_flush_ring(bt_router *r, rt_conn *c);
int bti_router_conn_poll_ring(bt_router *r, rt_conn *c);

/* ---- Test hooks (router.c, router_conn.c) ---- */

/*
 * Adopt an already connected stream socket as a client endpoint with these credentials (not checked):
 * the router owns fd from then on (also on failure, when it is closed).  EP_OPEN is queued for the
 * coordinator.  Returns 0 and the endpoint id in *ep, or -errno.
 */
int bti_router_adopt(bt_router *r, int fd, const bt_peercred *cred, uint64_t *ep);

/*
 * Process len bytes as if they had been read from endpoint ep's socket: frames are decoded and routed
 * exactly like socket input (partial frames wait for more).  -ENOENT when ep is not an open endpoint.
 */
int bti_router_feed(bt_router *r, uint64_t ep, const void *data, size_t len);

/*
 * One loop turn: read the coordinator ring and client rings, poll the I/O engine for up to timeout_ms,
 * read sockets, then flush every connection and publish to the coordinator.  Returns 1 when the router
 * stopped (CTL_SHUTDOWN or the coordinator gone), else 0.
 */
int bti_router_turn(bt_router *r, int timeout_ms);

/* Flush and publish what the current turn queued (the end of a turn, without polling anything). */
void bti_router_end_turn(bt_router *r);

/* Close endpoint ep as if its socket had ended (EP_CLOSED is queued).  -ENOENT when unknown. */
int bti_router_drop(bt_router *r, uint64_t ep);

#endif
