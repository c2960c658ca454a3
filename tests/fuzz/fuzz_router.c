/*
 * fuzz_router.c -- libFuzzer harness for the router's per-connection input path.
 *
 * Input: one control byte, then the client's byte stream.  The control byte picks the chunk sizes the stream
 * is fed in (1..64 bytes, or all at once) and whether the client is first made an agent holding two tasks
 * (so RESULT, credit and EP_CLOSED paths run), and then whether those tasks get continuations (CTL_CONTINUE:
 * the fuzzed RESULT payloads go through bt_result_ok and release or discard them; refused and unknown-parent
 * CTL_CONTINUEs run too).  Every input gets a fresh endpoint (plus a bystander that
 * subscribes, joins and receives), fed through bti_router_feed exactly as if read from its socket; after
 * each chunk the turn ends (flush to the sockets, publish to the coordinator), and the test drains both
 * sockets and the coordinator ring.  Checked for every input:
 *   - nothing crashes, reads out of bounds or leaks (ASan/UBSan);
 *   - every frame the router sends the client and the coordinator is a valid frame (decodes exactly);
 *   - the router still answers a PING from the bystander afterwards (one bad client affects nobody else).
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "baton.h"
#include "router_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAXP 2048u
#define QUEUE 0x5155455545ull

static bt_router *R;
static bt_ring *to_router, *from_router;
static int fake_listen[2];
static uint8_t rbuf[1 << 20];
static uint32_t rlens[4096];

static void setup(void)
{
    if (R)
        return;
    int b1 = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC), b2 = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    /* Never readable: the router never accepts here, endpoints are adopted instead. */
    if (b1 < 0 || b2 < 0 || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fake_listen) < 0 ||
        bt_ring_create(1 << 20, BT_RING_PRODUCER, 1, &to_router) < 0 ||
        bt_ring_create(1 << 20, BT_RING_CONSUMER, 1, &from_router) < 0)
        abort();
    bt_ring_set_doorbell(to_router, b1);
    bt_router_config cfg = {
        .listen_fd = fake_listen[0],
        .coord_in_ring_fd = bt_ring_fd(to_router),
        .coord_out_ring_fd = bt_ring_fd(from_router),
        .coord_in_bell = b1,
        .coord_out_bell = b2,
        .allowed_uid = 0,
        .allowed_gid = -1,
        .max_payload = MAXP,
        .generation = 3,
        .io_backend = BT_IO_EPOLL,
        .spin_ns = 0,
    };
    if (bt_router_open(&cfg, &R) < 0)
        abort();
}

static void drain_coord(void)
{
    int n;
    while ((n = bt_ring_read_batch(from_router, rbuf, sizeof(rbuf), rlens, 4096)) > 0) {
        size_t off = 0;
        for (int i = 0; i < n; i++) {
            bt_frame_hdr h;
            if (bt_frame_decode(rbuf + off, rlens[i], 0, &h) != (int)rlens[i])
                abort();
            off += rlens[i];
        }
    }
}

/* Read what the router sent on this socket (frames may be split across reads: check whole ones). */
static void drain_sock(int fd, uint8_t *acc, size_t *acc_len)
{
    for (;;) {
        ssize_t n = recv(fd, acc + *acc_len, (1 << 16) - *acc_len, MSG_DONTWAIT);
        if (n <= 0)
            return;
        *acc_len += (size_t)n;
        size_t off = 0;
        for (;;) {
            bt_frame_hdr h;
            int k = bt_frame_decode(acc + off, *acc_len - off, 0, &h);
            if (k == -ENODATA)
                break;
            if (k <= 0)
                abort();
            off += (size_t)k;
        }
        memmove(acc, acc + off, *acc_len - off);
        *acc_len -= off;
    }
}

static void coord_send(uint8_t type, uint64_t dst, uint64_t corr, const void *p, size_t len)
{
    uint8_t buf[BT_FRAME_HEADER_SIZE + 64];
    bt_frame_hdr h = {.type = type, .priority = BT_PRIO_NORMAL, .source = BT_EP_COORDINATOR, .destination = dst,
                      .correlation_id = corr};
    int n = bt_frame_encode(buf, sizeof(buf), &h, p, len);
    if (n < 0 || bt_ring_write(to_router, buf, (uint32_t)n) < 0)
        abort();
}

