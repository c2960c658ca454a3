/*
 * test_router.c -- the C router end to end: bt_router_run in a thread, this thread playing the coordinator
 * through a real ring pair with doorbells, clients on a real unix socket.  Covers endpoint ids and source
 * overwrite, PING, DIRECT and no_such_endpoint, pub/sub with acks, multicast, broadcast, work queues with
 * priorities, credit and the RESULT handoff, revoke, pause, stats (the by_pattern cells of a known mix, exactly;
 * malformed frames left out), EP_CLOSED with held dispatches, forbidden and unknown types, bad and oversized
 * frames, ring setup (RING_READY with 4 fds, traffic both ways over the rings) and shutdown.  Peer refusal
 * needs a second uid: tests/python/test_native_router.py covers it.
 */
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "baton.h"
#include "bt_test.h"

#define MAXP 4096u
#define GEN 7u
#define TIMEOUT_MS 5000

typedef struct frame {
    bt_frame_hdr h;
    uint8_t payload[MAXP + 64];
} frame;

/* ---- the coordinator's end ---- */
static bt_ring *c_out, *c_in; /* coordinator -> router (producer), router -> coordinator (consumer) */
static int bell_in, bell_out; /* router's doorbell (we ring it), ours (the router rings it) */
static bt_router *router;
static int router_rc = 12345;

static void *router_thread(void *arg)
{
    (void)arg;
    router_rc = bt_router_run(router);
    return NULL;
}

static void coord_send(uint8_t type, uint8_t prio, uint64_t dst, uint64_t corr, const void *p, size_t len)
{
    uint8_t buf[BT_FRAME_HEADER_SIZE + MAXP];
    bt_frame_hdr h = {.type = type, .priority = prio, .source = BT_EP_COORDINATOR, .destination = dst,
                      .correlation_id = corr};
    int n = bt_frame_encode(buf, sizeof(buf), &h, p, len);
    CHECK(n > 0);
    CHECK_EQ(bt_ring_write(c_out, buf, (uint32_t)n), 0);
}

static void drain_bell(int fd)
{
    uint64_t v;
    while (read(fd, &v, sizeof(v)) == 8)
        ;
}

/* Next frame from the router (ROUTER_LOG skipped unless want_logs), waiting at most TIMEOUT_MS. */
static int coord_next(frame *f, int want_logs)
{
    static uint8_t buf[1 << 16];
    static uint32_t lens[256];
    static int n = 0, i = 0;
    static size_t off = 0;
    uint64_t deadline = bt_now_ns() + (uint64_t)TIMEOUT_MS * 1000000ull;
    for (;;) {
        while (i < n) {
            const uint8_t *p = buf + off;
            uint32_t len = lens[i++];
            off += len;
            CHECK_EQ(bt_frame_decode(p, len, 0, &f->h), (int)len);
            memcpy(f->payload, p + BT_FRAME_HEADER_SIZE, f->h.payload_len);
            if (f->h.type == BT_MSG_ROUTER_LOG && !want_logs)
                continue;
            return 1;
        }
        int rc = bt_ring_read_batch(c_in, buf, sizeof(buf), lens, 256);
        if (rc > 0) {
            n = rc;
            i = 0;
            off = 0;
            continue;
        }
        CHECK_EQ(rc, -EAGAIN);
        rc = bt_ring_arm(c_in);
        if (rc == 1)
            continue;
        if (rc == -EPIPE)
            return 0;
        CHECK_EQ(rc, 0);
        uint64_t now = bt_now_ns();
        if (now >= deadline) {
            bt_ring_disarm(c_in);
            return 0;
        }
        struct pollfd pfd = {.fd = bell_out, .events = POLLIN};
        poll(&pfd, 1, (int)((deadline - now) / 1000000ull) + 1);
        drain_bell(bell_out);
        bt_ring_disarm(c_in);
    }
}

/* Skip frames until one of this type arrives. */
static void coord_expect(frame *f, uint8_t type)
{
    for (;;) {
        if (!coord_next(f, type == BT_MSG_ROUTER_LOG)) {
            fprintf(stderr, "coordinator: timed out waiting for type %u\n", type);
            exit(1);
        }
        if (f->h.type == type)
            return;
    }
}

/* ---- msgpack reading for the checks: unsigned ints and arrays only ---- */
static uint64_t mp_uint(const uint8_t **p)
{
    uint8_t t = *(*p)++;
    if (t < 0x80)
        return t;
    int n = t == 0xcc ? 1 : t == 0xcd ? 2 : t == 0xce ? 4 : t == 0xcf ? 8 : -1;
    CHECK(n > 0);
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | *(*p)++;
    return v;
}

/* A msgpack array or map header: the fix form (fix | n) or the 16-bit one (tag16, n big-endian). */
static uint32_t mp_len(const uint8_t **p, uint8_t fix, uint8_t tag16)
{
    uint8_t t = *(*p)++;
    if ((t & 0xf0) == fix)
        return t & 0x0f;
    CHECK_EQ(t, tag16);
    uint32_t n = (uint32_t)(*p)[0] << 8 | (*p)[1];
    *p += 2;
    return n;
}

static uint32_t mp_array(const uint8_t **p)
{
    return mp_len(p, 0x90, 0xdc);
}

static int has(const frame *f, const char *s)
{
    return memmem(f->payload, f->h.payload_len, s, strlen(s)) != NULL;
}

