/*
 * baton.h -- the one public header of libbaton, baton's native core.
 *
 * Conventions (DESIGN.md section 6):
 *   - public symbols are bt_*, internal ones bti_*;
 *   - functions return an int >= 0 on success and -errno on failure; no caller ever reads errno;
 *   - lifecycles are paired: _create/_attach/_open  <->  _close;
 *   - every multi-byte value that crosses a process boundary is little-endian;
 *   - the fast path (ring reserve/commit/peek) is inline below, anything that may block or syscall lives in
 *     src/c/.
 *
 * Thread rules: a handle (bt_ring, bt_frame_reader, bt_io) belongs to one thread at a time; libbaton keeps no
 * global mutable state except the CRC32C implementation choice, which is made once and is idempotent.
 */
#ifndef BATON_H
#define BATON_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BT_VERSION_STRING "0.1.0"

/* ------------------------------------------------------------------------------------------------ */
/* Error codes.  Every failure is one of these negated.                                              */
/*                                                                                                   */
/*   frame decoding:  -EBADMSG bad magic, -EPROTONOSUPPORT unknown version, -EMSGSIZE payload length  */
/*                    above the configured maximum, -ENODATA truncated (need more bytes), -EILSEQ     */
/*                    CRC mismatch, -ERANGE a field out of range (priority, reserved flag bits).      */
/*   rings:           -ENOSPC ring full (never blocks), -EAGAIN ring empty, -EPROTO corrupt segment   */
/*                    (bad header, impossible index or record length), -EPIPE producer gone and ring  */
/*                    drained, -ETIMEDOUT wait expired, -ENOBUFS caller buffer too small.             */
/*   everything:      -EINVAL bad argument, -ENOMEM, and the errno of a failed syscall as it was.     */
/* ------------------------------------------------------------------------------------------------ */

/* Current time on CLOCK_MONOTONIC in nanoseconds: the clock of every timestamp libbaton writes. */
static inline uint64_t bt_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* One spin-wait pause (x86 PAUSE, arm64 YIELD): the ring's and the router's polling loops. */
static inline void bti_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* Version of the library that is loaded (may differ from BT_VERSION_STRING of the header compiled in). */
const char *bt_version(void);

/* ================================================================================================ */
/* Frame codec.                                                                                      */
/*                                                                                                   */
/* One frame layout everywhere (socket, ring, C, Python): a 48-byte little-endian header followed by  */
/* payload_len bytes of payload (msgpack by convention; the codec does not look inside).             */
/*                                                                                                   */
/*   offset size field                                                                               */
/*        0    4 magic          BT_FRAME_MAGIC ("BTN1" as bytes 42 54 4E 31)                           */
/*        4    1 version        BT_FRAME_VERSION                                                       */
/*        5    1 type           message type (the router defines them; the codec does not judge)     */
/*        6    1 priority       bt_priority                                                          */
/*        7    1 flags          BT_FRAME_F_*                                                         */
/*        8    4 payload_len                                                                         */
/*       12    4 crc32c         CRC32C over the 48 header bytes (this field as zero) then the payload, */
/*                              present when BT_FRAME_F_CRC is set; zero otherwise                   */
/*       16    8 source         endpoint id of the sender                                            */
/*       24    8 destination    endpoint id, topic id, queue id or group id, by type                 */
/*       32    8 correlation_id request/response pairing; 0 when unused                              */
/*       40    8 send_ts_ns     sender's CLOCK_MONOTONIC at send time                                */
/* ================================================================================================ */

#define BT_FRAME_MAGIC 0x314E5442u /* "BTN1" read as a little-endian u32 */
#define BT_FRAME_VERSION 1
#define BT_FRAME_HEADER_SIZE 48
/* Default and hard ceilings on payload length.  The hard limit keeps every frame size inside an int. */
#define BT_FRAME_MAX_PAYLOAD_DEFAULT (16u * 1024u * 1024u)
#define BT_FRAME_MAX_PAYLOAD_LIMIT (1u << 30)

#define BT_FRAME_F_CRC 0x01u   /* crc32c field is valid and checked on decode */
#define BT_FRAME_F_REPLY 0x02u /* this frame answers correlation_id */
#define BT_FRAME_F_ERROR 0x04u /* the payload is an error {code, message} */
#define BT_FRAME_F_KNOWN (BT_FRAME_F_CRC | BT_FRAME_F_REPLY | BT_FRAME_F_ERROR)

typedef enum bt_priority {
    BT_PRIO_CRITICAL = 0, /* shared-memory ring */
    BT_PRIO_HIGH = 1,     /* socket plane (io_uring where allowed) */
    BT_PRIO_NORMAL = 2,   /* unix socket */
    BT_PRIO_LOW = 3,      /* durable spool */
    BT_PRIO_BATCH = 4,    /* large payload by reference */
    BT_PRIO_COUNT = 5
} bt_priority;

