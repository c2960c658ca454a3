/*
 * router_route.c -- what a frame from a client does: DIRECT, PUBLISH, MULTICAST and BROADCAST routing,
 * topic and group membership, and the work queues (TASKs from the coordinator, queued by priority and
 * dispatched to agents with credit; a RESULT returns the credit and hands the agent its next task).
 */
#include "router_internal.h"

#include <stdio.h>

/* ------------------------------------------------------------------------------------------------ */
/* Work queues and credit.                                                                           */
/* ------------------------------------------------------------------------------------------------ */

static void conts_discard(bt_router *r, uint64_t parent);

static rt_queue *queue_get(bt_router *r, uint64_t id, int create)
{
    uint32_t idx;
    if (map_get(&r->qmap, id, &idx))
        return r->queues[idx];
    if (!create)
        return NULL;
    if (r->nqueues == r->qcap) {
        rt_queue **v = array_grow(r->queues, &r->qcap, 16, sizeof(*v));
        if (!v)
            return NULL;
        r->queues = v;
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

/* Room for `credit` held dispatches.  A dispatch is only made while nheld < credit, so with this reserved when
 * the credit is set, dispatch() never allocates: it cannot fail after a task has left its queue. */
static int conn_reserve_held(rt_conn *c, uint32_t credit)
{
    if (credit <= c->held_cap)
        return 0;
    uint64_t *v = realloc(c->held, (size_t)credit * sizeof(*v));
    if (!v)
        return -ENOMEM;
    c->held = v;
    c->held_cap = credit;
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
    c->held[c->nheld++] = dispatch_id; /* room reserved with the credit (conn_reserve_held) */
    uint8_t *p = bti_router_conn_stage(r, c, size, frame[6]);
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

/* The queued-id index (r->qids: dispatch id -> queued copies) answers CTL_CONTINUE's "is the parent known?"
 * without walking the queues.  Only queued tasks pay for it (a hash update in and out); a task dispatched
 * straight from the coordinator ring never enters it. */
static int qids_add(bt_router *r, uint64_t id)
{
    uint32_t n = 0;
    map_get(&r->qids, id, &n);
    return map_put(&r->qids, id, n + 1);
}

static void qids_remove(bt_router *r, uint64_t id)
{
    uint32_t n;
    if (!map_get(&r->qids, id, &n))
        return;
    if (n > 1)
        map_put(&r->qids, id, n - 1); /* replaces: cannot grow */
    else
        map_del(&r->qids, id);
}

/* Hand q's next task (q->ntasks > 0) to agent c. */
static void queue_dispatch_next(bt_router *r, rt_queue *q, rt_conn *c)
{
    rt_task *t = queue_pop(q);
    r->queued_total--;
    qids_remove(r, t->dispatch_id);
    dispatch(r, c, t->data, t->len, t->dispatch_id);
    task_free(r, t);
}

static void queue_pump(bt_router *r, rt_queue *q)
{
    while (!r->paused && q->ntasks) {
        rt_conn *c = queue_pick(r, q);
        if (!c)
            return;
        queue_dispatch_next(r, q, c);
    }
}

void bti_router_task_push(bt_router *r, const bt_frame_hdr *h, const uint8_t *frame, uint32_t size)
{
    r->st.tasks_in++;
    rt_queue *q = queue_get(r, h->destination, 1);
    if (!q)
        goto oom;
    if (!r->paused && q->ntasks == 0) {
        rt_conn *c = queue_pick(r, q);
        if (c) { /* the common case under load: straight through, never copied into the queue */
            dispatch(r, c, frame, size, h->correlation_id);
            return;
        }
    }
    rt_task *t = task_alloc(r, size);
    if (!t)
        goto oom;
    if (qids_add(r, h->correlation_id) < 0) {
        task_free(r, t);
        goto oom;
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
    return;
oom:
    bti_router_send_error(r, NULL, BT_MSG_TASK, h->priority, h->correlation_id, "internal", "router out of memory");
}

int bti_router_queue_revoke(bt_router *r, uint64_t qid, uint64_t dispatch_id)
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
            qids_remove(r, dispatch_id);
            task_free(r, t);
            r->st.revoked++;
            conts_discard(r, dispatch_id); /* a revoked parent never reports: its continuations go too */
            return 1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Continuations (CTL_CONTINUE; docs/protocol.md "Continuations", docs/router.md).                  */
/* ------------------------------------------------------------------------------------------------ */

/* One CONTINUED pair for this turn's batch (sent before DISPATCHED, bti_router_continued). */
static void conts_report(bt_router *r, uint64_t parent, int released)
{
    mp_uint(&r->contd, parent);
    mp_uint(&r->contd, (uint64_t)released);
    r->ncontd++;
    if (released)
        r->st.continued++;
    else
        r->st.cont_discarded++;
}

/* Take parent idx's list out of the store (the last entry moves into its place); returns its tasks. */
static rt_task *conts_take(bt_router *r, uint32_t idx)
{
    rt_conts *e = &r->conts[idx];
    rt_task *head = e->tasks.head;
    for (rt_task *t = head; t; t = t->next)
        r->nconts--;
    map_del(&r->cmap, e->parent);
    if (idx != r->nparents - 1) {
        *e = r->conts[r->nparents - 1];
        map_put(&r->cmap, e->parent, idx); /* replaces: cannot grow */
    }
    r->nparents--;
    return head;
}

static void tasks_free(bt_router *r, rt_task *t)
{
    while (t) {
        rt_task *next = t->next;
        task_free(r, t);
        t = next;
    }
}

/* Free discarded continuations and, with each, the continuations stored for it in turn (a chain registered
 * ahead), reporting [child, 0] for every child that had some.  A worklist, not recursion: a chain may be long. */
static void conts_drop(bt_router *r, rt_task *list)
{
    while (list) {
        rt_task *t = list;
        list = t->next;
        uint32_t idx;
        if (r->nconts && map_get(&r->cmap, t->dispatch_id, &idx)) {
            rt_task *more = conts_take(r, idx);
            conts_report(r, t->dispatch_id, 0);
            if (more) {
                rt_task *tail = more;
                while (tail->next)
                    tail = tail->next;
                tail->next = list;
                list = more;
            }
        }
        task_free(r, t);
    }
}

/* Discard parent's continuations, if it has any, and report [parent, 0]. */
static void conts_discard(bt_router *r, uint64_t parent)
{
    uint32_t idx;
    if (!r->nconts || !map_get(&r->cmap, parent, &idx))
        return;
    rt_task *list = conts_take(r, idx);
    conts_report(r, parent, 0);
    conts_drop(r, list);
}

/* The holder of parent sent its RESULT: release its continuations on {"ok": true}, else discard them. */
static void conts_settle(bt_router *r, uint64_t parent, const uint8_t *payload, uint32_t len)
{
    uint32_t idx;
    if (!map_get(&r->cmap, parent, &idx))
        return;
    rt_task *t = conts_take(r, idx);
    int ok = bt_result_ok(payload, len);
    conts_report(r, parent, ok);
    if (!ok) {
        conts_drop(r, t);
        return;
    }
    while (t) {
        rt_task *next = t->next;
        bt_frame_hdr h;
        /* Validated when it was stored (bti_router_ctl_continue): decoding again cannot fail. */
        if (bt_frame_decode(t->data, t->len, BT_FRAME_MAX_PAYLOAD_LIMIT, &h) == (int)t->len)
            bti_router_task_push(r, &h, t->data, t->len); /* exactly as if the coordinator had pushed it */
        task_free(r, t);
        t = next;
    }
}

/* Is dispatch id held by an agent, waiting in a queue, or itself a stored continuation (a chain registered
 * ahead: it reports once released and run, or is discarded with its parent)?  Only asked for a parent's first
 * continuation. */
static int dispatch_known(bt_router *r, uint64_t id)
{
    uint32_t n;
    if (map_get(&r->qids, id, &n))
        return 1;
    for (uint32_t i = 0; i < r->nparents; i++)
        for (const rt_task *t = r->conts[i].tasks.head; t; t = t->next)
            if (t->dispatch_id == id)
                return 1;
    /* Held dispatches: at most the sum of the agents' credit, scanned without an index so that dispatch and
     * RESULT -- the hot path -- keep no per-dispatch map. */
    for (uint32_t s = 0; s < r->nslots; s++) {
        rt_conn *c = r->conns[s];
        if (!c || c->state == RT_DRAINING)
            continue;
        for (uint32_t i = 0; i < c->nheld; i++)
            if (c->held[i] == id)
                return 1;
    }
    return 0;
}

/* Refuse a CTL_CONTINUE for parent: a warning, and the parent (with whatever it had stored) reported 0. */
static void conts_refuse(bt_router *r, uint64_t parent, const char *why)
{
    bti_router_log(r, "warning", "CTL_CONTINUE for dispatch %llu refused: %s", (unsigned long long)parent, why);
    uint32_t idx;
    rt_task *list = r->nconts && map_get(&r->cmap, parent, &idx) ? conts_take(r, idx) : NULL;
    conts_report(r, parent, 0);
    conts_drop(r, list);
}

void bti_router_ctl_continue(bt_router *r, const uint8_t *payload, uint32_t plen)
{
    if (plen < BT_CTL_CONTINUE_PARENT_SIZE) {
        bti_router_log(r, "warning", "CTL_CONTINUE with a %u-byte payload (no parent dispatch id); ignored", plen);
        return;
    }
    uint64_t parent = ld64(payload);
    const uint8_t *frame = payload + BT_CTL_CONTINUE_PARENT_SIZE;
    uint32_t size = plen - BT_CTL_CONTINUE_PARENT_SIZE;
    bt_frame_hdr h;
    int rc = bt_frame_decode(frame, size, r->cfg.max_payload, &h);
    if (rc < 0) {
        char why[80];
        snprintf(why, sizeof(why), "the embedded frame is malformed (%s)", strerror(-rc));
        conts_refuse(r, parent, why);
        return;
    }
    if ((uint32_t)rc != size) {
        conts_refuse(r, parent, "bytes after the embedded frame");
        return;
    }
    if (h.type != BT_MSG_TASK) {
        conts_refuse(r, parent, "the embedded frame is not a TASK");
        return;
    }
    if (r->nconts >= RT_CONT_MAX) {
        conts_refuse(r, parent, "too many continuations stored");
        return;
    }
    uint32_t idx;
    if (!r->nconts || !map_get(&r->cmap, parent, &idx)) {
        /* A parent's first continuation: it must be queued or held, else it can never report. */
        if (!dispatch_known(r, parent)) {
            conts_report(r, parent, 0);
            return;
        }
        if (r->nparents == r->parents_cap) {
            rt_conts *v = array_grow(r->conts, &r->parents_cap, 16, sizeof(*v));
            if (!v) {
                conts_refuse(r, parent, "out of memory");
                return;
            }
            r->conts = v;
        }
        if (map_put(&r->cmap, parent, r->nparents) < 0) {
            conts_refuse(r, parent, "out of memory");
            return;
        }
        idx = r->nparents++;
        r->conts[idx] = (rt_conts){.parent = parent};
    }
    rt_task *t = task_alloc(r, size);
    if (!t) {
        conts_refuse(r, parent, "out of memory");
        return;
    }
    t->next = NULL;
    t->dispatch_id = h.correlation_id;
    t->len = size;
    memcpy(t->data, frame, size);
    rt_fifo *f = &r->conts[idx].tasks;
    if (f->tail)
        f->tail->next = t;
    else
        f->head = t;
    f->tail = t;
    r->nconts++;
}

void bti_router_conts_held_gone(bt_router *r, const rt_conn *c)
{
    for (uint32_t i = 0; r->nconts && i < c->nheld; i++)
        conts_discard(r, c->held[i]);
}

void bti_router_conts_clear(bt_router *r)
{
    while (r->nparents)
        tasks_free(r, conts_take(r, r->nparents - 1));
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

/* CTL_AGENT: c serves queue qid (0: none) with this credit; a queue it joins or its new credit may dispatch. */
void bti_router_agent_set(bt_router *r, rt_conn *c, uint64_t qid, uint32_t credit)
{
    /* First, so that running out of memory leaves the agent exactly as it was (queue and credit). */
    if (conn_reserve_held(c, credit) < 0) {
        bti_router_log(r, "error", "out of memory reserving credit %u; the agent keeps credit %u", credit, c->credit);
        return;
    }
    if (c->queue != qid) {
        agent_leave_queue(r, c);
        if (qid) {
            rt_queue *q = queue_get(r, qid, 1);
            if (!q || u32v_push(&q->agents, c->slot) < 0) {
                bti_router_log(r, "error", "out of memory adding an agent to a queue");
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
}

/* CTL_PAUSE: paused stops every dispatch; resuming pumps every queue. */
void bti_router_set_paused(bt_router *r, int paused)
{
    r->paused = paused;
    if (!r->paused)
        for (uint32_t i = 0; i < r->nqueues; i++)
            queue_pump(r, r->queues[i]);
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
            rt_set *v = array_grow(s->v, &s->cap, 16, sizeof(*v));
            if (!v)
                return -ENOMEM;
            s->v = v;
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

void bti_router_route_forget(bt_router *r, rt_conn *c)
{
    sets_remove_everywhere(&r->topics, c->slot);
    sets_remove_everywhere(&r->groups, c->slot);
    agent_leave_queue(r, c);
}

void bti_router_route_fini(bt_router *r)
{
    bti_router_conts_clear(r); /* first: its records go to the free list, freed below */
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
    free(r->conts);
    map_free(&r->cmap);
    map_free(&r->qids);
    free(r->queues);
    map_free(&r->qmap);
    sets_free(&r->topics);
    sets_free(&r->groups);
}

/* ------------------------------------------------------------------------------------------------ */
/* Routing client frames.                                                                           */
/* ------------------------------------------------------------------------------------------------ */

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
            bti_router_conn_emit_raw(r, c, frame, size, prio);
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
void bti_router_route_common(bt_router *r, rt_conn *from, const bt_frame_hdr *h, const uint8_t *payload)
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
                bti_router_conn_emit_raw(r, c, frame, size, h->priority);
        }
        return;
    default: {
        /* DIRECT, and anything else addressed to one endpoint. */
        if (h->destination == BT_EP_COORDINATOR && from) {
            bti_router_coord_emit(r, h, payload, h->payload_len);
            return;
        }
        rt_conn *to = bti_router_conn_by_ep(r, h->destination);
        if (to) {
            bti_router_conn_emit(r, to, h, payload, h->payload_len);
            return;
        }
        r->st.unknown_dest++;
        if (!from && (h->flags & BT_FRAME_F_REPLY))
            return; /* a reply for an endpoint that has gone: nobody to tell */
        char msg[96];
        snprintf(msg, sizeof(msg), "no endpoint %llu", (unsigned long long)h->destination);
        bti_router_send_error_flags(r, from, h->type, h->priority, h->correlation_id, "no_such_endpoint", msg,
                                    h->flags);
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
        bti_router_send_error(r, c, h->type, h->priority, h->correlation_id, "internal", "router out of memory");
        return;
    }
    if (h->correlation_id) {
        bt_frame_hdr a;
        hdr_init(&a, h->type, h->priority, BT_FRAME_F_REPLY, BT_EP_NONE, c->ep, h->correlation_id);
        a.destination = h->destination;
        bti_router_conn_emit(r, c, &a, NULL, 0);
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
    bti_router_coord_emit(r, h, payload, h->payload_len);
    /* Continuations first, so a released child can go to this agent (or another) in this turn.  With none
     * stored anywhere (the common case) this is one test; otherwise one hash lookup. */
    if (found && r->nconts)
        conts_settle(r, h->correlation_id, payload, h->payload_len);
    if (!found || !c->queue || r->paused)
        return;
    /* The handoff: this agent's next task goes out in this same turn, without the coordinator. */
    rt_queue *q = queue_get(r, c->queue, 0);
    if (q && q->ntasks && c->nheld < c->credit)
        queue_dispatch_next(r, q, c);
    if (q)
        queue_pump(r, q);
}

/* ROUTER_STATS "by_pattern": the pattern of each frame type (0, RT_PAT_CONTROL, for every type not named). */
const uint8_t bti_router_pattern_of[256] = {
    [BT_MSG_DIRECT] = RT_PAT_DIRECT,       [BT_MSG_PUBLISH] = RT_PAT_PUBLISH, [BT_MSG_MULTICAST] = RT_PAT_MULTICAST,
    [BT_MSG_BROADCAST] = RT_PAT_BROADCAST, [BT_MSG_TASK] = RT_PAT_TASK,       [BT_MSG_RESULT] = RT_PAT_RESULT,
};

const char *const bti_router_pattern_names[RT_PAT_COUNT] = {
    [RT_PAT_CONTROL] = "control",     [RT_PAT_DIRECT] = "direct",       [RT_PAT_REQUEST] = "request",
    [RT_PAT_REPLY] = "reply",         [RT_PAT_PUBLISH] = "publish",     [RT_PAT_MULTICAST] = "multicast",
    [RT_PAT_BROADCAST] = "broadcast", [RT_PAT_TASK] = "task",           [RT_PAT_RESULT] = "result",
};

/* One validated frame from client c (payload is h->payload_len bytes). */
void bti_router_conn_frame(bt_router *r, rt_conn *c, bt_frame_hdr *h, const uint8_t *payload)
{
    r->st.frames_in++;
    rt_count_in(&r->st, h);
    h->source = c->ep; /* nobody speaks for another endpoint */
    switch (h->type) {
    case BT_MSG_HELLO:
    case BT_MSG_CALL:
    case BT_MSG_HEARTBEAT:
        bti_router_coord_emit(r, h, payload, h->payload_len);
        return;
    case BT_MSG_RESULT:
        result_in(r, c, h, payload);
        return;
    case BT_MSG_DIRECT:
    case BT_MSG_PUBLISH:
    case BT_MSG_MULTICAST:
    case BT_MSG_BROADCAST:
        bti_router_route_common(r, c, h, payload);
        return;
    case BT_MSG_SUBSCRIBE:
    case BT_MSG_UNSUBSCRIBE:
    case BT_MSG_JOIN:
    case BT_MSG_LEAVE:
        membership(r, c, h);
        return;
    case BT_MSG_RING_SETUP:
        bti_router_ring_setup(r, c, h);
        return;
    case BT_MSG_PING: {
        bt_frame_hdr a;
        hdr_init(&a, BT_MSG_PING, h->priority, BT_FRAME_F_REPLY, BT_EP_NONE, c->ep, h->correlation_id);
        bti_router_conn_emit(r, c, &a, payload, h->payload_len);
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
    case BT_MSG_CONTINUED:
    case BT_MSG_CTL_CONTINUE:
        bti_router_send_error_flags(r, c, h->type, h->priority, h->correlation_id, "forbidden",
                                    "only the coordinator may send this frame type", h->flags);
        return;
    default: {
        char msg[64];
        snprintf(msg, sizeof(msg), "unknown frame type %u", h->type);
        bti_router_send_error_flags(r, c, h->type, h->priority, h->correlation_id, "unknown_type", msg, h->flags);
        return;
    }
    }
}