/* ---- clients ---- */
typedef struct client {
    int fd;
    uint64_t ep;
    bt_frame_reader *rd;
} client;

static const char *sock_path;

static void cl_connect(client *c)
{
    c->fd = bt_sock_connect(sock_path);
    CHECK(c->fd >= 0);
    CHECK_EQ(bt_frame_reader_open(0, &c->rd), 0);
    frame f;
    coord_expect(&f, BT_MSG_EP_OPEN);
    c->ep = f.h.source;
    CHECK_EQ(c->ep >> 32, GEN);
    CHECK(((uint32_t)c->ep) >= 2);
    const uint8_t *p = f.payload;
    CHECK_EQ(mp_array(&p), 3);
    CHECK_EQ(mp_uint(&p), (uint64_t)getpid());
    CHECK_EQ(mp_uint(&p), getuid());
}

static void cl_send(client *c, uint8_t type, uint8_t prio, uint8_t flags, uint64_t dst, uint64_t corr,
                    const void *p, size_t len)
{
    uint8_t buf[BT_FRAME_HEADER_SIZE + 2 * MAXP];
    /* A forged source: the router must overwrite it. */
    bt_frame_hdr h = {.type = type, .priority = prio, .flags = flags, .source = 999, .destination = dst,
                      .correlation_id = corr};
    int n = bt_frame_encode(buf, sizeof(buf), &h, p, len);
    CHECK(n > 0);
    CHECK_EQ(bt_sock_send_all(c->fd, buf, (size_t)n), 0);
}

/* Next frame for this client; 0 at end of stream. */
static int cl_recv(client *c, frame *f)
{
    for (;;) {
        const void *payload;
        int rc = bt_frame_reader_next(c->rd, &f->h, &payload);
        CHECK(rc >= 0);
        if (rc == 1) {
            memcpy(f->payload, payload, f->h.payload_len);
            return 1;
        }
        struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
        if (poll(&pfd, 1, TIMEOUT_MS) != 1) {
            fprintf(stderr, "client %llu: timed out\n", (unsigned long long)c->ep);
            exit(1);
        }
        rc = bt_frame_reader_fill(c->rd, c->fd);
        if (rc == -EPIPE || rc == -ECONNRESET)
            return 0;
        CHECK(rc > 0 || rc == -EAGAIN);
    }
}

static void cl_expect(client *c, frame *f, uint8_t type, uint8_t flags)
{
    CHECK(cl_recv(c, f));
    if (f->h.type != type || f->h.flags != flags)
        fprintf(stderr, "client got type %u flags %x, wanted %u %x\n", f->h.type, f->h.flags, type, flags);
    CHECK_EQ(f->h.type, type);
    CHECK_EQ(f->h.flags, flags);
}

/* A PING round trip: everything the router sent this client before it has arrived. */
static void cl_sync(client *c)
{
    frame f;
    cl_send(c, BT_MSG_PING, BT_PRIO_NORMAL, 0, 0, 4242, "sync", 4);
    cl_expect(c, &f, BT_MSG_PING, BT_FRAME_F_REPLY);
    CHECK_EQ(f.h.correlation_id, 4242);
}

static void cl_close(client *c)
{
    close(c->fd);
    bt_frame_reader_close(c->rd);
}

/* ---- ROUTER_STATS reading: the flat counters and by_pattern ---- */
static const char *const pattern_names[] = {"control", "direct",    "request", "reply", "publish",
                                            "multicast", "broadcast", "task",    "result"};
static const char *const prio_names[BT_PRIO_COUNT] = {"critical", "high", "normal", "low", "batch"};
#define NPAT (sizeof(pattern_names) / sizeof(pattern_names[0]))

typedef struct stats {
    uint64_t cells[NPAT][BT_PRIO_COUNT][2]; /* by_pattern: frames, bytes (0 when the cell is absent) */
    uint64_t frames_in, coord_in, bad_frames;
    int has_backlog_events, has_coord_ring_full, has_by_pattern;
} stats;

static uint32_t mp_map_n(const uint8_t **p)
{
    return mp_len(p, 0x80, 0xde);
}

/* A string (fixstr or str8) copied into out, NUL terminated. */
static void mp_key(const uint8_t **p, char *out, size_t cap)
{
    uint8_t t = *(*p)++;
    size_t n;
    if ((t & 0xe0) == 0xa0) {
        n = t & 0x1f;
    } else {
        CHECK_EQ(t, 0xd9);
        n = *(*p)++;
    }
    CHECK(n < cap);
    memcpy(out, *p, n);
    out[n] = 0;
    *p += n;
}

static int name_index(const char *const *names, int n, const char *s)
{
    for (int i = 0; i < n; i++)
        if (strcmp(names[i], s) == 0)
            return i;
    fprintf(stderr, "unexpected name in ROUTER_STATS: %s\n", s);
    exit(1);
}