/* The decoded header in host byte order.  Not the wire layout: use bt_frame_encode/decode. */
typedef struct bt_frame_hdr {
    uint8_t version;
    uint8_t type;
    uint8_t priority;
    uint8_t flags;
    uint32_t payload_len;
    uint32_t crc32c;
    uint32_t _pad;
    uint64_t source;
    uint64_t destination;
    uint64_t correlation_id;
    uint64_t send_ts_ns;
} bt_frame_hdr;

/*
 * CRC32C (Castagnoli) of len bytes, continuing from crc (start with 0).  Uses SSE4.2 when the CPU has it,
 * a table otherwise; both give the same value.
 */
uint32_t bt_crc32c(uint32_t crc, const void *data, size_t len);

/*
 * Encode one frame into buf[0..cap).  Writes the 48-byte header from *hdr (version and payload_len are
 * taken from BT_FRAME_VERSION and len, not from hdr; crc32c is computed when hdr->flags has BT_FRAME_F_CRC)
 * followed by len bytes of payload.  payload may be NULL when len is 0.  buf and payload may not overlap.
 * Returns the frame size (BT_FRAME_HEADER_SIZE + len), -ENOBUFS when cap is too small, -EMSGSIZE when len
 * exceeds BT_FRAME_MAX_PAYLOAD_LIMIT, -ERANGE for a priority >= BT_PRIO_COUNT or unknown flag bits.
 */
int bt_frame_encode(void *buf, size_t cap, const bt_frame_hdr *hdr, const void *payload, size_t len);

/*
 * Validate and decode the frame at the start of buf[0..len).  max_payload bounds payload_len (0 means
 * BT_FRAME_MAX_PAYLOAD_DEFAULT; values above BT_FRAME_MAX_PAYLOAD_LIMIT are clamped to it).  On success fills
 * *out and returns the whole frame size; the payload is buf + BT_FRAME_HEADER_SIZE.  Never reads outside
 * buf[0..len).  Checks run in this order, so a stream parser can tell "wait for more" from "give up":
 *   len < 48 -> -ENODATA; bad magic -> -EBADMSG; version -> -EPROTONOSUPPORT; priority or flags (or a
 *   nonzero crc32c field without BT_FRAME_F_CRC) -> -ERANGE; payload_len > max -> -EMSGSIZE; len < frame
 *   size -> -ENODATA; CRC -> -EILSEQ.  *out is written only on success (out may be NULL to just validate).
 */
int bt_frame_decode(const void *buf, size_t len, uint32_t max_payload, bt_frame_hdr *out);

/* ================================================================================================ */
/* Shared-memory ring: single producer, single consumer, variable-length records, in a sealed memfd. */
/*                                                                                                   */
/* Segment layout: a 512-byte header (bt_ring_shm) then `capacity` bytes of data (a power of two).    */
/* Records are 8-byte aligned: a u32 size word (8 + payload length; 0 = not yet written) and a u32    */
/* kind, then the payload.  The producer zeroes the size word of the *next* record before it         */
/* release-stores the size of the current one: that store is the commit, so a consumer reads records */
/* by following size words and never touches the producer's cache line while data flows.  A record   */
/* that would cross the end of the data area is preceded by a PAD record that fills the rest.        */
/* head and tail are free-running byte counters, published once per batch (release) so each side can */
/* account for space and park/wake; each side keeps a private cached copy of the other's index.      */
/* ================================================================================================ */

#define BT_RING_MAGIC 0x474E495242544E42ull /* "BNTBRING" */
#define BT_RING_VERSION 1
#define BT_RING_HDR_SIZE 512
#define BT_RING_ALIGN 8
#define BT_RING_REC_HDR 8
#define BT_RING_MIN_CAPACITY 4096u
#define BT_RING_MAX_CAPACITY (1u << 30)
#define BT_RING_KIND_DATA 1u
#define BT_RING_KIND_PAD 2u
/* 128 bytes, not 64: the adjacent-line prefetcher pulls pairs of lines, so 64 would still share. */
#define BT_RING_LINE 128

#define BT_RING_PRODUCER 1
#define BT_RING_CONSUMER 2

