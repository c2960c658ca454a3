/*
 * router_conn.c -- one client connection's life: reading and parsing its input (a bad stream is answered and
 * closed), staging the turn's frames for it by priority and sending them with one sendmsg, and closing it
 * (unroute, report its dispatches, drain what is queued for it, free).
 */
#include "router_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------------ */
/* Output: staging for the turn, then one send per turn.                                              */
/* ------------------------------------------------------------------------------------------------ */

void bti_router_conn_set_dirty(bt_router *r, rt_conn *c)
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
uint8_t *bti_router_conn_stage(bt_router *r, rt_conn *c, size_t size, int prio)
{
    if (c->state != RT_OPEN)
        return NULL;
    if (prio < 0 || prio >= BT_PRIO_COUNT)
        prio = BT_PRIO_NORMAL;
    if (conn_pending(c) + size > r->cfg.out_limit) {
        r->st.closed_slow++;
        bti_router_conn_mark_close(r, c, 1, "output buffer limit (%u bytes) exceeded: the client does not read",
                                   r->cfg.out_limit);
        return NULL;
    }
    rt_buf *b;
    if (c->ring_state == RT_RING_ACTIVE && prio <= BT_PRIO_HIGH && size <= c->r2c->max_record)
        b = &c->rstage[prio];
    else
        b = &c->stage[prio];
    if (buf_reserve(b, size) < 0) {
        bti_router_conn_mark_close(r, c, 1, "out of memory for output");
        return NULL;
    }
    uint8_t *p = b->p + b->len;
    b->len += size;
    c->staged += size;
    bti_router_conn_set_dirty(r, c);
    r->st.frames_out++;
    return p;
}

/* Encode a frame straight into c's staging. */
void bti_router_conn_emit(bt_router *r, rt_conn *c, const bt_frame_hdr *h, const void *payload, size_t len)
{
    size_t size = BT_FRAME_HEADER_SIZE + len;
    uint8_t *p = bti_router_conn_stage(r, c, size, h->priority);
    if (p)
        bt_frame_encode(p, size, h, payload, len);
}

/* Copy an encoded frame into c's staging. */
void bti_router_conn_emit_raw(bt_router *r, rt_conn *c, const uint8_t *frame, size_t size, int prio)
{
    uint8_t *p = bti_router_conn_stage(r, c, size, prio);
    if (p)
        memcpy(p, frame, size);
}

void bti_router_error_payload(bt_router *r, const char *code, const char *message)
{
    rt_buf *pay = pay_begin(r);
    mp_map(pay, 2);
    mp_str(pay, "code");
    mp_str(pay, code);
    mp_str(pay, "message");
    mp_str(pay, message);
}

/* Error reply {"code", "message"} of the same type and correlation id, to a connection or (c == NULL) to the
 * coordinator.  A frame that is itself an error (about_flags has F_ERROR) is never answered with an error:
 * two peers must not be able to bounce errors at each other through the router. */
void bti_router_send_error_flags(bt_router *r, rt_conn *c, uint8_t type, uint8_t prio, uint64_t corr, const char *code,
                                 const char *message, uint8_t about_flags)
{
    if (about_flags & BT_FRAME_F_ERROR)
        return;
    bti_router_error_payload(r, code, message);
    bt_frame_hdr h;
    hdr_init(&h, type, prio, BT_FRAME_F_REPLY | BT_FRAME_F_ERROR, BT_EP_NONE, c ? c->ep : BT_EP_COORDINATOR,
             corr);
    r->st.errors_sent++;
    if (c)
        bti_router_conn_emit(r, c, &h, r->pay.p, r->pay.len);
    else
        bti_router_coord_emit(r, &h, r->pay.p, r->pay.len);
}

void bti_router_send_error(bt_router *r, rt_conn *c, uint8_t type, uint8_t prio, uint64_t corr, const char *code,
                           const char *message)
{
    bti_router_send_error_flags(r, c, type, prio, corr, code, message, 0);
}

rt_conn *bti_router_conn_by_ep(bt_router *r, uint64_t ep)
{
    uint32_t slot;
    if (!map_get(&r->eps, ep, &slot))
        return NULL;
    rt_conn *c = r->conns[slot];
    return c && c->state == RT_OPEN ? c : NULL;
}

void bti_router_conn_write_watch(bt_router *r, rt_conn *c, int on)
{
    if (on == c->write_watched)
        return;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLET, .data.u32 = c->slot};
    if (epoll_ctl(r->wep, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, c->fd, &ev) == 0 || !on)
        c->write_watched = on;
}

void bti_router_conn_flush_sock(bt_router *r, rt_conn *c)
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
        bti_router_conn_write_watch(r, c, 0);
        return;
    }
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
    ssize_t w = sendmsg(c->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ENOBUFS) {
            bti_router_conn_mark_close(r, c, 1, "send failed: %s", strerror(errno));
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
            bti_router_conn_mark_close(r, c, 1, "out of memory for output");
        c->staged -= s->len;
        s->len = 0;
    }
    bti_router_conn_write_watch(r, c, buf_live(&c->out) > 0);
}