static void parse_stats(const frame *f, stats *st)
{
    memset(st, 0, sizeof(*st));
    const uint8_t *p = f->payload;
    char key[64];
    uint32_t n = mp_map_n(&p);
    for (uint32_t i = 0; i < n; i++) {
        mp_key(&p, key, sizeof(key));
        if (strcmp(key, "by_pattern") != 0) {
            uint64_t v = mp_uint(&p);
            if (strcmp(key, "frames_in") == 0)
                st->frames_in = v;
            else if (strcmp(key, "coord_in") == 0)
                st->coord_in = v;
            else if (strcmp(key, "bad_frames") == 0)
                st->bad_frames = v;
            st->has_backlog_events |= strcmp(key, "ring_backlog_events") == 0;
            st->has_coord_ring_full |= strcmp(key, "coord_ring_full") == 0;
            continue;
        }
        st->has_by_pattern = 1;
        uint32_t npat = mp_map_n(&p);
        for (uint32_t k = 0; k < npat; k++) {
            mp_key(&p, key, sizeof(key));
            int pat = name_index(pattern_names, (int)NPAT, key);
            uint32_t nprio = mp_map_n(&p);
            CHECK(nprio > 0); /* only nonzero cells are listed */
            for (uint32_t j = 0; j < nprio; j++) {
                mp_key(&p, key, sizeof(key));
                int prio = name_index(prio_names, BT_PRIO_COUNT, key);
                CHECK_EQ(mp_array(&p), 2);
                st->cells[pat][prio][0] = mp_uint(&p);
                st->cells[pat][prio][1] = mp_uint(&p);
                CHECK(st->cells[pat][prio][0] > 0);
            }
        }
    }
    CHECK_EQ((size_t)(p - f->payload), f->h.payload_len);
}

static void get_stats(stats *st, uint64_t corr)
{
    frame f;
    coord_send(BT_MSG_CTL_STATS, BT_PRIO_HIGH, 0, corr, NULL, 0);
    coord_expect(&f, BT_MSG_ROUTER_STATS);
    CHECK_EQ(f.h.correlation_id, corr);
    CHECK_EQ(f.h.flags, BT_FRAME_F_REPLY);
    parse_stats(&f, st);
}

/* ---- scenarios ---- */

/* On a fresh router: a known mix of frames, then by_pattern must hold exactly these cells (the CTL_STATS that
 * asks is counted too, before the reply is built). */
static void t_stats(client *a, client *b, client *c)
{
    frame f;
    stats want;
    memset(&want, 0, sizeof(want));
#define WANT(pat, prio, plen) (want.cells[pat][prio][0]++, want.cells[pat][prio][1] += BT_FRAME_HEADER_SIZE + (plen))
    enum { CONTROL, DIRECT, REQUEST, REPLY, PUBLISH, MULTICAST, BROADCAST, TASK, RESULT };
    cl_send(a, BT_MSG_DIRECT, BT_PRIO_NORMAL, 0, b->ep, 0, "one", 3); /* one-way */
    WANT(DIRECT, BT_PRIO_NORMAL, 3);
    cl_expect(b, &f, BT_MSG_DIRECT, 0);
    cl_send(a, BT_MSG_DIRECT, BT_PRIO_HIGH, 0, b->ep, 7, "req!", 4);
    WANT(REQUEST, BT_PRIO_HIGH, 4);
    cl_expect(b, &f, BT_MSG_DIRECT, 0);
    cl_send(b, BT_MSG_DIRECT, BT_PRIO_CRITICAL, BT_FRAME_F_REPLY, a->ep, 7, "re", 2);
    WANT(REPLY, BT_PRIO_CRITICAL, 2);
    cl_expect(a, &f, BT_MSG_DIRECT, BT_FRAME_F_REPLY);
    /* Publications and multicasts count as taken in even when nobody listens. */
    cl_send(a, BT_MSG_PUBLISH, BT_PRIO_LOW, 0, 0x9999, 0, "pub", 3);
    WANT(PUBLISH, BT_PRIO_LOW, 3);
    cl_send(a, BT_MSG_MULTICAST, BT_PRIO_NORMAL, 0, 0x8888, 0, "mc", 2);
    WANT(MULTICAST, BT_PRIO_NORMAL, 2);
    cl_send(c, BT_MSG_BROADCAST, BT_PRIO_NORMAL, 0, 0, 0, "b1", 2);
    cl_send(c, BT_MSG_BROADCAST, BT_PRIO_BATCH, 0, 0, 0, "b2b2", 4);
    WANT(BROADCAST, BT_PRIO_NORMAL, 2);
    WANT(BROADCAST, BT_PRIO_BATCH, 4);
    for (int i = 0; i < 2; i++) {
        cl_expect(a, &f, BT_MSG_BROADCAST, 0);
        cl_expect(b, &f, BT_MSG_BROADCAST, 0);
    }
    /* A TASK from the coordinator (to a queue nobody serves: it waits there), a RESULT from a client. */
    const uint64_t q = 0x57A75;
    coord_send(BT_MSG_TASK, BT_PRIO_HIGH, q, 4321, "task", 4);
    WANT(TASK, BT_PRIO_HIGH, 4);
    cl_send(b, BT_MSG_RESULT, BT_PRIO_HIGH, 0, BT_EP_COORDINATOR, 1234, "ok", 2);
    WANT(RESULT, BT_PRIO_HIGH, 2);
    coord_expect(&f, BT_MSG_RESULT);
    /* HELLO, the coordinator's WELCOME, a CALL: control. */
    cl_send(a, BT_MSG_HELLO, BT_PRIO_HIGH, 0, BT_EP_COORDINATOR, 77, "\x80", 1);
    WANT(CONTROL, BT_PRIO_HIGH, 1);
    coord_expect(&f, BT_MSG_HELLO);
    coord_send(BT_MSG_WELCOME, BT_PRIO_HIGH, a->ep, 77, "\x80", 1);
    WANT(CONTROL, BT_PRIO_HIGH, 1);
    cl_expect(a, &f, BT_MSG_WELCOME, 0);
    cl_send(a, BT_MSG_CALL, BT_PRIO_NORMAL, 0, BT_EP_COORDINATOR, 78, "\x80", 1);
    WANT(CONTROL, BT_PRIO_NORMAL, 1);
    coord_expect(&f, BT_MSG_CALL);
    WANT(CONTROL, BT_PRIO_HIGH, 0); /* the CTL_STATS itself */
#undef WANT
    stats got;
    get_stats(&got, 70);
    CHECK(got.has_by_pattern && got.has_backlog_events && got.has_coord_ring_full);
    for (size_t p = 0; p < NPAT; p++) {
        for (int prio = 0; prio < BT_PRIO_COUNT; prio++) {
            if (got.cells[p][prio][0] != want.cells[p][prio][0] || got.cells[p][prio][1] != want.cells[p][prio][1])
                fprintf(stderr, "by_pattern %s/%s: got [%llu, %llu], want [%llu, %llu]\n", pattern_names[p],
                        prio_names[prio], (unsigned long long)got.cells[p][prio][0],
                        (unsigned long long)got.cells[p][prio][1], (unsigned long long)want.cells[p][prio][0],
                        (unsigned long long)want.cells[p][prio][1]);
            CHECK_EQ(got.cells[p][prio][0], want.cells[p][prio][0]);
            CHECK_EQ(got.cells[p][prio][1], want.cells[p][prio][1]);
        }
    }
    CHECK_EQ(got.frames_in, 10); /* from clients */
    CHECK_EQ(got.coord_in, 3);   /* TASK, WELCOME, CTL_STATS */
    CHECK_EQ(got.bad_frames, 0);
    /* Leave no task behind for the later scenarios. */
    uint64_t rv[2] = {q, 4321};
    coord_send(BT_MSG_CTL_REVOKE, BT_PRIO_HIGH, 0, 903, rv, 16);
    coord_expect(&f, BT_MSG_CTL_REVOKE);
}

