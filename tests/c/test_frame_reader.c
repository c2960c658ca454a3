/* test_frame_reader: byte stream -> frames.  Every split point, many frames per read, sticky errors, the
 * memory cap, and the batch drain. */
#include "baton.h"
#include "bt_test.h"

#include <fcntl.h>
#include <malloc.h>
#include <sys/socket.h>
#include <unistd.h>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define BT_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define BT_ASAN 1
#endif
#ifdef BT_ASAN
/* From the sanitizer runtime (declared here: gcc installs no sanitizer headers). */
size_t __sanitizer_get_current_allocated_bytes(void);
static size_t heap_in_use(void) { return __sanitizer_get_current_allocated_bytes(); }
#else
/* Small blocks plus mmapped ones (a large buffer is mmapped by glibc and not in uordblks). */
static size_t heap_in_use(void)
{
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
}
#endif

/* Encode one frame with payload bytes derived from seed; returns its size. */
static size_t make_frame(uint8_t *buf, size_t cap, uint32_t plen, uint8_t seed, int crc)
{
    uint8_t *payload = malloc(plen ? plen : 1);
    CHECK(payload);
    for (uint32_t i = 0; i < plen; i++)
        payload[i] = (uint8_t)(seed + i * 31);
    bt_frame_hdr h = {.type = seed, .priority = BT_PRIO_NORMAL, .flags = crc ? BT_FRAME_F_CRC : 0,
                      .source = 100u + seed, .destination = 200u + seed, .correlation_id = seed,
                      .send_ts_ns = 12345};
    int n = bt_frame_encode(buf, cap, &h, payload, plen);
    free(payload);
    CHECK_EQ(n, BT_FRAME_HEADER_SIZE + (int)plen);
    return (size_t)n;
}

/* A stream of frames of assorted sizes, with their offsets. */
enum { NFRAMES = 6 };
static const uint32_t plens[NFRAMES] = {0, 1, 17, 200, 3, 1000};
static uint8_t stream[8192];
static size_t offs[NFRAMES + 1];

static void build_stream(void)
{
    size_t off = 0;
    for (int i = 0; i < NFRAMES; i++) {
        offs[i] = off;
        off += make_frame(stream + off, sizeof(stream) - off, plens[i], (uint8_t)(i + 1), i % 2);
    }
    offs[NFRAMES] = off;
}

/* Take every complete frame out of rd with next(), checking each against the stream; returns how many. */
static int take_frames(bt_frame_reader *rd, int *seen)
{
    int n = 0;
    bt_frame_hdr h;
    const void *p;
    int rc;
    while ((rc = bt_frame_reader_next(rd, &h, &p)) == 1) {
        int i = *seen;
        CHECK(i < NFRAMES);
        CHECK_EQ(h.payload_len, plens[i]);
        CHECK_EQ(h.type, i + 1);
        CHECK_EQ(h.source, 100u + (unsigned)i + 1);
        CHECK(memcmp(p, stream + offs[i] + BT_FRAME_HEADER_SIZE, plens[i]) == 0);
        (*seen)++;
        n++;
    }
    CHECK_EQ(rc, 0);
    return n;
}

static void test_every_split(void)
{
    size_t total = offs[NFRAMES];
    for (size_t k = 0; k <= total; k++) {
        bt_frame_reader *rd;
        CHECK_EQ(bt_frame_reader_open(4096, &rd), 0);
        int seen = 0;
        CHECK_EQ(bt_frame_reader_feed(rd, stream, k), (int)k);
        take_frames(rd, &seen);
        /* Exactly the frames wholly inside the first k bytes came out. */
        int whole = 0;
        while (whole < NFRAMES && offs[whole + 1] <= k)
            whole++;
        CHECK_EQ(seen, whole);
        CHECK_EQ(bt_frame_reader_feed(rd, stream + k, total - k), (int)(total - k));
        take_frames(rd, &seen);
        CHECK_EQ(seen, NFRAMES);
        bt_frame_reader_close(rd);
    }
    /* One byte at a time. */
    bt_frame_reader *rd;
    CHECK_EQ(bt_frame_reader_open(4096, &rd), 0);
    int seen = 0;
    for (size_t i = 0; i < total; i++) {
        CHECK_EQ(bt_frame_reader_feed(rd, stream + i, 1), 1);
        take_frames(rd, &seen);
    }
    CHECK_EQ(seen, NFRAMES);
    bt_frame_reader_close(rd);
}