/* The shared header.  Each group of fields has its own 128-byte line and a single writer. */
typedef struct bt_ring_shm {
    /* Line 0: written once by the creator before the fd is shared, read-only afterwards. */
    uint64_t magic;
    uint32_t version;
    uint32_t hdr_size;      /* BT_RING_HDR_SIZE */
    uint64_t capacity;      /* data bytes, power of two */
    uint64_t generation;    /* chosen by the creator; lets a peer tell a recreated segment apart */
    uint32_t max_record;    /* largest payload one record may carry (capacity / 4) */
    uint32_t _reserved0;    /* zero */
    uint8_t _pad0[BT_RING_LINE - 40];
    /* Line 1: written by the producer only. */
    _Alignas(BT_RING_LINE) uint64_t tail;  /* bytes committed and published */
    uint32_t producer_closed;               /* 1 after bt_ring_close by the producer */
    /* The producer's pid, stored by the producer end when it is created or attached (0 = no producer yet),
     * so a parked consumer can tell a dead producer from a quiet one.  Here and not on line 0 because the
     * creator is not always the producer, and line 0 is read-only once the fd is shared.  A hint only: the
     * consumer never signals it, only probes it (pid > 0, kill(pid, 0)). */
    int32_t producer_pid;
    uint8_t _pad1[BT_RING_LINE - 16];
    /* Line 2: written by the consumer only. */
    _Alignas(BT_RING_LINE) uint64_t head;  /* bytes consumed and released */
    uint8_t _pad2[BT_RING_LINE - 8];
    /* Line 3: the park/wake handshake. */
    _Alignas(BT_RING_LINE) uint32_t futex_seq; /* bumped by the producer before FUTEX_WAKE */
    uint32_t waiters;                           /* set by a consumer about to park: 1 futex, 2 doorbell */
    uint8_t _pad3[BT_RING_LINE - 8];
} bt_ring_shm;

_Static_assert(sizeof(bt_ring_shm) == BT_RING_HDR_SIZE, "ring header is 512 bytes");
_Static_assert(offsetof(bt_ring_shm, tail) == 1 * BT_RING_LINE, "tail on line 1");
_Static_assert(offsetof(bt_ring_shm, producer_pid) == 1 * BT_RING_LINE + 12, "producer_pid on line 1");
_Static_assert(offsetof(bt_ring_shm, head) == 2 * BT_RING_LINE, "head on line 2");
_Static_assert(offsetof(bt_ring_shm, futex_seq) == 3 * BT_RING_LINE, "futex on line 3");

/* A process-local handle on one end of a ring.  Fields are private to ring.c and the inlines below. */
typedef struct bt_ring {
    bt_ring_shm *shm;
    uint8_t *data;
    uint64_t capacity;
    uint64_t mask;
    uint32_t max_record;
    int role;         /* BT_RING_PRODUCER or BT_RING_CONSUMER */
    int fd;           /* the memfd when this handle created the segment, else -1 */
    uint32_t pending; /* producer: size word of the reserved, uncommitted record (0 if none) */
    uint64_t pos;     /* producer: next write offset (committed, maybe unpublished); consumer: next read */
    uint64_t peer;    /* producer: cached head; consumer: unused */
    uint64_t published; /* last value this side stored into its shared index */
    uint64_t spin_ns;   /* how long bt_ring_wait spins before parking */
    uint64_t full_events; /* producer: times a write found the ring full */
    uint64_t live_check_ns; /* consumer: when bt_ring_wait may next probe whether the producer is alive */
    size_t map_len;
    int doorbell;       /* producer: eventfd written instead of FUTEX_WAKE (bt_ring_set_doorbell), or -1 */
    int _pad_doorbell;
} bt_ring;

typedef struct bt_ring_stats {
    uint64_t capacity;
    uint64_t generation;
    uint64_t used;        /* published tail - published head, as this side sees it */
    uint64_t full_events; /* producer side only */
    uint32_t max_record;
    int32_t role;
} bt_ring_stats;

/*
 * Create a ring segment: a sealed memfd (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) of
 * BT_RING_HDR_SIZE + capacity bytes, mapped and initialised, and return a handle on the `role` end.
 * capacity must be a power of two in [BT_RING_MIN_CAPACITY, BT_RING_MAX_CAPACITY].  generation is stored in
 * the header as given.  On success *out owns the memfd (see bt_ring_fd) and the mapping; on failure nothing
 * is left behind and *out is untouched.
 */
int bt_ring_create(uint64_t capacity, int role, uint64_t generation, bt_ring **out);

/*
 * Attach to a segment created elsewhere (usually received over a unix socket).  Does not take ownership of
 * fd: the caller may close it once this returns.  Validates before trusting anything: the seals
 * (shrink and grow must be sealed, else -EPERM: an unsealed segment could be truncated under us and fault
 * the reader), the size, magic (-EPROTO), version (-EPROTONOSUPPORT), capacity (power of two, matching the
 * size, -EPROTO) and that head <= tail <= head + capacity (-EPROTO).
 */
int bt_ring_attach(int fd, int role, bt_ring **out);

/*
 * Close this end.  A producer marks the ring closed and wakes a parked consumer, which then drains what is
 * left and gets -EPIPE.  Unmaps, closes the memfd if this handle created it, frees the handle.  NULL is a
 * no-op.
 */
void bt_ring_close(bt_ring *r);