/* A malformed frame stays out of by_pattern: only bad_frames counts it. */
static void t_stats_bad_frame(void)
{
    stats before, after;
    get_stats(&before, 74);
    client x;
    cl_connect(&x);
    uint8_t junk[BT_FRAME_HEADER_SIZE];
    memset(junk, 0xEE, sizeof(junk));
    CHECK_EQ(bt_sock_send_all(x.fd, junk, sizeof(junk)), 0);
    frame f;
    cl_expect(&x, &f, 0, BT_FRAME_F_REPLY | BT_FRAME_F_ERROR);
    CHECK_EQ(cl_recv(&x, &f), 0);
    coord_expect(&f, BT_MSG_EP_CLOSED);
    cl_close(&x);
    get_stats(&after, 75);
    CHECK_EQ(after.bad_frames, before.bad_frames + 1);
    for (size_t p = 0; p < NPAT; p++) {
        for (int prio = 0; prio < BT_PRIO_COUNT; prio++) {
            /* Only the second CTL_STATS (control, HIGH, 48 bytes) was taken in between. */
            int ctl = p == 0 && prio == BT_PRIO_HIGH;
            CHECK_EQ(after.cells[p][prio][0], before.cells[p][prio][0] + (uint64_t)ctl);
            CHECK_EQ(after.cells[p][prio][1], before.cells[p][prio][1] + (uint64_t)ctl * BT_FRAME_HEADER_SIZE);
        }
    }
}

static void t_ping_direct_hello(client *a, client *b)
{
    frame f;
    cl_send(a, BT_MSG_PING, BT_PRIO_HIGH, 0, 0, 11, "hi", 2);
    cl_expect(a, &f, BT_MSG_PING, BT_FRAME_F_REPLY);
    CHECK_EQ(f.h.correlation_id, 11);
    CHECK_EQ(f.h.payload_len, 2);
    CHECK(memcmp(f.payload, "hi", 2) == 0);

    cl_send(a, BT_MSG_DIRECT, BT_PRIO_NORMAL, 0, b->ep, 5, "msg", 3);
    cl_expect(b, &f, BT_MSG_DIRECT, 0);
    CHECK_EQ(f.h.source, a->ep);
    CHECK_EQ(f.h.correlation_id, 5);
    cl_send(b, BT_MSG_DIRECT, BT_PRIO_NORMAL, BT_FRAME_F_REPLY, a->ep, 5, "re", 2);
    cl_expect(a, &f, BT_MSG_DIRECT, BT_FRAME_F_REPLY);
    CHECK_EQ(f.h.source, b->ep);

    cl_send(a, BT_MSG_DIRECT, BT_PRIO_NORMAL, 0, ((uint64_t)GEN << 32) | 99999, 6, "x", 1);
    cl_expect(a, &f, BT_MSG_DIRECT, BT_FRAME_F_REPLY | BT_FRAME_F_ERROR);
    CHECK_EQ(f.h.correlation_id, 6);
    CHECK(has(&f, "no_such_endpoint"));

    cl_send(a, BT_MSG_HELLO, BT_PRIO_HIGH, 0, BT_EP_COORDINATOR, 77, "\x80", 1);
    coord_expect(&f, BT_MSG_HELLO);
    CHECK_EQ(f.h.source, a->ep);
    CHECK_EQ(f.h.correlation_id, 77);
    /* The coordinator answers; the router delivers by destination. */
    coord_send(BT_MSG_WELCOME, BT_PRIO_HIGH, a->ep, 77, "\x80", 1);
    cl_expect(a, &f, BT_MSG_WELCOME, 0);
    CHECK_EQ(f.h.correlation_id, 77);
    /* DIRECT to the coordinator goes to the coordinator. */
    cl_send(b, BT_MSG_DIRECT, BT_PRIO_NORMAL, 0, BT_EP_COORDINATOR, 8, "c", 1);
    coord_expect(&f, BT_MSG_DIRECT);
    CHECK_EQ(f.h.source, b->ep);
}