/* Many frames arrive in one read(); fill + drain hands them over back to back with their sizes. */
static void test_many_per_read(void)
{
    enum { N = 500, PL = 16, FS = BT_FRAME_HEADER_SIZE + PL };
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    int big = 1 << 20;
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
    static uint8_t wire[N * FS];
    for (int i = 0; i < N; i++)
        make_frame(wire + (size_t)i * FS, FS, PL, (uint8_t)i, i % 3 == 0);
    CHECK_EQ(write(sv[0], wire, sizeof(wire)), (ssize_t)sizeof(wire));

    bt_frame_reader *rd;
    CHECK_EQ(bt_frame_reader_open(1024, &rd), 0);
    static uint8_t out[N * FS];
    uint32_t lens[64];
    size_t got_bytes = 0;
    int got = 0, reads = 0;
    for (;;) {
        int rc = bt_frame_reader_fill(rd, sv[1]);
        if (rc == -EAGAIN)
            break;
        CHECK(rc > 0);
        reads++;
        int n;
        while ((n = bt_frame_reader_drain(rd, out + got_bytes, sizeof(out) - got_bytes, lens, 64)) > 0) {
            for (int i = 0; i < n; i++) {
                CHECK_EQ(lens[i], FS);
                got_bytes += lens[i];
            }
            got += n;
        }
        CHECK_EQ(n, 0);
    }
    CHECK_EQ(got, N);
    CHECK(reads < N / 4); /* many frames per read, not one syscall per frame */
    CHECK(memcmp(out, wire, sizeof(wire)) == 0);
    CHECK_EQ(bt_frame_reader_drain(rd, out, sizeof(out), lens, 64), 0);

    /* End of stream, and a fill after the end. */
    close(sv[0]);
    CHECK_EQ(bt_frame_reader_fill(rd, sv[1]), -EPIPE);
    CHECK_EQ(bt_frame_reader_fill(rd, -1), -EBADF);
    close(sv[1]);
    bt_frame_reader_close(rd);
}

/* A payload length above max_payload is refused as soon as the header is in, and for ever after. */
static void test_oversize_sticky(void)
{
    uint8_t f[BT_FRAME_HEADER_SIZE + 101];
    make_frame(f, sizeof(f), 101, 7, 0);
    bt_frame_reader *rd;
    CHECK_EQ(bt_frame_reader_open(100, &rd), 0);
    bt_frame_hdr h;
    const void *p;
    CHECK_EQ(bt_frame_reader_feed(rd, f, BT_FRAME_HEADER_SIZE - 1), BT_FRAME_HEADER_SIZE - 1);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), 0);
    CHECK_EQ(bt_frame_reader_feed(rd, f + BT_FRAME_HEADER_SIZE - 1, 1), 1);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), -EMSGSIZE);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), -EMSGSIZE);
    uint8_t out[512];
    uint32_t lens[4];
    CHECK_EQ(bt_frame_reader_drain(rd, out, sizeof(out), lens, 4), -EMSGSIZE);
    CHECK_EQ(bt_frame_reader_feed(rd, f, 10), -EMSGSIZE);
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    CHECK_EQ(write(sv[0], "x", 1), 1);
    CHECK_EQ(bt_frame_reader_fill(rd, sv[1]), -EMSGSIZE);
    close(sv[0]);
    close(sv[1]);
    bt_frame_reader_close(rd);

    /* The same length is fine with a larger limit. */
    CHECK_EQ(bt_frame_reader_open(101, &rd), 0);
    CHECK_EQ(bt_frame_reader_feed(rd, f, sizeof(f)), (int)sizeof(f));
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), 1);
    CHECK_EQ(h.payload_len, 101);
    bt_frame_reader_close(rd);
}