/* The memfd of a ring this handle created (owned by the handle; dup it to keep it), or -EBADF. */
int bt_ring_fd(const bt_ring *r);

/* How long bt_ring_wait spins before it parks on the futex (default 50 us; 0 parks at once). */
void bt_ring_set_spin(bt_ring *r, uint64_t spin_ns);

/* Snapshot of sizes and counters. */
void bt_ring_stats_get(const bt_ring *r, bt_ring_stats *out);

/*
 * Doorbells: how an event loop sleeps on a ring without a thread parked in FUTEX_WAIT.
 *
 * bt_ring_set_doorbell(producer_end, efd): from now on, when a publish finds the consumer's `waiters` flag
 * set by bt_ring_arm (value 2), it writes 1 to the eventfd efd instead of FUTEX_WAKE; a consumer parked in
 * bt_ring_wait (value 1) still gets its futex wake, so either style of consumer works on a ring with a
 * doorbell.  bt_ring_close on this end writes it
 * unconditionally (close is rare, and a consumer blocked in its loop must see it).  efd stays the caller's
 * (keep it open while this end lives); -1 returns to futex wakes.  A write that finds the eventfd counter
 * saturated (EAGAIN on a non-blocking eventfd) is fine: the consumer is already due to wake.
 *
 * bt_ring_arm(consumer_end): the consumer is about to block in its own event loop (epoll, io_uring) with
 * the doorbell registered.  Sets `waiters`, a seq_cst fence (the mirror of publish's fence, as in
 * bt_ring_wait's park), then re-checks the ring.  Returns 0 when armed (nothing to read: the next publish
 * rings the bell), 1 when a record is already there (waiters cleared again: do not block, read),
 * -EPIPE when the producer closed the ring and every record was read (waiters cleared), -EPROTO on a corrupt
 * record.  Never blocks, never syscalls.
 *
 * bt_ring_disarm(consumer_end): the consumer is awake again (the bell rang, or it woke for another reason):
 * clear `waiters`, so the producer stops ringing while the consumer polls the ring itself.  The rule: arm
 * just before every blocking wait, disarm right after it returns, then read until empty.  A bell that rang
 * after the last read is harmless (a spurious wake-up finds the ring empty and arms again).  A relaxed store:
 * a stale 1 only costs the producer one eventfd write; the fence that matters is arm's.
 */
void bt_ring_set_doorbell(bt_ring *producer_end, int eventfd);
int bt_ring_arm(bt_ring *consumer_end);
void bt_ring_disarm(bt_ring *consumer_end);

/*
 * Consumer: has the producer closed the ring (1) or died without closing (1, probed at most every 100 ms
 * by pid as in bt_ring_wait), or not (0)?  Records may still be waiting: read until empty first.  For event
 * loops that never call bt_ring_wait.
 */
int bt_ring_producer_gone(bt_ring *consumer_end);

/* Producer slow path: refresh the cached head.  Returns free bytes, or -EPROTO for an impossible head. */
int bti_ring_refresh_head(bt_ring *r);
/* Producer slow path: write a PAD record up to the end of the data area.  The space is already checked. */
void bti_ring_pad_to_end(bt_ring *r);

static inline uint64_t bti_ring_stride(uint32_t size_word)
{
    return ((uint64_t)size_word + (BT_RING_ALIGN - 1)) & ~(uint64_t)(BT_RING_ALIGN - 1);
}

/*
 * Could a legitimate producer have committed the record at data offset off, with this nonzero size word and
 * kind?  A PAD ends exactly at the end of the data area and never starts at 0 (a producer pads only when a
 * record does not fit before the end): without the off != 0 test, a PAD spanning the whole area would send
 * a reader round for ever.  The one check of bt_ring_peek and of a producer re-attaching (ring.c).
 */
static inline int bti_ring_rec_ok(const bt_ring *r, uint64_t off, uint32_t size, uint32_t kind)
{
    if (size < BT_RING_REC_HDR || size > r->capacity - off)
        return 0;
    if (kind == BT_RING_KIND_PAD)
        return off != 0 && off + size == r->capacity;
    return kind == BT_RING_KIND_DATA && size - BT_RING_REC_HDR <= r->max_record;
}

/*
 * Producer fast path: reserve room for a payload of len bytes and return where to write it, or NULL when
 * the ring is full (counted in full_events; never waits) or len > max_record.  The record is invisible to
 * the consumer until bt_ring_commit.  One reservation at a time.
 */