void bti_router_conn_flush(bt_router *r, rt_conn *c)
{
    if (c->drop_output)
        return;
    if (c->ring_state == RT_RING_ACTIVE)
        bti_router_conn_flush_ring(r, c);
    bti_router_conn_flush_sock(r, c);
}

/* ------------------------------------------------------------------------------------------------ */
/* Opening and closing.                                                                              */
/* ------------------------------------------------------------------------------------------------ */

void bti_router_conn_mark_close(bt_router *r, rt_conn *c, int drop_output, const char *fmt, ...)
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
            rt_conn **v = array_grow(r->conns, &r->conns_cap, 16, sizeof(*v));
            if (!v)
                return -ENOMEM;
            r->conns = v;
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
    bti_router_ep_open(r, c); /* before any frame of this endpoint: the coordinator batch is in order */
    *out = c;
    return 0;
}

int bti_router_conn_open(bt_router *r, int fd, const bt_peercred *cred, rt_conn **out)
{
    int rc = conn_new(r, fd, cred, out);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    /* Reported at once when bytes already wait (the watch is level-checked when made). */
    if (bt_io_watch(r->io, fd, RT_TAG((*out)->slot, 0)) < 0)
        bti_router_conn_mark_close(r, *out, 1, "cannot watch the socket");
    return 0;
}

void bti_router_conn_free(bt_router *r, rt_conn *c)
{
    if (c->write_watched)
        bti_router_conn_write_watch(r, c, 0);
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
void bti_router_conn_unroute(bt_router *r, rt_conn *c, int notify)
{
    map_del(&r->eps, c->ep);
    bti_router_route_forget(r, c);
    bt_io_unwatch(r->io, c->fd, RT_TAG(c->slot, 0));
    bti_router_ring_release(r, c);
    r->nopen--;
    r->st.closed++;
    if (notify) {
        /* Its held parents will never report: [parent, 0] for each, just before EP_CLOSED names them. */
        bti_router_conts_held_gone(r, c);
        bti_router_continued(r);
        bti_router_ep_closed(r, c);
    }
    c->nheld = 0;
}

/* The end of a closing connection: flush what may still go, unroute, then drain or free. */
void bti_router_conn_finish_close(bt_router *r, rt_conn *c)
{
    bti_router_conn_flush(r, c);
    if (c->reason[0])
        bti_router_log(r, c->drop_output ? "warning" : "info", "endpoint %llu closed: %s", (unsigned long long)c->ep,
                       c->reason);
    bti_router_conn_unroute(r, c, 1);
    if (!c->drop_output && buf_live(&c->out)) {
        /* Let the client take what is queued for it (an error reply, CTL_CLOSE's flush), bounded in time. */
        c->state = RT_DRAINING;
        c->drain_deadline = bt_now_ns() + RT_DRAIN_NS;
        shutdown(c->fd, SHUT_RD);
        u32v_push(&r->draining, c->slot);
        return;
    }
    bti_router_conn_free(r, c);
}

/* ------------------------------------------------------------------------------------------------ */
/* Input: socket bytes (and bti_router_feed) parsed in place.                                       */
/* ------------------------------------------------------------------------------------------------ */

/* A stream that cannot be resynchronised: answer (with the header's type and corr when they can be
 * trusted) and close after the reply. */
void bti_router_conn_bad_stream(bt_router *r, rt_conn *c, const uint8_t *p, size_t avail, int rc)
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
        bti_router_send_error(r, c, type, prio, corr, "too_large", msg);
    } else {
        bti_router_send_error(r, c, type, prio, corr, "bad_frame", strerror(-rc));
    }
    bti_router_conn_mark_close(r, c, 0, "%s: %s", rc == -EMSGSIZE ? "frame too large" : "malformed frame",
                               strerror(-rc));
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
            bti_router_conn_bad_stream(r, c, c->in + off, c->in_len - off, rc);
            off = c->in_len;
            break;
        }
        bti_router_conn_frame(r, c, &h, c->in + off + BT_FRAME_HEADER_SIZE);
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
int bti_router_conn_read(bt_router *r, rt_conn *c)
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
            bti_router_conn_mark_close(r, c, 1, "input buffer exhausted");
            return 0;
        }
        size_t room = c->in_cap - c->in_len;
        ssize_t n = recv(c->fd, c->in + c->in_len, room, MSG_DONTWAIT);
        if (n == 0) {
            bti_router_conn_mark_close(r, c, 1, "%s", "");
            c->reason[0] = '\0'; /* an orderly end of stream is not worth a log line */
            return 0;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            if (errno == EINTR)
                continue;
            bti_router_conn_mark_close(r, c, 1, "receive failed: %s", strerror(errno));
            return 0;
        }
        c->in_len += (size_t)n;
        conn_parse(r, c);
        if ((size_t)n == room && c->in_cap < RT_IN_GROW_MAX && c->in_cap < limit)
            conn_in_reserve(c, c->in_cap, limit); /* the stream outpaces the buffer: double it */
    }
    return c->state == RT_OPEN;
}

int bti_router_feed(bt_router *r, uint64_t ep, const void *data, size_t len)
{
    rt_conn *c = bti_router_conn_by_ep(r, ep);
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