static void t_pubsub_groups(client *a, client *b, client *c)
{
    frame f;
    const uint64_t topic = 0x1234, group = 0x5678;
    cl_send(a, BT_MSG_SUBSCRIBE, BT_PRIO_NORMAL, 0, topic, 21, NULL, 0);
    cl_expect(a, &f, BT_MSG_SUBSCRIBE, BT_FRAME_F_REPLY);
    CHECK_EQ(f.h.correlation_id, 21);
    cl_send(b, BT_MSG_SUBSCRIBE, BT_PRIO_NORMAL, 0, topic, 0, NULL, 0); /* corr 0: no ack */
    cl_sync(b);
    cl_send(c, BT_MSG_PUBLISH, BT_PRIO_NORMAL, 0, topic, 0, "news", 4);
    cl_expect(a, &f, BT_MSG_PUBLISH, 0);
    CHECK_EQ(f.h.source, c->ep);
    cl_expect(b, &f, BT_MSG_PUBLISH, 0);
    cl_send(b, BT_MSG_UNSUBSCRIBE, BT_PRIO_NORMAL, 0, topic, 22, NULL, 0);
    cl_expect(b, &f, BT_MSG_UNSUBSCRIBE, BT_FRAME_F_REPLY);
    /* The publisher gets its own publication when subscribed. */
    cl_send(a, BT_MSG_PUBLISH, BT_PRIO_NORMAL, 0, topic, 0, "self", 4);
    cl_expect(a, &f, BT_MSG_PUBLISH, 0);
    CHECK_EQ(f.h.source, a->ep);
    cl_sync(b); /* b unsubscribed: its next frame is the ping reply, not the publication */

    cl_send(a, BT_MSG_JOIN, BT_PRIO_NORMAL, 0, group, 31, NULL, 0);
    cl_expect(a, &f, BT_MSG_JOIN, BT_FRAME_F_REPLY);
    cl_send(b, BT_MSG_JOIN, BT_PRIO_NORMAL, 0, group, 32, NULL, 0);
    cl_expect(b, &f, BT_MSG_JOIN, BT_FRAME_F_REPLY);
    cl_send(a, BT_MSG_MULTICAST, BT_PRIO_NORMAL, 0, group, 0, "mc", 2);
    cl_expect(b, &f, BT_MSG_MULTICAST, 0);
    CHECK_EQ(f.h.source, a->ep);
    cl_sync(a); /* not delivered to the sender */
    cl_sync(c); /* nor to a non-member */
    cl_send(b, BT_MSG_LEAVE, BT_PRIO_NORMAL, 0, group, 33, NULL, 0);
    cl_expect(b, &f, BT_MSG_LEAVE, BT_FRAME_F_REPLY);

    cl_send(c, BT_MSG_BROADCAST, BT_PRIO_NORMAL, 0, 0, 0, "all", 3);
    cl_expect(a, &f, BT_MSG_BROADCAST, 0);
    cl_expect(b, &f, BT_MSG_BROADCAST, 0);
    CHECK_EQ(f.h.source, c->ep);
    cl_sync(c);
    /* Coordinator broadcasts reach every client. */
    coord_send(BT_MSG_BROADCAST, BT_PRIO_NORMAL, 0, 0, "co", 2);
    cl_expect(a, &f, BT_MSG_BROADCAST, 0);
    cl_expect(c, &f, BT_MSG_BROADCAST, 0);
    cl_expect(b, &f, BT_MSG_BROADCAST, 0);
}

static void ctl_agent(uint64_t ep, uint64_t q, uint32_t credit)
{
    uint8_t p[20];
    memcpy(p, &ep, 8);
    memcpy(p + 8, &q, 8);
    memcpy(p + 16, &credit, 4);
    coord_send(BT_MSG_CTL_AGENT, BT_PRIO_HIGH, 0, 0, p, 20);
}

static void ctl_pause(uint32_t on)
{
    coord_send(BT_MSG_CTL_PAUSE, BT_PRIO_HIGH, 0, 0, &on, 4);
}

/* Collect DISPATCHED pairs until n dispatches were reported: the agent in eps[i], the dispatch id in ids[i]. */
static void expect_dispatched(int n, uint64_t *eps, uint64_t *ids)
{
    int got = 0;
    while (got < n) {
        frame f;
        coord_expect(&f, BT_MSG_DISPATCHED);
        const uint8_t *p = f.payload;
        uint32_t k = mp_array(&p);
        CHECK_EQ(k % 2, 0);
        for (uint32_t i = 0; i < k; i += 2) {
            CHECK(got < n);
            eps[got] = mp_uint(&p);
            ids[got] = mp_uint(&p);
            got++;
        }
    }
}