static inline void *bt_ring_reserve(bt_ring *r, uint32_t len)
{
    if (r->pending || len > r->max_record)
        return NULL;
    uint32_t size = BT_RING_REC_HDR + len;
    uint64_t stride = bti_ring_stride(size);
    uint64_t off = r->pos & r->mask;
    uint64_t to_end = r->capacity - off;
    uint64_t need = (stride <= to_end ? stride : to_end + stride) + BT_RING_REC_HDR;
    if (r->pos + need - r->peer > r->capacity) {
        int free_bytes = bti_ring_refresh_head(r);
        if (free_bytes < 0 || (uint64_t)free_bytes < need) {
            r->full_events++;
            return NULL;
        }
    }
    if (stride > to_end) {
        bti_ring_pad_to_end(r);
        off = 0;
    }
    r->pending = size;
    return r->data + off + BT_RING_REC_HDR;
}

/*
 * Commit the reserved record: zero the next record's size word, then release-store this one's.  Release,
 * because the payload and the zeroed successor must be visible before a consumer can see the size.
 */
static inline void bt_ring_commit(bt_ring *r)
{
    uint64_t off = r->pos & r->mask;
    uint64_t stride = bti_ring_stride(r->pending);
    uint32_t *rec = (uint32_t *)(void *)(r->data + off);
    uint32_t *next = (uint32_t *)(void *)(r->data + ((r->pos + stride) & r->mask));
    __atomic_store_n(next, 0u, __ATOMIC_RELAXED);
    rec[1] = BT_RING_KIND_DATA;
    __atomic_store_n(&rec[0], r->pending, __ATOMIC_RELEASE);
    r->pos += stride;
    r->pending = 0;
}

/*
 * Publish committed records: store the tail for space accounting and wake a parked consumer.  Call once per
 * batch.  Costs a fence, and a futex syscall only when the consumer is parked.
 */
void bt_ring_publish(bt_ring *r);

/*
 * Consumer fast path: point *data at the next committed record and return its payload length, or -EAGAIN
 * when there is none, or -EPROTO when the size word is impossible (a corrupt or hostile producer); the ring
 * is unusable after -EPROTO.  The size word is read once (acquire: pairs with the commit's release) and
 * bounds-checked before use.  *data stays valid until bt_ring_consume.  PAD records are skipped here.
 */
static inline int bt_ring_peek(bt_ring *r, const void **data)
{
    for (;;) {
        uint64_t off = r->pos & r->mask;
        const uint32_t *rec = (const uint32_t *)(const void *)(r->data + off);
        uint32_t size = __atomic_load_n(&rec[0], __ATOMIC_ACQUIRE);
        if (size == 0)
            return -EAGAIN;
        uint32_t kind = rec[1];
        if (!bti_ring_rec_ok(r, off, size, kind))
            return -EPROTO;
        if (kind == BT_RING_KIND_PAD) {
            r->pos += size;
            continue;
        }
        *data = rec + 2;
        return (int)(size - BT_RING_REC_HDR);
    }
}

/* Consumer: step past the record bt_ring_peek returned, whose payload length was len. */
static inline void bt_ring_consume(bt_ring *r, uint32_t len)
{
    r->pos += bti_ring_stride(BT_RING_REC_HDR + len);
}

/*
 * Consumer: release everything consumed so far to the producer (release-store of head: our reads of those
 * bytes happen before the producer may overwrite them).  Call once per batch.
 */
void bt_ring_release(bt_ring *r);

/* Copy one payload in: reserve + memcpy + commit + publish.  -ENOSPC when full, -EMSGSIZE when too big. */
int bt_ring_write(bt_ring *r, const void *data, uint32_t len);

/*
 * Write up to n records whose payloads lie back to back in buf with lengths lens[0..n), then publish once.
 * Returns how many were written (stops at the first that does not fit), or -ENOSPC when not even the first
 * fits, -EMSGSIZE when the first is larger than max_record.
 */
int bt_ring_write_batch(bt_ring *r, const void *buf, const uint32_t *lens, int n);

/*
 * Copy up to max_n records back to back into buf[0..cap), their lengths into lens, then release once.
 * Returns the count, -EAGAIN when the ring is empty, -ENOBUFS when the first record does not fit in cap
 * (it stays in the ring), -EPROTO on corruption.
 */
int bt_ring_read_batch(bt_ring *r, void *buf, size_t cap, uint32_t *lens, int max_n);

/*
 * Consumer: wait until a record is available.  Spins for the spin budget, then parks on the shared futex
 * (sets the waiters flag, re-checks, FUTEX_WAIT).  Returns 1 when a record is ready, -ETIMEDOUT after
 * timeout_ns (UINT64_MAX waits for ever), -EPIPE when the producer closed the ring or died and nothing is
 * left, -EPROTO on corruption.
 */
int bt_ring_wait(bt_ring *r, uint64_t timeout_ns);

/* bt_ring_wait then bt_ring_read_batch, in one call (one boundary crossing from Python). */
int bt_ring_read_wait(bt_ring *r, void *buf, size_t cap, uint32_t *lens, int max_n, uint64_t timeout_ns);

