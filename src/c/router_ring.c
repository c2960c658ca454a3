/*
 * router_ring.c -- clients' ring pairs: RING_SETUP creates them, RING_READY hands them over (once every socket
 * byte before it is out), then CRITICAL/HIGH frames for the client go through r2c (a backlog keeps their order
 * when it is full) and the client's c2r records are read like socket input.
 */
#include "router_internal.h"

#include <sys/eventfd.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------------ */
/* Output: r2c first (CRITICAL/HIGH), in order through the backlog.                                 */
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

void bti_router_conn_flush_ring(bt_router *r, rt_conn *c)
{
    int wrote = 0, full = 0;
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
                bti_router_conn_mark_close(r, c, 1, "out of memory for the ring backlog");
            full = 1;
        }
        c->staged -= s->len;
        s->len = 0;
    }
    r->st.ring_backlog += (uint64_t)full; /* ring_backlog_events: one per flush that left new frames waiting */
    if (wrote)
        bt_ring_publish(c->r2c); /* one publish (and at most one doorbell) per connection per turn */
}

/* ------------------------------------------------------------------------------------------------ */
/* Setup and handover.                                                                              */
/* ------------------------------------------------------------------------------------------------ */

void bti_router_ring_setup(bt_router *r, rt_conn *c, const bt_frame_hdr *h)
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
        bti_router_send_error(r, c, BT_MSG_RING_SETUP, h->priority, h->correlation_id, "ring_unavailable", why);
        return;
    }
    bt_ring_set_doorbell(c->r2c, c->r2c_bell);
    bt_ring_set_spin(c->c2r, 0);
    c->ring_state = RT_RING_PENDING; /* RING_READY goes out after the socket bytes before it (end of turn) */
    c->ring_corr = h->correlation_id;
    bti_router_conn_set_dirty(r, c);
    r->st.ring_setups++;
}

/* Send RING_READY with the four descriptors once nothing else waits on the socket before it. */
void bti_router_ring_ready_send(bt_router *r, rt_conn *c)
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
        bti_router_conn_write_watch(r, c, 1); /* try again when there is room */
        return;
    }
    if (rc != (int)sizeof(frame)) {
        /* A short send would leave half a frame on the stream: the connection cannot go on. */
        bti_router_conn_mark_close(r, c, 1, "sending RING_READY failed (%d)", rc);
        return;
    }
    r->st.frames_out++;
    if (bt_io_watch(r->io, c->c2r_bell, RT_TAG(c->slot, 1)) < 0 || u32v_push(&r->ringconns, c->slot) < 0) {
        bti_router_conn_mark_close(r, c, 1, "cannot watch the ring doorbell");
        return;
    }
    c->ring_state = RT_RING_ACTIVE;
}

/* A client's c2r ring: each record is one frame. */
int bti_router_conn_poll_ring(bt_router *r, rt_conn *c)
{
    int n = 0;
    while (n < RT_RING_RECORDS_PER_TURN && c->state == RT_OPEN) {
        const void *p;
        int len = bt_ring_peek(c->c2r, &p);
        if (len == -EAGAIN)
            break;
        if (len < 0) {
            r->st.bad_frames++;
            bti_router_conn_mark_close(r, c, 1, "corrupt ring from the client");
            break;
        }
        bt_frame_hdr h;
        int rc = bt_frame_decode(p, (size_t)len, r->cfg.max_payload, &h);
        if (rc != len) {
            bti_router_conn_bad_stream(r, c, p, (size_t)len, rc < 0 && rc != -ENODATA ? rc : -EBADMSG);
            break;
        }
        bti_router_conn_frame(r, c, &h, (const uint8_t *)p + BT_FRAME_HEADER_SIZE);
        bt_ring_consume(c->c2r, (uint32_t)len);
        n++;
    }
    bt_ring_release(c->c2r);
    return n;
}

/* Release c's rings and doorbells (the connection is being unrouted). */
void bti_router_ring_release(bt_router *r, rt_conn *c)
{
    if (c->ring_state == RT_RING_NONE)
        return;
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