/* Bad magic: reported from the first wrong byte, sticky; frames before it still come out. */
static void test_bad_magic_sticky(void)
{
    bt_frame_reader *rd;
    bt_frame_hdr h;
    const void *p;
    CHECK_EQ(bt_frame_reader_open(4096, &rd), 0);
    CHECK_EQ(bt_frame_reader_feed(rd, "X", 1), 1);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), -EBADMSG);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), -EBADMSG);
    bt_frame_reader_close(rd);

    CHECK_EQ(bt_frame_reader_open(4096, &rd), 0);
    uint8_t buf[256];
    size_t n = make_frame(buf, sizeof(buf), 10, 1, 1);
    memcpy(buf + n, "BTN2", 4); /* right first bytes, wrong last one */
    memset(buf + n + 4, 0, 60);
    CHECK_EQ(bt_frame_reader_feed(rd, buf, n + 3), (int)n + 3);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), 1);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), 0); /* "BTN" is a valid prefix */
    CHECK_EQ(bt_frame_reader_feed(rd, buf + n + 3, 61), 61);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), -EBADMSG);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), -EBADMSG);
    bt_frame_reader_close(rd);

    /* Through drain: the good frame is handed over, the error comes with the next call. */
    CHECK_EQ(bt_frame_reader_open(4096, &rd), 0);
    CHECK_EQ(bt_frame_reader_feed(rd, buf, n + 64), (int)n + 64);
    uint8_t out[512];
    uint32_t lens[4];
    CHECK_EQ(bt_frame_reader_drain(rd, out, sizeof(out), lens, 4), 1);
    CHECK_EQ(lens[0], n);
    CHECK(memcmp(out, buf, n) == 0);
    CHECK_EQ(bt_frame_reader_drain(rd, out, sizeof(out), lens, 4), -EBADMSG);
    CHECK_EQ(bt_frame_reader_drain(rd, out, sizeof(out), lens, 4), -EBADMSG);
    bt_frame_reader_close(rd);

    /* A CRC mismatch and an unknown version are stream errors too. */
    CHECK_EQ(bt_frame_reader_open(4096, &rd), 0);
    n = make_frame(buf, sizeof(buf), 10, 1, 1);
    buf[n - 1] ^= 1;
    CHECK_EQ(bt_frame_reader_feed(rd, buf, n), (int)n);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), -EILSEQ);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), -EILSEQ);
    bt_frame_reader_close(rd);
}

