/*
 * router_coord.c -- the router's link to the coordinator: the outgoing batch (one ring publish per turn), the
 * router's own notifications (EP_OPEN, EP_CLOSED, DISPATCHED, ROUTER_LOG, ROUTER_STATS) and the frames the
 * coordinator sends (TASK, the CTL_* controls, and frames it routes like any client).
 */
#include "router_internal.h"

#include <stdarg.h>
#include <stdio.h>

/* ------------------------------------------------------------------------------------------------ */
/* Output: the batch and the notifications.                                                         */
/* ------------------------------------------------------------------------------------------------ */

/* Append one frame to the coordinator batch; published at the end of the turn. */
void bti_router_coord_emit(bt_router *r, const bt_frame_hdr *h, const void *payload, size_t len)
{
    if (r->nclens == r->clens_cap) {
        if (r->clen_off) { /* reclaim lengths already written to the ring */
            memmove(r->clens, r->clens + r->clen_off, (r->nclens - r->clen_off) * sizeof(*r->clens));
            r->nclens -= r->clen_off;
            r->clen_off = 0;
        }
        if (r->nclens == r->clens_cap) {
            uint32_t *v = array_grow(r->clens, &r->clens_cap, 256, sizeof(*v));
            if (!v)
                return;
            r->clens = v;
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

/* A notification of the router's own to the coordinator, its payload in r->pay. */
static void coord_notify(bt_router *r, uint8_t type, uint8_t prio, uint8_t flags, uint64_t src, uint64_t corr)
{
    bt_frame_hdr h;
    hdr_init(&h, type, prio, flags, src, BT_EP_COORDINATOR, corr);
    bti_router_coord_emit(r, &h, r->pay.p, r->pay.len);
}

void bti_router_log(bt_router *r, const char *level, const char *fmt, ...)
{
    char msg[240];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    rt_buf *pay = pay_begin(r);
    mp_array(pay, 2);
    mp_str(pay, level);
    mp_str(pay, msg);
    coord_notify(r, BT_MSG_ROUTER_LOG, BT_PRIO_NORMAL, 0, BT_EP_NONE, 0);
}

/* EP_OPEN [pid, uid, gid], before any frame of this endpoint: the coordinator batch is in order. */
void bti_router_ep_open(bt_router *r, const rt_conn *c)
{
    rt_buf *pay = pay_begin(r);
    mp_array(pay, 3);
    mp_uint(pay, c->cred.pid < 0 ? 0 : (uint64_t)c->cred.pid);
    mp_uint(pay, c->cred.uid);
    mp_uint(pay, c->cred.gid);
    coord_notify(r, BT_MSG_EP_OPEN, BT_PRIO_HIGH, 0, c->ep, 0);
}

/* EP_CLOSED [dispatch ids the endpoint held without a RESULT]. */
void bti_router_ep_closed(bt_router *r, const rt_conn *c)
{
    rt_buf *pay = pay_begin(r);
    mp_array(pay, c->nheld);
    for (uint32_t i = 0; i < c->nheld; i++)
        mp_uint(pay, c->held[i]);
    coord_notify(r, BT_MSG_EP_CLOSED, BT_PRIO_HIGH, 0, c->ep, 0);
}

/* A notice whose payload is a flat msgpack array gathered during the turn (n entries in buf); buf is emptied. */
static void notify_flat(bt_router *r, uint8_t type, rt_buf *buf, uint32_t n)
{
    if (!n)
        return;
    rt_buf *pay = pay_begin(r);
    mp_array(pay, n);
    buf_append(pay, buf->p, buf_live(buf));
    coord_notify(r, type, BT_PRIO_HIGH, 0, BT_EP_NONE, 0);
    buf->len = buf->off = 0;
}

/* DISPATCHED [endpoint, dispatch_id, ...]: ndisp counts the pairs. */
void bti_router_dispatched(bt_router *r)
{
    notify_flat(r, BT_MSG_DISPATCHED, &r->disp, r->ndisp * 2);
    r->ndisp = 0;
}

/* CONTINUED [parent, released, ...]: what became of each parent's continuations.  Sent before DISPATCHED (which
 * may hand out a released child) and after the RESULT that settled it (emitted while routing, earlier). */
void bti_router_continued(bt_router *r)
{
    notify_flat(r, BT_MSG_CONTINUED, &r->contd, r->ncontd * 2);
    r->ncontd = 0;
}

void bti_router_coord_publish(bt_router *r)
{
    while (r->nclens > r->clen_off) {
        int n = bt_ring_write_batch(r->cout, r->cbuf.p + r->cbuf.off, r->clens + r->clen_off,
                                    (int)(r->nclens - r->clen_off));
        if (n == -EMSGSIZE) { /* larger than a record can ever be: drop it, say so */
            buf_consume(&r->cbuf, r->clens[r->clen_off++]);
            bti_router_log(r, "error", "a frame for the coordinator is larger than its ring's records; dropped");
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

/* ------------------------------------------------------------------------------------------------ */
/* Frames from the coordinator.                                                                      */
/* ------------------------------------------------------------------------------------------------ */

static void ctl_bad(bt_router *r, const bt_frame_hdr *h, size_t want)
{
    char msg[96];
    snprintf(msg, sizeof(msg), "control type %u needs a %zu-byte payload, got %u", h->type, want, h->payload_len);
    bti_router_send_error(r, NULL, h->type, h->priority, h->correlation_id, "invalid_request", msg);
}

/* "by_pattern": {pattern: {priority name: [frames, bytes]}}, nonzero cells only (a cell that counted a frame
 * counted at least its 48 header bytes, so frames == 0 is the empty cell). */
static void by_pattern(rt_buf *pay, const rt_stats *s)
{
    static const char *const prio_names[BT_PRIO_COUNT] = {"critical", "high", "normal", "low", "batch"};
    uint32_t used[RT_PAT_COUNT], npat = 0;
    for (uint32_t p = 0; p < RT_PAT_COUNT; p++) {
        used[p] = 0;
        for (int q = 0; q < BT_PRIO_COUNT; q++)
            used[p] += s->in[p][q][0] != 0;
        npat += used[p] != 0;
    }
    mp_str(pay, "by_pattern");
    mp_map(pay, npat);
    for (uint32_t p = 0; p < RT_PAT_COUNT; p++) {
        if (!used[p])
            continue;
        mp_str(pay, bti_router_pattern_names[p]);
        mp_map(pay, used[p]);
        for (int q = 0; q < BT_PRIO_COUNT; q++) {
            if (!s->in[p][q][0])
                continue;
            mp_str(pay, prio_names[q]);
            mp_array(pay, 2);
            mp_uint(pay, s->in[p][q][0]);
            mp_uint(pay, s->in[p][q][1]);
        }
    }
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
        {"continuations", r->nconts},    {"continued", s->continued},
        {"continuations_discarded", s->cont_discarded},
    };
    uint32_t n = (uint32_t)(sizeof(kv) / sizeof(kv[0]));
    rt_buf *pay = pay_begin(r);
    mp_map(pay, n + 1);
    for (uint32_t i = 0; i < n; i++) {
        mp_str(pay, kv[i].name);
        mp_uint(pay, kv[i].v);
    }
    by_pattern(pay, s);
    coord_notify(r, BT_MSG_ROUTER_STATS, req->priority, BT_FRAME_F_REPLY, BT_EP_NONE, req->correlation_id);
}

static void coord_frame(bt_router *r, const bt_frame_hdr *h, const uint8_t *frame, uint32_t size)
{
    const uint8_t *payload = frame + BT_FRAME_HEADER_SIZE;
    uint32_t plen = h->payload_len;
    r->st.coord_in++;
    rt_count_in(&r->st, h);
    switch (h->type) {
    case BT_MSG_TASK:
        bti_router_task_push(r, h, frame, size);
        return;
    case BT_MSG_CTL_AGENT: {
        if (plen != BT_CTL_AGENT_SIZE) {
            ctl_bad(r, h, BT_CTL_AGENT_SIZE);
            return;
        }
        uint64_t ep = ld64(payload);
        rt_conn *c = bti_router_conn_by_ep(r, ep);
        if (!c) {
            bti_router_log(r, "debug", "CTL_AGENT for endpoint %llu, which is not connected", (unsigned long long)ep);
            return;
        }
        bti_router_agent_set(r, c, ld64(payload + 8), ld32(payload + 16));
        return;
    }
    case BT_MSG_CTL_CLOSE: {
        if (plen != BT_CTL_CLOSE_SIZE) {
            ctl_bad(r, h, BT_CTL_CLOSE_SIZE);
            return;
        }
        rt_conn *c = bti_router_conn_by_ep(r, ld64(payload));
        if (c)
            bti_router_conn_mark_close(r, c, 0, "closed by the coordinator");
        return;
    }
    case BT_MSG_CTL_REVOKE: {
        if (plen != BT_CTL_REVOKE_SIZE) {
            ctl_bad(r, h, BT_CTL_REVOKE_SIZE);
            return;
        }
        uint64_t did = ld64(payload + 8);
        int found = bti_router_queue_revoke(r, ld64(payload), did);
        rt_buf *pay = pay_begin(r);
        mp_array(pay, 2);
        mp_uint(pay, did);
        mp_uint(pay, (uint64_t)found);
        coord_notify(r, BT_MSG_CTL_REVOKE, h->priority, BT_FRAME_F_REPLY, BT_EP_NONE, h->correlation_id);
        return;
    }
    case BT_MSG_CTL_PAUSE:
        if (plen != BT_CTL_PAUSE_SIZE) {
            ctl_bad(r, h, BT_CTL_PAUSE_SIZE);
            return;
        }
        bti_router_set_paused(r, ld32(payload) != 0);
        return;
    case BT_MSG_CTL_STATS:
        stats_reply(r, h);
        return;
    case BT_MSG_CTL_SHUTDOWN:
        r->stop = 1;
        r->exit_rc = 0;
        bti_router_conts_clear(r); /* dropped unreported: the coordinator is stopping */
        return;
    case BT_MSG_CTL_CONTINUE:
        bti_router_ctl_continue(r, payload, plen);
        return;
    case BT_MSG_SUBSCRIBE:
    case BT_MSG_UNSUBSCRIBE:
    case BT_MSG_JOIN:
    case BT_MSG_LEAVE:
    case BT_MSG_RING_SETUP:
        bti_router_log(r, "warning", "the coordinator sent frame type %u, which only clients send; ignored", h->type);
        return;
    default:
        bti_router_route_common(r, NULL, h, payload);
        return;
    }
}

int bti_router_poll_coord(bt_router *r)
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
            bti_router_log(r, "error", "dropped a malformed frame from the coordinator (%d)", rc);
        bt_ring_consume(r->cin, (uint32_t)len);
        n++;
    }
    bt_ring_release(r->cin);
    return n;
}

void bti_router_check_coord(bt_router *r, uint64_t now)
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