static void t_tasks(client *a, client *b, client *c)
{
    frame f;
    const uint64_t q = 0xABCDEF;
    ctl_pause(1);
    ctl_agent(a->ep, q, 2);
    ctl_agent(b->ep, q, 1);
    /* Six tasks: NORMAL 100..104, then a CRITICAL 200 that must go out first. */
    for (uint64_t id = 100; id < 105; id++)
        coord_send(BT_MSG_TASK, BT_PRIO_NORMAL, q, id, "task", 4);
    coord_send(BT_MSG_TASK, BT_PRIO_CRITICAL, q, 200, "crit", 4);
    /* Revoke a queued one; an unknown one is reported not found. */
    uint64_t rv[2] = {q, 104};
    coord_send(BT_MSG_CTL_REVOKE, BT_PRIO_HIGH, 0, 901, rv, 16);
    coord_expect(&f, BT_MSG_CTL_REVOKE);
    CHECK_EQ(f.h.correlation_id, 901);
    CHECK_EQ(f.h.flags, BT_FRAME_F_REPLY);
    const uint8_t *p = f.payload;
    CHECK_EQ(mp_array(&p), 2);
    CHECK_EQ(mp_uint(&p), 104);
    CHECK_EQ(mp_uint(&p), 1);
    rv[1] = 5555;
    coord_send(BT_MSG_CTL_REVOKE, BT_PRIO_HIGH, 0, 902, rv, 16);
    coord_expect(&f, BT_MSG_CTL_REVOKE);
    p = f.payload;
    CHECK_EQ(mp_array(&p), 2);
    CHECK_EQ(mp_uint(&p), 5555);
    CHECK_EQ(mp_uint(&p), 0);

    ctl_pause(0);
    uint64_t eps[8], ids[8];
    expect_dispatched(3, eps, ids); /* credit 2 + 1 */
    CHECK_EQ(ids[0], 200);          /* CRITICAL first */
    int on_a = 0, on_b = 0;
    for (int i = 0; i < 3; i++) {
        on_a += eps[i] == a->ep;
        on_b += eps[i] == b->ep;
    }
    CHECK_EQ(on_a, 2);
    CHECK_EQ(on_b, 1);
    /* Agents receive them, destination rewritten to themselves. */
    uint64_t b_task, a_tasks[2];
    cl_expect(b, &f, BT_MSG_TASK, 0);
    CHECK_EQ(f.h.destination, b->ep);
    b_task = f.h.correlation_id;
    for (int i = 0; i < 2; i++) {
        cl_expect(a, &f, BT_MSG_TASK, 0);
        CHECK_EQ(f.h.destination, a->ep);
        a_tasks[i] = f.h.correlation_id;
    }
    /* The handoff: b's RESULT goes to the coordinator and b gets the next queued task at once. */
    cl_send(b, BT_MSG_RESULT, BT_PRIO_HIGH, 0, BT_EP_COORDINATOR, b_task, "ok", 2);
    coord_expect(&f, BT_MSG_RESULT);
    CHECK_EQ(f.h.source, b->ep);
    CHECK_EQ(f.h.correlation_id, b_task);
    expect_dispatched(1, eps, ids);
    CHECK_EQ(eps[0], b->ep);
    cl_expect(b, &f, BT_MSG_TASK, 0);
    CHECK_EQ(f.h.correlation_id, ids[0]);
    uint64_t b_task2 = ids[0];
    /* A client may not push tasks or send controls. */
    cl_send(c, BT_MSG_TASK, BT_PRIO_NORMAL, 0, q, 3, "x", 1);
    cl_expect(c, &f, BT_MSG_TASK, BT_FRAME_F_REPLY | BT_FRAME_F_ERROR);
    CHECK(has(&f, "forbidden"));
    cl_send(c, BT_MSG_CTL_SHUTDOWN, BT_PRIO_NORMAL, 0, 0, 4, NULL, 0);
    cl_expect(c, &f, BT_MSG_CTL_SHUTDOWN, BT_FRAME_F_REPLY | BT_FRAME_F_ERROR);
    CHECK(has(&f, "forbidden"));
    /* b disconnects holding b_task2: EP_CLOSED names it, and the queue's last task goes to a when a frees
     * credit. */
    cl_close(b);
    coord_expect(&f, BT_MSG_EP_CLOSED);
    CHECK_EQ(f.h.source, b->ep);
    p = f.payload;
    CHECK_EQ(mp_array(&p), 1);
    CHECK_EQ(mp_uint(&p), b_task2);
    cl_send(a, BT_MSG_RESULT, BT_PRIO_HIGH, 0, BT_EP_COORDINATOR, a_tasks[0], "ok", 2);
    coord_expect(&f, BT_MSG_RESULT);
    expect_dispatched(1, eps, ids);
    CHECK_EQ(eps[0], a->ep);
    cl_expect(a, &f, BT_MSG_TASK, 0);
    ctl_agent(a->ep, 0, 0); /* stop serving */
}