/* Where a batch read lands and how long it may wait: set up once, reused by every bt_ring_exchange. */
typedef struct bt_ring_batch {
    void *buf;           /* records back to back */
    size_t cap;          /* bytes at buf */
    uint32_t *lens;      /* their lengths */
    int32_t max_n;       /* entries at lens */
    uint32_t _pad;
    uint64_t timeout_ns; /* as in bt_ring_wait; UINT64_MAX waits for ever */
} bt_ring_batch;

/*
 * Write one record to `out` (and publish it), then bt_ring_read_wait on `in` into *dst: the shape of both
 * ends of a round trip -- a client sending a request and waiting for the answer, an agent reporting a
 * result and waiting for its next task -- in one call, so Python pays one boundary crossing per round trip
 * instead of two (and converts 5 arguments, not 9: each costs ~40 ns through cffi).  `out` is a producer
 * end, `in` a consumer end.  Returns what bt_ring_read_wait returns, or the write's error (-ENOSPC,
 * -EMSGSIZE) with nothing read.
 */
int bt_ring_exchange(bt_ring *out, const void *data, uint32_t len, bt_ring *in, const bt_ring_batch *dst);

/* ================================================================================================ */
/* Unix sockets: framed streams, descriptor passing, peer credentials.                               */
/* ================================================================================================ */

/*
 * Listen on a unix stream socket at path (non-blocking, close-on-exec).  Does not remove an existing path:
 * -EADDRINUSE when something is bound there (the daemon decides whether it is stale).  -ENAMETOOLONG when
 * path does not fit sun_path.  Returns the listening fd, owned by the caller.
 */
int bt_sock_listen(const char *path, int backlog);

/* Connect to the unix stream socket at path.  Returns a blocking, close-on-exec fd owned by the caller. */
int bt_sock_connect(const char *path);

/* Accept one connection: a non-blocking, close-on-exec fd owned by the caller, or -EAGAIN. */
int bt_sock_accept(int listen_fd);

/* Write all len bytes, retrying on EINTR and, for a non-blocking fd, polling while it is full. 0 or -errno. */
int bt_sock_send_all(int fd, const void *buf, size_t len);

/*
 * Send len bytes (at least 1) together with nfds descriptors (at most BT_SOCK_MAX_FDS) in one
 * SCM_RIGHTS message.  The descriptors stay owned by the caller.  Returns bytes sent or -errno.
 */
#define BT_SOCK_MAX_FDS 8
int bt_sock_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);

/*
 * Receive up to cap bytes and up to max_fds descriptors (close-on-exec).  *nfds gets how many arrived; the
 * caller owns them.  Descriptors beyond max_fds, or a truncated control message, are closed and reported as
 * -EMSGSIZE: then every descriptor of that message is closed, *nfds is 0 and its bytes are lost (treat it
 * as a protocol error and drop the connection).  Returns bytes received (0 at end of stream) or -errno.
 */
int bt_sock_recv_fds(int sock, void *buf, size_t cap, int *fds, int max_fds, int *nfds);

typedef struct bt_peercred {
    int32_t pid;
    uint32_t uid;
    uint32_t gid;
} bt_peercred;

/* The credentials of the process at the other end of a unix socket (SO_PEERCRED). */
int bt_sock_peercred(int fd, bt_peercred *out);

/*
 * A frame reader turns a byte stream into validated frames.  Bytes come from bt_frame_reader_fill (read on a
 * fd) or bt_frame_reader_feed (bytes received elsewhere, e.g. an io_uring completion).  It never grows past
 * BT_FRAME_HEADER_SIZE + max_payload bytes of buffering.
 */
typedef struct bt_frame_reader bt_frame_reader;

/* max_payload as in bt_frame_decode.  *out owned by the caller; release with bt_frame_reader_close. */
int bt_frame_reader_open(uint32_t max_payload, bt_frame_reader **out);
void bt_frame_reader_close(bt_frame_reader *rd);

/*
 * read() once from fd into the buffer.  Bytes read, -EPIPE at end of stream, -EAGAIN, -ENOBUFS when the
 * buffer already holds 48 + max_payload bytes (take frames out first), or -errno.  After a stream error,
 * fill and feed return that error too.
 */
int bt_frame_reader_fill(bt_frame_reader *rd, int fd);

/*
 * Append len bytes, all or nothing.  Returns len, or -ENOBUFS when they do not fit before frames are taken
 * out (after taking every complete frame out, at least one byte always fits).
 */
int bt_frame_reader_feed(bt_frame_reader *rd, const void *data, size_t len);

/*
 * Take the next complete frame.  Returns 1 and fills *hdr and *payload (valid until the next call on rd),
 * 0 when more bytes are needed, or the decode error when the stream is bad; a stream error is sticky (the
 * stream cannot be resynchronised: close it).
 */