/* CTL_CONTINUE: child TASK dispatch id child (into QUEUE) for parent, its frame cut by cut bytes. */
static void cont_send(uint64_t parent, uint64_t child, size_t cut)
{
    uint8_t p[8 + BT_FRAME_HEADER_SIZE + 1];
    bt_frame_hdr h = {.type = BT_MSG_TASK, .priority = BT_PRIO_NORMAL, .source = BT_EP_COORDINATOR,
                      .destination = QUEUE, .correlation_id = child};
    memcpy(p, &parent, 8);
    if (bt_frame_encode(p + 8, sizeof(p) - 8, &h, "\x80", 1) < 0)
        abort();
    coord_send(BT_MSG_CTL_CONTINUE, 0, 0, p, sizeof(p) - cut);
}

static uint8_t acc_a[1 << 16], acc_b[1 << 16];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup();
    if (size < 1)
        return 0;
    uint8_t ctl = data[0];
    data++;
    size--;
    int sa[2], sb[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sa) < 0 ||
        socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sb) < 0)
        abort();
    bt_peercred cred = {.pid = 1, .uid = 0, .gid = 0};
    uint64_t a, b;
    if (bti_router_adopt(R, sa[0], &cred, &a) < 0 || bti_router_adopt(R, sb[0], &cred, &b) < 0)
        abort();
    size_t la = 0, lb = 0;
    /* The bystander subscribes to topic 1 and joins group 1, so fan-out from the fuzzed client has a target. */
    static const uint8_t sub[] = {0x42, 0x54, 0x4E, 0x31, 1, BT_MSG_SUBSCRIBE, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                  0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                  0, 0, 0, 0, 0, 0, 0, 0};
    uint8_t join[sizeof(sub)];
    memcpy(join, sub, sizeof(sub));
    join[5] = BT_MSG_JOIN;
    bti_router_feed(R, b, sub, sizeof(sub));
    bti_router_feed(R, b, join, sizeof(join));
    if (ctl & 0x80) {
        /* Make the fuzzed client an agent holding two tasks. */
        uint8_t p[20];
        uint64_t q = QUEUE;
        uint32_t credit = 2;
        memcpy(p, &a, 8);
        memcpy(p + 8, &q, 8);
        memcpy(p + 16, &credit, 4);
        coord_send(BT_MSG_CTL_AGENT, 0, 0, p, 20);
        coord_send(BT_MSG_TASK, QUEUE, 1, "\x80", 1);
        coord_send(BT_MSG_TASK, QUEUE, 2, "\x80", 1);
        coord_send(BT_MSG_TASK, QUEUE, 3, "\x80", 1);
        bti_router_turn(R, 0);
        if (ctl & 0x40) {
            cont_send(1, 101, 0);
            cont_send(1, 102, 0);
            cont_send(2, 201, 0);
            cont_send(3, 301, 0);   /* queued */
            cont_send(2, 202, 5);   /* refused: a cut frame (discards 2's continuations) */
            cont_send(999, 9901, 0); /* unknown parent */
            bti_router_turn(R, 0);
        }
    }
    size_t chunk = (ctl & 0x3f) ? (size_t)(ctl & 0x3f) : size;
    for (size_t off = 0; off < size;) {
        size_t k = size - off < chunk ? size - off : chunk;
        if (bti_router_feed(R, a, data + off, k) < 0)
            break; /* the endpoint was closed by what it sent */
        off += k;
        bti_router_end_turn(R);
        drain_sock(sa[1], acc_a, &la);
        drain_sock(sb[1], acc_b, &lb);
        drain_coord();
    }
    bti_router_end_turn(R);
    drain_sock(sa[1], acc_a, &la);
    /* The bystander still gets answers. */
    static const uint8_t ping[] = {0x42, 0x54, 0x4E, 0x31, 1, BT_MSG_PING, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                   0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0,
                                   0, 0, 0, 0, 0, 0, 0, 0};
    if (bti_router_feed(R, b, ping, sizeof(ping)) < 0)
        abort();
    bti_router_end_turn(R);
    drain_sock(sb[1], acc_b, &lb);
    bti_router_drop(R, a);
    bti_router_drop(R, b);
    bti_router_end_turn(R);
    drain_coord();
    close(sa[1]);
    close(sb[1]);
    la = lb = 0;
    /* A closing connection may linger while draining output; let the router finish with it. */
    bti_router_turn(R, 0);
    drain_coord();
    return 0;
}