static void t_errors(client *a)
{
    frame f;
    cl_send(a, 99, BT_PRIO_NORMAL, 0, 0, 61, NULL, 0);
    cl_expect(a, &f, 99, BT_FRAME_F_REPLY | BT_FRAME_F_ERROR);
    CHECK_EQ(f.h.correlation_id, 61);
    CHECK(has(&f, "unknown_type"));
    cl_sync(a); /* the stream continues */

    /* Stats. */
    coord_send(BT_MSG_CTL_STATS, BT_PRIO_HIGH, 0, 71, NULL, 0);
    coord_expect(&f, BT_MSG_ROUTER_STATS);
    CHECK_EQ(f.h.correlation_id, 71);
    CHECK(has(&f, "dispatched"));
    /* A control with a bad payload length is answered, not acted on. */
    coord_send(BT_MSG_CTL_AGENT, BT_PRIO_HIGH, 0, 72, "short", 5);
    coord_expect(&f, BT_MSG_CTL_AGENT);
    CHECK_EQ(f.h.flags, BT_FRAME_F_REPLY | BT_FRAME_F_ERROR);
}

static void t_bad_streams(void)
{
    frame f;
    client x;
    cl_connect(&x);
    uint8_t junk[BT_FRAME_HEADER_SIZE];
    memset(junk, 0xEE, sizeof(junk));
    CHECK_EQ(bt_sock_send_all(x.fd, junk, sizeof(junk)), 0);
    cl_expect(&x, &f, 0, BT_FRAME_F_REPLY | BT_FRAME_F_ERROR);
    CHECK(has(&f, "bad_frame"));
    CHECK_EQ(cl_recv(&x, &f), 0); /* closed after the reply */
    coord_expect(&f, BT_MSG_EP_CLOSED);
    CHECK_EQ(f.h.source, x.ep);
    cl_close(&x);

    cl_connect(&x);
    uint8_t hdr[BT_FRAME_HEADER_SIZE];
    bt_frame_hdr h = {.type = BT_MSG_DIRECT, .priority = BT_PRIO_NORMAL, .correlation_id = 3};
    uint8_t big[MAXP + 1];
    memset(big, 1, sizeof(big));
    uint8_t *fr = malloc(sizeof(hdr) + sizeof(big));
    CHECK(bt_frame_encode(fr, sizeof(hdr) + sizeof(big), &h, big, sizeof(big)) > 0);
    CHECK_EQ(bt_sock_send_all(x.fd, fr, BT_FRAME_HEADER_SIZE), 0); /* the header alone condemns it */
    free(fr);
    cl_expect(&x, &f, BT_MSG_DIRECT, BT_FRAME_F_REPLY | BT_FRAME_F_ERROR);
    CHECK(has(&f, "too_large"));
    CHECK_EQ(f.h.correlation_id, 3);
    CHECK_EQ(cl_recv(&x, &f), 0);
    coord_expect(&f, BT_MSG_EP_CLOSED);
    cl_close(&x);
}

static void t_rings(client *a, client *b)
{
    frame f;
    cl_send(a, BT_MSG_RING_SETUP, BT_PRIO_HIGH, 0, 1ull << 16, 81, NULL, 0);
    /* RING_READY comes with the descriptors: read it with recv_fds (nothing else is in flight). */
    uint8_t buf[BT_FRAME_HEADER_SIZE];
    int fds[4], nfds = 0;
    struct pollfd pfd = {.fd = a->fd, .events = POLLIN};
    CHECK_EQ(poll(&pfd, 1, TIMEOUT_MS), 1);
    CHECK_EQ(bt_sock_recv_fds(a->fd, buf, sizeof(buf), fds, 4, &nfds), BT_FRAME_HEADER_SIZE);
    CHECK_EQ(nfds, 4);
    CHECK_EQ(bt_frame_decode(buf, sizeof(buf), 0, &f.h), BT_FRAME_HEADER_SIZE);
    CHECK_EQ(f.h.type, BT_MSG_RING_READY);
    CHECK_EQ(f.h.correlation_id, 81);
    bt_ring *c2r, *r2c;
    CHECK_EQ(bt_ring_attach(fds[0], BT_RING_PRODUCER, &c2r), 0);
    CHECK_EQ(bt_ring_attach(fds[1], BT_RING_CONSUMER, &r2c), 0);
    bt_ring_set_doorbell(c2r, fds[2]);
    /* A second setup is refused (asked at NORMAL: a HIGH reply would now come through the ring). */
    cl_send(a, BT_MSG_RING_SETUP, BT_PRIO_NORMAL, 0, 0, 82, NULL, 0);
    cl_expect(a, &f, BT_MSG_RING_SETUP, BT_FRAME_F_REPLY | BT_FRAME_F_ERROR);
    CHECK(has(&f, "ring_unavailable"));

    /* A PING through the ring; HIGH replies come back through r2c. */
    for (int round = 0; round < 200; round++) {
        uint8_t fr[BT_FRAME_HEADER_SIZE + 8];
        bt_frame_hdr h = {.type = BT_MSG_PING, .priority = BT_PRIO_HIGH, .correlation_id = 1000 + (uint64_t)round};
        CHECK(bt_frame_encode(fr, sizeof(fr), &h, "ringping", 8) > 0);
        CHECK_EQ(bt_ring_write(c2r, fr, sizeof(fr)), 0);
        uint8_t in[256];
        uint32_t len;
        int rc;
        uint64_t deadline = bt_now_ns() + (uint64_t)TIMEOUT_MS * 1000000ull;
        while ((rc = bt_ring_read_batch(r2c, in, sizeof(in), &len, 1)) == -EAGAIN) {
            CHECK(bt_now_ns() < deadline);
            if (bt_ring_arm(r2c) == 0) {
                struct pollfd bp = {.fd = fds[3], .events = POLLIN};
                poll(&bp, 1, 100);
                drain_bell(fds[3]);
                bt_ring_disarm(r2c);
            }
        }
        CHECK_EQ(rc, 1);
        CHECK_EQ(bt_frame_decode(in, len, 0, &f.h), (int)len);
        CHECK_EQ(f.h.type, BT_MSG_PING);
        CHECK_EQ(f.h.correlation_id, 1000 + (uint64_t)round);
        CHECK(memcmp(in + BT_FRAME_HEADER_SIZE, "ringping", 8) == 0);
    }
    /* A NORMAL frame from the ring still comes back over the socket; a CRITICAL DIRECT from b via r2c. */
    uint8_t fr[BT_FRAME_HEADER_SIZE + 2];
    bt_frame_hdr h = {.type = BT_MSG_PING, .priority = BT_PRIO_NORMAL, .correlation_id = 90};
    CHECK(bt_frame_encode(fr, sizeof(fr), &h, "np", 2) > 0);
    CHECK_EQ(bt_ring_write(c2r, fr, sizeof(fr)), 0);
    cl_expect(a, &f, BT_MSG_PING, BT_FRAME_F_REPLY);
    CHECK_EQ(f.h.correlation_id, 90);
    cl_send(b, BT_MSG_DIRECT, BT_PRIO_CRITICAL, 0, a->ep, 91, "crit", 4);
    uint8_t in[256];
    uint32_t len;
    CHECK_EQ(bt_ring_read_wait(r2c, in, sizeof(in), &len, 1, 5000000000ull), 1);
    CHECK_EQ(bt_frame_decode(in, len, 0, &f.h), (int)len);
    CHECK_EQ(f.h.type, BT_MSG_DIRECT);
    CHECK_EQ(f.h.source, b->ep);
    /* A garbage record on the ring is a bad stream: error reply, then the connection ends. */
    CHECK_EQ(bt_ring_write(c2r, "garbage!", 8), 0);
    CHECK(cl_recv(a, &f));
    CHECK(f.h.flags & BT_FRAME_F_ERROR);
    CHECK(has(&f, "bad_frame"));
    bt_ring_close(c2r);
    bt_ring_close(r2c);
    for (int i = 0; i < 4; i++)
        close(fds[i]);
}

