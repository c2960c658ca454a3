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
 *
 * This file is the router's lifecycle, its loop and accept (with the peer check); router_internal.h lists
 * the other modules.
 */
#include "router_internal.h"

#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------------ */
/* Accept.                                                                                            */
/* ------------------------------------------------------------------------------------------------ */

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
                bti_router_log(r, "error", "accept failed: %s", strerror(-fd));
            r->accept_retry = 1;
            return;
        }
        bt_peercred cred;
        int rc = bt_sock_peercred(fd, &cred);
        int ok = rc == 0 && (cred.uid == r->cfg.allowed_uid ||
                             (r->cfg.allowed_gid >= 0 && cred.gid == (uint64_t)r->cfg.allowed_gid));
        if (!ok) {
            r->st.refused++;
            bti_router_error_payload(r, "refused", "peer uid is not allowed to connect");
            bt_frame_hdr h;
            hdr_init(&h, BT_MSG_HELLO, BT_PRIO_HIGH, BT_FRAME_F_REPLY | BT_FRAME_F_ERROR, BT_EP_NONE, BT_EP_NONE,
                     0);
            uint8_t frame[BT_FRAME_HEADER_SIZE + 96];
            int n = bt_frame_encode(frame, sizeof(frame), &h, r->pay.p, r->pay.len);
            if (n > 0)
                (void)!send(fd, frame, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
            bti_router_log(r, "warning", "refused a connection from pid %d uid %u gid %u", rc == 0 ? cred.pid : -1,
                           rc == 0 ? cred.uid : 0, rc == 0 ? cred.gid : 0);
            close(fd);
            continue;
        }
        rt_conn *c;
        if (bti_router_conn_open(r, fd, &cred, &c) == 0)
            r->st.accepted++;
    }
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
                bti_router_conn_set_dirty(r, c);
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
            bti_router_conn_mark_close(r, c, 1, "socket watch failed: %s", strerror(-e->result));
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
        if (c->state == RT_OPEN && bti_router_conn_read(r, c))
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
            bti_router_conn_flush(r, c);
            if (c->ring_state == RT_RING_PENDING && c->state == RT_OPEN)
                bti_router_ring_ready_send(r, c);
        } else if (c->state == RT_DRAINING) {
            bti_router_conn_flush_sock(r, c);
            if (!buf_live(&c->out)) {
                u32v_remove(&r->draining, c->slot);
                bti_router_conn_free(r, c);
            }
        }
    }
    r->dirty.n = 0;
    bti_router_continued(r);  /* before DISPATCHED, which may hand out the children it released */
    bti_router_dispatched(r); /* before any EP_CLOSED of this turn, which may name the same ids */
    for (uint32_t i = 0; i < r->closing.n; i++) {
        rt_conn *c = r->conns[r->closing.v[i]];
        if (c && c->state == RT_CLOSING)
            bti_router_conn_finish_close(r, c);
    }
    r->closing.n = 0;
    bti_router_coord_publish(r); /* one publish for everything the coordinator gets this turn */
}

/* Anything that must be retried without an event: a coordinator backlog, client ring backlogs. */
static int rt_backlogged(bt_router *r)
{
    if (r->nclens > r->clen_off)
        return 1;
    for (uint32_t i = 0; i < r->ringconns.n; i++) {
        rt_conn *c = r->conns[r->ringconns.v[i]];
        if (c && buf_live(&c->backlog)) {
            bti_router_conn_set_dirty(r, c);
            return 1;
        }
    }
    return 0;
}

static int rt_poll_rings(bt_router *r)
{
    int work = bti_router_poll_coord(r);
    for (uint32_t i = 0; i < r->ringconns.n; i++) {
        rt_conn *c = r->conns[r->ringconns.v[i]];
        if (c && c->state == RT_OPEN) {
            work += bti_router_conn_poll_ring(r, c);
            if (buf_live(&c->backlog))
                bti_router_conn_set_dirty(r, c);
        }
    }
    return work;
}

static void rt_timers(bt_router *r)
{
    uint64_t now = bt_now_ns();
    bti_router_check_coord(r, now);
    if (r->accept_retry)
        rt_accept(r);
    for (uint32_t i = r->draining.n; i-- > 0;) {
        rt_conn *c = r->conns[r->draining.v[i]];
        if (c && c->state == RT_DRAINING && now >= c->drain_deadline) {
            r->draining.v[i] = r->draining.v[--r->draining.n];
            bti_router_conn_free(r, c);
        }
    }
    /* Edge-triggered write readiness can be missed if a send raced it; a periodic retry costs nothing. */
    for (uint32_t s = 0; s < r->nslots; s++) {
        rt_conn *c = r->conns[s];
        if (c && buf_live(&c->out))
            bti_router_conn_set_dirty(r, c);
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
    bti_router_check_coord(r, now);
    return work;
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
            bti_cpu_relax();
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
            bti_router_conn_mark_close(r, c, 0, "%s", "router shutting down");
    }
    rt_end_turn(r);
    if (r->exit_rc == 0)
        bti_router_log(r, "info", "router stopped");
    rt_end_turn(r);
}

int bt_router_run(bt_router *r)
{
    if (!r)
        return -EINVAL;
    bti_router_log(r, "info", "router started: backend %s, generation %u, max payload %u",
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
            bti_router_conn_unroute(r, c, 0);
        bti_router_conn_free(r, c);
    }
    if (r->io)
        bt_io_close(r->io); /* before the watched fds below go away */
    if (r->wep >= 0)
        close(r->wep);
    bt_ring_close(r->cin);
    bt_ring_close(r->cout);
    bti_router_route_fini(r);
    map_free(&r->eps);
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
    buf_free(&r->contd);
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
    int rc = bti_router_conn_open(r, fd, cred, &c);
    if (rc < 0)
        return rc;
    if (ep)
        *ep = c->ep;
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
    rt_conn *c = bti_router_conn_by_ep(r, ep);
    if (!c)
        return -ENOENT;
    bti_router_conn_mark_close(r, c, 1, "dropped");
    return 0;
}
