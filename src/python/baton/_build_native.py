"""cffi builder for libbaton (API mode, out-of-line).  Never imports baton: it runs before baton exists.

The C sources are compiled straight into the extension module ``baton._native``; ``baton.native`` is the only
module that imports it.  liburing is used when its header is installed (Debian: liburing-dev) unless
BATON_NO_URING=1; without it the I/O engine is epoll only.
"""

from __future__ import annotations

import glob
import os

from cffi import FFI

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SOURCES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "src", "c", "*.c")))

# The declarations Python may call.  Inline fast-path functions (reserve/commit/peek) stay C-only: from
# Python one call must move a whole record or a whole batch.  Input buffers are declared `const char *`
# (the C side takes `const void *`) so Python can pass a bytes object without an ffi.from_buffer call.
CDEF = """
#define BT_FRAME_MAGIC ...
#define BT_FRAME_VERSION ...
#define BT_FRAME_HEADER_SIZE ...
#define BT_FRAME_MAX_PAYLOAD_DEFAULT ...
#define BT_FRAME_MAX_PAYLOAD_LIMIT ...
#define BT_FRAME_F_CRC ...
#define BT_FRAME_F_REPLY ...
#define BT_FRAME_F_ERROR ...
#define BT_RING_HDR_SIZE ...
#define BT_RING_MIN_CAPACITY ...
#define BT_RING_MAX_CAPACITY ...
#define BT_RING_PRODUCER ...
#define BT_RING_CONSUMER ...
#define BT_SOCK_MAX_FDS ...
#define BT_IO_AUTO ...
#define BT_IO_EPOLL ...
#define BT_IO_URING ...
#define BT_IO_EV_READABLE ...
#define BT_IO_EV_SENT ...
#define BT_IO_EV_ERROR ...
#define BT_MSG_HELLO ...
#define BT_MSG_WELCOME ...
#define BT_MSG_CALL ...
#define BT_MSG_DIRECT ...
#define BT_MSG_PUBLISH ...
#define BT_MSG_SUBSCRIBE ...
#define BT_MSG_UNSUBSCRIBE ...
#define BT_MSG_JOIN ...
#define BT_MSG_LEAVE ...
#define BT_MSG_MULTICAST ...
#define BT_MSG_BROADCAST ...
#define BT_MSG_TASK ...
#define BT_MSG_RESULT ...
#define BT_MSG_HEARTBEAT ...
#define BT_MSG_RING_SETUP ...
#define BT_MSG_RING_READY ...
#define BT_MSG_PING ...
#define BT_MSG_EP_OPEN ...
#define BT_MSG_EP_CLOSED ...
#define BT_MSG_DISPATCHED ...
#define BT_MSG_ROUTER_LOG ...
#define BT_MSG_ROUTER_STATS ...
#define BT_MSG_CTL_AGENT ...
#define BT_MSG_CTL_CLOSE ...
#define BT_MSG_CTL_REVOKE ...
#define BT_MSG_CTL_PAUSE ...
#define BT_MSG_CTL_STATS ...
#define BT_MSG_CTL_SHUTDOWN ...
#define BT_MSG_CONTINUED ...
#define BT_MSG_CTL_CONTINUE ...
#define BT_EP_NONE ...
#define BT_EP_COORDINATOR ...
#define BT_RING_SETUP_DEFAULT_CAPACITY ...
#define BT_RING_SETUP_MAX_CAPACITY ...
#define BT_CTL_AGENT_SIZE ...
#define BT_CTL_CLOSE_SIZE ...
#define BT_CTL_REVOKE_SIZE ...
#define BT_CTL_PAUSE_SIZE ...
#define BT_CTL_CONTINUE_PARENT_SIZE ...

typedef struct bt_frame_hdr {
    uint8_t version;
    uint8_t type;
    uint8_t priority;
    uint8_t flags;
    uint32_t payload_len;
    uint32_t crc32c;
    uint64_t source;
    uint64_t destination;
    uint64_t correlation_id;
    uint64_t send_ts_ns;
    ...;
} bt_frame_hdr;

typedef struct bt_ring bt_ring;
typedef struct bt_ring_stats {
    uint64_t capacity;
    uint64_t generation;
    uint64_t used;
    uint64_t full_events;
    uint32_t max_record;
    int32_t role;
} bt_ring_stats;

typedef struct bt_peercred { int32_t pid; uint32_t uid; uint32_t gid; } bt_peercred;
typedef struct bt_frame_reader bt_frame_reader;
typedef struct bt_io bt_io;
typedef struct bt_io_event { uint64_t tag; int32_t kind; int32_t result; } bt_io_event;

const char *bt_version(void);
uint64_t bt_now_ns(void);

uint32_t bt_crc32c(uint32_t crc, const char *data, size_t len);
int bt_frame_encode(void *buf, size_t cap, const bt_frame_hdr *hdr, const char *payload, size_t len);
int bt_frame_decode(const char *buf, size_t len, uint32_t max_payload, bt_frame_hdr *out);

int bt_ring_create(uint64_t capacity, int role, uint64_t generation, bt_ring **out);
int bt_ring_attach(int fd, int role, bt_ring **out);
void bt_ring_close(bt_ring *r);
int bt_ring_fd(const bt_ring *r);
void bt_ring_set_spin(bt_ring *r, uint64_t spin_ns);
void bt_ring_stats_get(const bt_ring *r, bt_ring_stats *out);
int bt_ring_write(bt_ring *r, const char *data, uint32_t len);
int bt_ring_write_batch(bt_ring *r, const char *buf, const uint32_t *lens, int n);
int bt_ring_read_batch(bt_ring *r, void *buf, size_t cap, uint32_t *lens, int max_n);
int bt_ring_wait(bt_ring *r, uint64_t timeout_ns);
void bt_ring_set_doorbell(bt_ring *producer_end, int eventfd);
int bt_ring_arm(bt_ring *consumer_end);
void bt_ring_disarm(bt_ring *consumer_end);
int bt_ring_producer_gone(bt_ring *consumer_end);
int bt_ring_read_wait(bt_ring *r, void *buf, size_t cap, uint32_t *lens, int max_n, uint64_t timeout_ns);
typedef struct bt_ring_batch {
    void *buf;
    size_t cap;
    uint32_t *lens;
    int32_t max_n;
    uint64_t timeout_ns;
    ...;
} bt_ring_batch;
int bt_ring_exchange(bt_ring *out, const char *data, uint32_t len, bt_ring *in, const bt_ring_batch *dst);

int bt_sock_listen(const char *path, int backlog);
int bt_sock_connect(const char *path);
int bt_sock_accept(int listen_fd);
int bt_sock_send_all(int fd, const char *buf, size_t len);
int bt_sock_send_fds(int sock, const char *buf, size_t len, const int *fds, int nfds);
int bt_sock_recv_fds(int sock, void *buf, size_t cap, int *fds, int max_fds, int *nfds);
int bt_sock_peercred(int fd, bt_peercred *out);

int bt_frame_reader_open(uint32_t max_payload, bt_frame_reader **out);
void bt_frame_reader_close(bt_frame_reader *rd);
int bt_frame_reader_fill(bt_frame_reader *rd, int fd);
int bt_frame_reader_feed(bt_frame_reader *rd, const char *data, size_t len);
int bt_frame_reader_drain(bt_frame_reader *rd, void *buf, size_t cap, uint32_t *lens, int max_n);

int bt_io_open(int backend, unsigned entries, bt_io **out);
void bt_io_close(bt_io *io);
int bt_io_backend(const bt_io *io);
int bt_io_watch(bt_io *io, int fd, uint64_t tag);
int bt_io_unwatch(bt_io *io, int fd, uint64_t tag);
int bt_io_send(bt_io *io, int fd, const char *buf, uint32_t len, uint64_t tag);
int bt_io_wait(bt_io *io, bt_io_event *evs, int max, int timeout_ms);

typedef struct bt_router bt_router;
typedef struct bt_router_config {
    int32_t listen_fd;
    int32_t coord_in_ring_fd;
    int32_t coord_out_ring_fd;
    int32_t coord_in_bell;
    int32_t coord_out_bell;
    uint32_t allowed_uid;
    int64_t allowed_gid;
    uint32_t max_payload;
    uint32_t generation;
    int32_t io_backend;
    uint32_t out_limit;
    uint64_t spin_ns;
    ...;
} bt_router_config;
int bt_router_open(const bt_router_config *cfg, bt_router **out);
int bt_router_run(bt_router *r);
void bt_router_close(bt_router *r);
int bt_router_backend(const bt_router *r);
/* router_internal.h: the router's check of a RESULT payload, exported for the cross-check with the Python router */
int bt_result_ok(const uint8_t *p, size_t n);
"""


def _have_liburing() -> bool:
    if os.environ.get("BATON_NO_URING") == "1":
        return False
    return any(os.path.exists(os.path.join(d, "liburing.h")) for d in ("/usr/include", "/usr/local/include"))


def _make_builder() -> FFI:
    builder = FFI()
    builder.cdef(CDEF)
    uring = _have_liburing()
    builder.set_source(
        "baton._native",
        '#include "baton.h"\nint bt_result_ok(const uint8_t *p, size_t n);\n',
        sources=SOURCES,
        include_dirs=["include"],
        define_macros=[("_GNU_SOURCE", "1")] + ([("BT_HAVE_LIBURING", "1")] if uring else []),
        libraries=["uring"] if uring else [],
        extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-fno-strict-aliasing"],
    )
    return builder


ffibuilder = _make_builder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