int main(void)
{
    char dir[] = "/tmp/bt-router-XXXXXX";
    CHECK(mkdtemp(dir));
    char path[128];
    snprintf(path, sizeof(path), "%s/s", dir);
    sock_path = path;
    int lfd = bt_sock_listen(path, 64);
    CHECK(lfd >= 0);

    CHECK_EQ(bt_ring_create(1 << 20, BT_RING_PRODUCER, 1, &c_out), 0);
    CHECK_EQ(bt_ring_create(1 << 20, BT_RING_CONSUMER, 1, &c_in), 0);
    bell_in = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    bell_out = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    CHECK(bell_in >= 0 && bell_out >= 0);
    bt_ring_set_doorbell(c_out, bell_in);

    bt_router_config cfg = {
        .listen_fd = lfd,
        .coord_in_ring_fd = bt_ring_fd(c_out),
        .coord_out_ring_fd = bt_ring_fd(c_in),
        .coord_in_bell = bell_in,
        .coord_out_bell = bell_out,
        .allowed_uid = getuid(),
        .allowed_gid = -1,
        .max_payload = MAXP,
        .generation = GEN,
        .io_backend = getenv("BATON_IO") ? BT_IO_EPOLL : BT_IO_AUTO,
        .spin_ns = 20000,
    };
    CHECK_EQ(bt_router_open(&cfg, &router), 0);
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, router_thread, NULL), 0);
    frame f;
    coord_expect(&f, BT_MSG_ROUTER_LOG);
    CHECK(has(&f, "router started"));

    client a, b, c;
    cl_connect(&a);
    cl_connect(&b);
    cl_connect(&c);
    CHECK(a.ep != b.ep && b.ep != c.ep);
    t_stats(&a, &b, &c);
    t_ping_direct_hello(&a, &b);
    t_pubsub_groups(&a, &b, &c);
    t_errors(&a);
    t_bad_streams();
    t_stats_bad_frame();
    t_rings(&a, &c);
    coord_expect(&f, BT_MSG_EP_CLOSED);
    CHECK_EQ(f.h.source, a.ep);
    cl_close(&a);
    client d;
    cl_connect(&d);
    t_tasks(&d, &b, &c);

    coord_send(BT_MSG_CTL_SHUTDOWN, BT_PRIO_HIGH, 0, 0, NULL, 0);
    pthread_join(t, NULL);
    CHECK_EQ(router_rc, 0);
    /* Shutdown closed the remaining clients. */
    CHECK_EQ(cl_recv(&c, &f), 0);
    cl_close(&c);
    cl_close(&d);
    bt_router_close(router);
    bt_ring_close(c_out);
    bt_ring_close(c_in);
    close(bell_in);
    close(bell_out);
    close(lfd);
    unlink(path);
    rmdir(dir);
    printf("test_router: ok\n");
    return 0;
}