int bt_frame_reader_next(bt_frame_reader *rd, bt_frame_hdr *hdr, const void **payload);

/*
 * Batch form for callers that cross a language boundary: copy up to max_n whole frames (header and payload,
 * as on the wire) back to back into buf[0..cap), their sizes into lens.  Returns the count (0 when none is
 * complete), -ENOBUFS when the first complete frame does not fit in cap (it stays buffered; not sticky), or
 * a sticky stream error (reported once the frames before it have been handed over).
 */
int bt_frame_reader_drain(bt_frame_reader *rd, void *buf, size_t cap, uint32_t *lens, int max_n);

/* ================================================================================================ */
/* I/O engine for the socket plane: io_uring where the build has liburing and the kernel allows it,     */
/* epoll otherwise, chosen at run time.  Both backends give the same events.                          */
/* ================================================================================================ */

#define BT_IO_AUTO 0
#define BT_IO_EPOLL 1
#define BT_IO_URING 2

#define BT_IO_EV_READABLE 1 /* bytes (or EOF) arrived on the watched fd; result 0 */
#define BT_IO_EV_SENT 2     /* a bt_io_send finished; result = bytes sent or -errno */
#define BT_IO_EV_ERROR 3    /* the watch failed; result = -errno; the fd is no longer watched */

typedef struct bt_io bt_io;

typedef struct bt_io_event {
    uint64_t tag;
    int32_t kind;
    int32_t result;
} bt_io_event;

/* Tags must fit in 60 bits: the engine keeps the event kind in the top bits of io_uring's user_data. */
#define BT_IO_TAG_MAX ((1ull << 60) - 1)

/*
 * Open an engine.  BT_IO_AUTO picks io_uring when it is compiled in and io_uring_queue_init succeeds (the
 * kernel may forbid it), epoll otherwise; BATON_IO=epoll in the environment forces epoll.  Asking for
 * BT_IO_URING where it cannot work returns -EOPNOTSUPP (not built) or the kernel's error.
 */
int bt_io_open(int backend, unsigned entries, bt_io **out);
void bt_io_close(bt_io *io);

/* BT_IO_EPOLL or BT_IO_URING. */
int bt_io_backend(const bt_io *io);

/*
 * Report BT_IO_EV_READABLE with tag when fd is readable at watch time and each time bytes or EOF arrive,
 * until bt_io_unwatch.  Arrival-triggered on both backends (io_uring multishot poll cannot repeat an event
 * for bytes left unread, so epoll runs edge-triggered to match): after an event, read until -EAGAIN, or
 * what is left is only reported with the next arrival.  An event may occasionally be repeated (a re-armed
 * poll); a read then finds -EAGAIN.  One watch per fd (-EEXIST); -EBADF for a bad fd.  fd stays the
 * caller's; unwatch before closing it.  bt_io_unwatch(fd, tag) takes effect at once -- no event of that
 * watch is reported after it -- and returns -ENOENT when fd has no watch with this tag.
 */
int bt_io_watch(bt_io *io, int fd, uint64_t tag);
int bt_io_unwatch(bt_io *io, int fd, uint64_t tag);

/*
 * Queue a send of buf[0..len) on fd; completion is a BT_IO_EV_SENT event with tag.  buf must stay valid and
 * unchanged until then.  io_uring queues it for the next bt_io_wait (one syscall submits the batch); epoll
 * sends at once and reports the result at the next bt_io_wait.  Both send without waiting (MSG_DONTWAIT |
 * MSG_NOSIGNAL): the result may be short, or -EAGAIN when the socket is full, or -EPIPE; a short or failed
 * send leaves the stream out of step if later sends on that fd went out, so treat it as fatal for a framed
 * connection or send at most one buffer per fd per wait.  len <= INT32_MAX.
 */
int bt_io_send(bt_io *io, int fd, const void *buf, uint32_t len, uint64_t tag);

/*
 * Submit what is queued and wait up to timeout_ms (-1 for ever, 0 to poll) for events; returns how many were
 * stored in evs[0..max) (0 on timeout; events beyond max wait for the next call), or -errno.  -EINTR means
 * a signal interrupted the wait -- or, with epoll, io_uring work pending on this thread from another ring --
 * and nothing was lost: call again (after running signal handlers).
 */
int bt_io_wait(bt_io *io, bt_io_event *evs, int max, int timeout_ms);


/* ================================================================================================ */
/* The baton protocol's constants (docs/protocol.md; twins of baton/protocol.py, checked by a test).  */
/* ================================================================================================ */

#define BT_EP_NONE 0ull
#define BT_EP_COORDINATOR 1ull