/* The reader never buffers more than 48 + max_payload bytes, whatever the peer sends. */
static void test_cap(void)
{
    enum { MAXP = 1000, CAP = BT_FRAME_HEADER_SIZE + MAXP };
    uint8_t f[CAP];
    make_frame(f, sizeof(f), MAXP, 3, 1);
    bt_frame_reader *rd;
    bt_frame_hdr h;
    const void *p;
    CHECK_EQ(bt_frame_reader_open(MAXP, &rd), 0);
    CHECK_EQ(bt_frame_reader_feed(rd, f, CAP), CAP);
    CHECK_EQ(bt_frame_reader_feed(rd, f, 1), -ENOBUFS); /* full: a maximal frame waits to be taken */
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    CHECK_EQ(write(sv[0], f, 10), 10);
    CHECK_EQ(bt_frame_reader_fill(rd, sv[1]), -ENOBUFS);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), 1);
    CHECK_EQ(bt_frame_reader_fill(rd, sv[1]), 10); /* room again */
    CHECK_EQ(bt_frame_reader_feed(rd, f + 10, CAP - 10), CAP - 10);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), 1);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), 0);
    close(sv[0]);
    close(sv[1]);
    bt_frame_reader_close(rd);

    /* Heap use: a reader fed frames much larger than its initial buffer in odd-sized chunks, and a
     * hostile header announcing the largest legal payload that never comes, stay within the cap. */
    enum { BIGP = 300000, BIGCAP = BT_FRAME_HEADER_SIZE + BIGP };
    uint8_t *big = malloc(2 * BIGCAP);
    CHECK(big);
    size_t n1 = make_frame(big, BIGCAP, BIGP - 5, 9, 0);
    size_t n2 = make_frame(big + n1, BIGCAP, BIGP, 10, 1);
    size_t base = heap_in_use();
    CHECK_EQ(bt_frame_reader_open(BIGP, &rd), 0);
    size_t peak = 0;
    int frames = 0;
    size_t limit = 7777;
    for (size_t off = 0; off < n1 + n2;) {
        size_t chunk = limit < n1 + n2 - off ? limit : n1 + n2 - off;
        int rc = bt_frame_reader_feed(rd, big + off, chunk);
        if (rc == -ENOBUFS) {
            /* All or nothing: take a complete frame out, or else offer a smaller piece. */
            if (bt_frame_reader_next(rd, &h, &p) == 1)
                frames++;
            else
                limit = chunk / 2;
            CHECK(limit > 0);
            continue;
        }
        CHECK_EQ(rc, (int)chunk);
        limit = 7777;
        off += chunk;
        size_t now = heap_in_use() - base;
        peak = now > peak ? now : peak;
    }
    while (bt_frame_reader_next(rd, &h, &p) == 1)
        frames++;
    CHECK_EQ(frames, 2);
    CHECK(peak <= BIGCAP + 1024);
    CHECK(peak >= BIGP); /* it did grow to hold a big frame (and the measurement works) */
    bt_frame_reader_close(rd);

    base = heap_in_use();
    CHECK_EQ(bt_frame_reader_open(BIGP, &rd), 0);
    make_frame(big, BIGCAP, BIGP, 11, 0);
    size_t fed = 0;
    int rc;
    while ((rc = bt_frame_reader_feed(rd, big + fed, 1000 < BIGCAP - 1 - fed ? 1000 : BIGCAP - 1 - fed)) > 0)
        fed += (size_t)rc;
    CHECK_EQ(fed, BIGCAP - 1);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), 0);
    CHECK(heap_in_use() - base <= BIGCAP + 1024);
    CHECK_EQ(bt_frame_reader_feed(rd, big, 2), -ENOBUFS); /* one byte over the cap */
    CHECK_EQ(bt_frame_reader_feed(rd, big + fed, 1), 1);
    CHECK_EQ(bt_frame_reader_next(rd, &h, &p), 1);
    bt_frame_reader_close(rd);
    free(big);
}

static void test_drain_small_buffer(void)
{
    bt_frame_reader *rd;
    CHECK_EQ(bt_frame_reader_open(4096, &rd), 0);
    uint8_t buf[512];
    size_t a = make_frame(buf, sizeof(buf), 100, 1, 0);
    size_t b = make_frame(buf + a, sizeof(buf) - a, 100, 2, 0);
    CHECK_EQ(bt_frame_reader_feed(rd, buf, a + b), (int)(a + b));
    uint8_t out[512];
    uint32_t lens[4];
    CHECK_EQ(bt_frame_reader_drain(rd, out, a - 1, lens, 4), -ENOBUFS); /* not sticky: the frame stays */
    CHECK_EQ(bt_frame_reader_drain(rd, out, a + 10, lens, 4), 1);      /* only the first fits */
    CHECK_EQ(lens[0], a);
    CHECK(memcmp(out, buf, a) == 0);
    CHECK_EQ(bt_frame_reader_drain(rd, out, sizeof(out), lens, 0), 0); /* max_n 0 */
    CHECK_EQ(bt_frame_reader_drain(rd, out, sizeof(out), lens, 4), 1);
    CHECK_EQ(lens[0], b);
    CHECK(memcmp(out, buf + a, b) == 0);
    CHECK_EQ(bt_frame_reader_drain(rd, out, sizeof(out), lens, 4), 0);
    CHECK_EQ(bt_frame_reader_drain(rd, out, sizeof(out), lens, -1), -EINVAL);
    bt_frame_reader_close(rd);
    bt_frame_reader_close(NULL);
    CHECK_EQ(bt_frame_reader_open(0, NULL), -EINVAL);
}

int main(void)
{
    build_stream();
    test_every_split();
    test_many_per_read();
    test_oversize_sticky();
    test_bad_magic_sticky();
    test_cap();
    test_drain_small_buffer();
    printf("test_frame_reader: ok\n");
    return 0;
}