#define BT_MSG_HELLO 1
#define BT_MSG_WELCOME 2
#define BT_MSG_CALL 3
#define BT_MSG_DIRECT 10
#define BT_MSG_PUBLISH 11
#define BT_MSG_SUBSCRIBE 12
#define BT_MSG_UNSUBSCRIBE 13
#define BT_MSG_JOIN 14
#define BT_MSG_LEAVE 15
#define BT_MSG_MULTICAST 16
#define BT_MSG_BROADCAST 17
#define BT_MSG_TASK 20
#define BT_MSG_RESULT 21
#define BT_MSG_HEARTBEAT 22
#define BT_MSG_RING_SETUP 30
#define BT_MSG_RING_READY 31
#define BT_MSG_PING 32
#define BT_MSG_EP_OPEN 40
#define BT_MSG_EP_CLOSED 41
#define BT_MSG_DISPATCHED 42
#define BT_MSG_ROUTER_LOG 43
#define BT_MSG_ROUTER_STATS 44
#define BT_MSG_CONTINUED 45
#define BT_MSG_CTL_AGENT 50
#define BT_MSG_CTL_CLOSE 51
#define BT_MSG_CTL_REVOKE 52
#define BT_MSG_CTL_PAUSE 54
#define BT_MSG_CTL_STATS 55
#define BT_MSG_CTL_SHUTDOWN 56
#define BT_MSG_CTL_CONTINUE 57

/* Binary control payload sizes: CTL_AGENT <QQI, CTL_CLOSE <Q, CTL_REVOKE <QQ, CTL_PAUSE <I. */
#define BT_CTL_AGENT_SIZE 20
#define BT_CTL_CLOSE_SIZE 8
#define BT_CTL_REVOKE_SIZE 16
#define BT_CTL_PAUSE_SIZE 4
/* CTL_CONTINUE: <Q parent dispatch id, then one whole encoded TASK frame (so at least 8 + 48 bytes). */
#define BT_CTL_CONTINUE_PARENT_SIZE 8

/* RING_SETUP with destination 0 asks for this capacity per ring; the router grants at most the maximum. */
#define BT_RING_SETUP_DEFAULT_CAPACITY (1u << 20)
#define BT_RING_SETUP_MAX_CAPACITY (16u << 20)

/* ================================================================================================ */
/* The router: the data plane between clients and the coordinator (docs/router.md).                   */
/* ================================================================================================ */

typedef struct bt_router bt_router;

/*
 * What a router needs.  Every descriptor stays the caller's: the router never closes any of them, and the
 * caller keeps them open until bt_router_close.
 */
typedef struct bt_router_config {
    int32_t listen_fd;          /* listening unix stream socket; the router accepts on it */
    int32_t coord_in_ring_fd;   /* coordinator -> router ring segment (the router is its consumer) */
    int32_t coord_out_ring_fd;  /* router -> coordinator ring segment (the router is its producer) */
    int32_t coord_in_bell;      /* eventfd the coordinator writes when the router armed coord_in */
    int32_t coord_out_bell;     /* eventfd the router writes when the coordinator armed coord_out */
    uint32_t allowed_uid;       /* peers with this uid may connect... */
    int64_t allowed_gid;        /* ... and peers with this gid, when >= 0 (-1: nobody else) */
    uint32_t max_payload;       /* larger frames: too_large and the connection closed (0 = default) */
    uint32_t generation;        /* high 32 bits of every endpoint id this router hands out */
    int32_t io_backend;         /* BT_IO_AUTO, BT_IO_EPOLL or BT_IO_URING */
    uint32_t out_limit;         /* bytes a connection may have waiting to be sent (0 = 8 MiB) */
    uint64_t spin_ns;           /* how long an idle router polls its rings before it sleeps */
} bt_router_config;

/*
 * Create a router: attach the two coordinator rings, open the I/O engine, watch the listening socket and
 * the inbound doorbell.  Nothing is accepted or read until bt_router_run.  *out is owned by the caller
 * (bt_router_close); on failure nothing is left behind.  -EINVAL for a bad config, or the error of the ring
 * attach / engine open.
 */
int bt_router_open(const bt_router_config *cfg, bt_router **out);

/*
 * Route until CTL_SHUTDOWN (returns 0 after flushing and closing every connection) or until the coordinator
 * link ends: its ring closed or its process died (-EPIPE), or its ring is corrupt (-EPROTO).  Blocks the
 * calling thread; the router belongs to that thread while it runs.  No peer input can make it fail: a bad
 * client is answered and/or closed, never allowed to stop the loop.
 */
int bt_router_run(bt_router *r);

/* Close every connection (without notifying anyone), detach the rings, free the router.  NULL: no-op. */
void bt_router_close(bt_router *r);

/* The I/O backend in use (BT_IO_EPOLL or BT_IO_URING). */
int bt_router_backend(const bt_router *r);

#ifdef __cplusplus
}
#endif
#endif /* BATON_H */
