/*
 * ring.c -- the slow half of the shared-memory SPSC ring: segment lifecycle, validation of a peer's segment,
 * publish/release of the indices, and the spin-then-park wait.  The fast half (reserve/commit/peek/consume)
 * is inline in baton.h; the protocol is described there.
 *
 * Memory-ordering summary (each site repeats why):
 *   - a record's size word is the commit: release by the producer, acquire by the consumer;
 *   - tail/head are published with release and read with acquire, so "space is free" and "bytes are
 *     committed" carry the data accesses that made them true;
 *   - park/wake is a store-buffering (Dekker) pattern: the producer stores the commit then loads `waiters`,
 *     the consumer stores `waiters` then loads the commit; a seq_cst fence on each side between store and
 *     load guarantees at least one of them sees the other, so a wake-up is never lost, while an awake
 *     consumer costs the producer a fence and no syscall.
 */
#include "baton.h"

#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define RING_DEFAULT_SPIN_NS 50000ull
/* A parked consumer wakes at least this often to see whether the producer died without closing. */
#define RING_LIVENESS_SLICE_NS 100000000ull
/* Spin iterations between two clock reads: a clock read costs ~20 ns, a pause ~10-40 ns. */
#define RING_SPIN_CLOCK_EVERY 32

static int ring_is_pow2(uint64_t v)
{
    return v != 0 && (v & (v - 1)) == 0;
}

/* Shared futex (no FUTEX_PRIVATE_FLAG): the word lives in a MAP_SHARED memfd mapped by two processes, and a
 * private futex is keyed by the process's own mm, so a wake from the other process would never reach us. */
static int ring_futex_wait(uint32_t *addr, uint32_t expected, uint64_t timeout_ns)
{
    struct timespec ts = {.tv_sec = (time_t)(timeout_ns / 1000000000ull),
                          .tv_nsec = (long)(timeout_ns % 1000000000ull)};
    long rc = syscall(SYS_futex, addr, FUTEX_WAIT, expected, &ts, NULL, 0);
    return rc < 0 ? -errno : 0;
}

static void ring_futex_wake(uint32_t *addr, int n)
{
    (void)syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* Bump the sequence and wake the (single) consumer.  The bump makes a consumer that read the old sequence
 * but has not yet entered FUTEX_WAIT fail its wait with EAGAIN instead of sleeping through this wake-up.
 * Relaxed: the ordering against the commit was already provided by the caller's seq_cst fence, and the
 * kernel compares the futex word under its own lock. */
static void ring_wake(bt_ring_shm *shm)
{
    __atomic_add_fetch(&shm->futex_seq, 1u, __ATOMIC_RELAXED);
    ring_futex_wake(&shm->futex_seq, INT_MAX);
}

/* Ring the consumer's eventfd.  EAGAIN (counter saturated) means it is already due to wake; any other error
 * leaves nothing to do from a publish, which cannot fail. */
static void ring_bell(int efd)
{
    uint64_t one = 1;
    ssize_t n;
    do {
        n = write(efd, &one, sizeof(one));
    } while (n < 0 && errno == EINTR);
}

static int ring_alloc_handle(bt_ring_shm *shm, size_t map_len, uint64_t capacity, uint32_t max_record,
                             int role, int fd, bt_ring **out)
{
    bt_ring *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    r->shm = shm;
    r->data = (uint8_t *)shm + BT_RING_HDR_SIZE;
    r->capacity = capacity;
    r->mask = capacity - 1;
    r->max_record = max_record;
    r->role = role;
    r->fd = fd;
    r->spin_ns = RING_DEFAULT_SPIN_NS;
    r->map_len = map_len;
    r->doorbell = -1;
    *out = r;
    return 0;
}

int bt_ring_create(uint64_t capacity, int role, uint64_t generation, bt_ring **out)
{
    if (!out || (role != BT_RING_PRODUCER && role != BT_RING_CONSUMER) || !ring_is_pow2(capacity) ||
        capacity < BT_RING_MIN_CAPACITY || capacity > BT_RING_MAX_CAPACITY)
        return -EINVAL;
    size_t map_len = (size_t)(BT_RING_HDR_SIZE + capacity);
    int rc;
    int fd = memfd_create("baton-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -errno;
    if (ftruncate(fd, (off_t)map_len) < 0) {
        rc = -errno;
        goto fail_fd;
    }
    void *map = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        rc = -errno;
        goto fail_fd;
    }
    /* The fd has not been shared yet, so plain stores suffice: whoever receives it later does so through a
     * syscall (SCM_RIGHTS, fork), which orders these stores before anything the receiver reads.  The data
     * area is zero from ftruncate, which is the "no record yet" state of every size word. */
    bt_ring_shm *shm = map;
    shm->magic = BT_RING_MAGIC;
    shm->version = BT_RING_VERSION;
    shm->hdr_size = BT_RING_HDR_SIZE;
    shm->capacity = capacity;
    shm->generation = generation;
    shm->max_record = (uint32_t)(capacity / 4);
    shm->tail = 0;
    shm->head = 0;
    shm->producer_pid = role == BT_RING_PRODUCER ? (int32_t)getpid() : 0;
    /* Seal last: after F_SEAL_SEAL nobody (us included) can change the seals, and without SHRINK/GROW a
     * peer could truncate the file and turn our loads into SIGBUS. */
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        rc = -errno;
        goto fail_map;
    }
    rc = ring_alloc_handle(shm, map_len, capacity, shm->max_record, role, fd, out);
    if (rc < 0)
        goto fail_map;
    return 0;

fail_map:
    munmap(map, map_len);
fail_fd:
    close(fd);
    return rc;
}

/*
 * A producer taking over an existing segment continues at the published tail, but a previous producer may
 * have committed records after its last publish.  Walk over them (validated like a consumer would) so the
 * new producer starts where the size word is 0 and never overwrites a committed record.  In a fresh segment
 * the size word at the tail is 0 and this returns at once.
 */
static int ring_find_end(bt_ring *r, uint64_t head, uint64_t *pos)
{
    uint64_t p = *pos;
    for (;;) {
        uint64_t off = p & r->mask;
        const uint32_t *rec = (const uint32_t *)(const void *)(r->data + off);
        /* Acquire, as in bt_ring_peek: if the record is committed we must not act on stale bytes. */
        uint32_t size = __atomic_load_n(&rec[0], __ATOMIC_ACQUIRE);
        if (size == 0)
            break;
        uint32_t kind = __atomic_load_n(&rec[1], __ATOMIC_RELAXED);
        if (!bti_ring_rec_ok(r, off, size, kind))
            return -EPROTO;
        uint64_t stride = bti_ring_stride(size);
        /* A legitimate producer always leaves 8 free bytes for the zeroed successor size word. */
        if (p + stride + BT_RING_REC_HDR - head > r->capacity)
            return -EPROTO;
        p += stride;
    }
    *pos = p;
    return 0;
}

int bt_ring_attach(int fd, int role, bt_ring **out)
{
    if (!out || fd < 0 || (role != BT_RING_PRODUCER && role != BT_RING_CONSUMER))
        return -EINVAL;
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0) {
        /* EINVAL: not a memfd (or a file system without sealing), so it cannot be sealed: same verdict. */
        return errno == EINVAL ? -EPERM : -errno;
    }
    if ((seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW))
        return -EPERM;
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    /* Size is fixed by the seals, so checking it once is enough.  It must be a header plus a power-of-two
     * data area in range before we map anything. */
    if (st.st_size < (off_t)(BT_RING_HDR_SIZE + BT_RING_MIN_CAPACITY) ||
        st.st_size > (off_t)(BT_RING_HDR_SIZE + (uint64_t)BT_RING_MAX_CAPACITY) ||
        !ring_is_pow2((uint64_t)st.st_size - BT_RING_HDR_SIZE))
        return -EPROTO;
    size_t map_len = (size_t)st.st_size;
    void *map = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        return -errno;
    bt_ring_shm *shm = map;
    int rc = -EPROTO;
    /* Every header field is read exactly once into a local (relaxed atomic loads, because a hostile peer may
     * be writing them right now) and only the validated local copy is used from here on. */
    uint64_t magic = __atomic_load_n(&shm->magic, __ATOMIC_RELAXED);
    uint32_t version = __atomic_load_n(&shm->version, __ATOMIC_RELAXED);
    uint32_t hdr_size = __atomic_load_n(&shm->hdr_size, __ATOMIC_RELAXED);
    uint64_t capacity = __atomic_load_n(&shm->capacity, __ATOMIC_RELAXED);
    uint32_t max_record = __atomic_load_n(&shm->max_record, __ATOMIC_RELAXED);
    if (magic != BT_RING_MAGIC)
        goto fail;
    if (version != BT_RING_VERSION) {
        rc = -EPROTONOSUPPORT;
        goto fail;
    }
    if (hdr_size != BT_RING_HDR_SIZE || !ring_is_pow2(capacity) || capacity != map_len - BT_RING_HDR_SIZE ||
        max_record == 0 || max_record > capacity / 4)
        goto fail;
    /* Acquire on both indices: whatever the other side wrote before publishing them (records, or the
     * consumption of records) must be visible before we act on the indices. */
    uint64_t head = __atomic_load_n(&shm->head, __ATOMIC_ACQUIRE);
    uint64_t tail = __atomic_load_n(&shm->tail, __ATOMIC_ACQUIRE);
    if (head > tail || tail - head > capacity || (head | tail) % BT_RING_ALIGN != 0)
        goto fail;
    bt_ring *r;
    rc = ring_alloc_handle(shm, map_len, capacity, max_record, role, -1, &r);
    if (rc < 0)
        goto fail;
    if (role == BT_RING_PRODUCER) {
        uint64_t pos = tail;
        rc = ring_find_end(r, head, &pos);
        if (rc < 0) {
            free(r);
            goto fail;
        }
        r->pos = pos;
        r->peer = head;
        r->published = tail;
        /* Relaxed: the pid is a liveness hint the consumer probes in its slow path; it orders nothing. */
        __atomic_store_n(&shm->producer_pid, (int32_t)getpid(), __ATOMIC_RELAXED);
    } else {
        r->pos = head;
        r->published = head;
    }
    *out = r;
    return 0;

fail:
    munmap(map, map_len);
    return rc;
}

void bt_ring_close(bt_ring *r)
{
    if (!r)
        return;
    bt_ring_shm *shm = r->shm;
    if (r->role == BT_RING_PRODUCER) {
        /* An uncommitted reservation is dropped: its size word is still 0, so nobody can see it. */
        bt_ring_publish(r);
        /* Release: a consumer that sees closed (acquire) also sees every record committed before it, so
         * "closed and nothing to read" really means drained. */
        __atomic_store_n(&shm->producer_closed, 1u, __ATOMIC_RELEASE);
        /* seq_cst fence, then wake unconditionally: close is rare, and the fence pairs with the consumer's
         * fence between setting `waiters` and re-checking `producer_closed`, like publish. */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        ring_wake(shm);
        if (r->doorbell >= 0)
            ring_bell(r->doorbell); /* a consumer blocked in an event loop learns of the close too */
    }
    munmap(shm, r->map_len);
    if (r->fd >= 0)
        close(r->fd);
    free(r);
}

int bt_ring_fd(const bt_ring *r)
{
    return r && r->fd >= 0 ? r->fd : -EBADF;
}

void bt_ring_set_spin(bt_ring *r, uint64_t spin_ns)
{
    if (r)
        r->spin_ns = spin_ns;
}

void bt_ring_stats_get(const bt_ring *r, bt_ring_stats *out)
{
    if (!r || !out)
        return;
    /* Relaxed everywhere: a statistic orders nothing.  The peer's index is untrusted, hence the clamp. */
    uint64_t tail = __atomic_load_n(&r->shm->tail, __ATOMIC_RELAXED);
    uint64_t head = __atomic_load_n(&r->shm->head, __ATOMIC_RELAXED);
    uint64_t used = tail >= head ? tail - head : 0;
    out->capacity = r->capacity;
    out->generation = __atomic_load_n(&r->shm->generation, __ATOMIC_RELAXED);
    out->used = used > r->capacity ? r->capacity : used;
    out->full_events = r->full_events;
    out->max_record = r->max_record;
    out->role = r->role;
}

int bti_ring_refresh_head(bt_ring *r)
{
    /* Acquire: pairs with the consumer's release of head, so its reads of the bytes it released happen
     * before our writes that reuse them. */
    uint64_t head = __atomic_load_n(&r->shm->head, __ATOMIC_ACQUIRE);
    /* The consumer is untrusted: a head beyond what we wrote, or more than a lap behind, is impossible. */
    if (head > r->pos || r->pos - head > r->capacity)
        return -EPROTO;
    r->peer = head;
    return (int)(r->capacity - (r->pos - head));
}

void bti_ring_pad_to_end(bt_ring *r)
{
    uint64_t off = r->pos & r->mask;
    uint64_t to_end = r->capacity - off;
    uint32_t *rec = (uint32_t *)(void *)(r->data + off);
    /* Same protocol as bt_ring_commit: the successor (offset 0) is zeroed, then the PAD's size word is
     * release-stored, so a consumer that follows the PAD finds 0 or a newer commit at offset 0, never a
     * record of the previous lap.  Offset 0 is free: the caller reserved to_end + stride + 8 bytes. */
    __atomic_store_n((uint32_t *)(void *)r->data, 0u, __ATOMIC_RELAXED);
    rec[1] = BT_RING_KIND_PAD;
    __atomic_store_n(&rec[0], (uint32_t)to_end, __ATOMIC_RELEASE);
    r->pos += to_end;
}

void bt_ring_publish(bt_ring *r)
{
    bt_ring_shm *shm = r->shm;
    if (r->pos == r->published)
        return; /* nothing new since the last publish, which already did the wake check */
    r->published = r->pos;
    /* Release: tail is read (acquire) for space accounting and by a consumer re-attaching; it must not run
     * ahead of the records it counts. */
    __atomic_store_n(&shm->tail, r->pos, __ATOMIC_RELEASE);
    /* seq_cst fence: our commit stores must be globally visible before we load `waiters`.  The consumer
     * does the mirror image (store waiters; fence; load the size word).  Without the fence both loads
     * could be satisfied from before the other's store and the consumer would sleep with a record in the
     * ring. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    /* Relaxed: the fence above provides the ordering.  The value says how the consumer sleeps: 2 = in its
     * event loop on our doorbell (bt_ring_arm), 1 = in FUTEX_WAIT (bt_ring_wait).  Ringing the wrong one
     * would leave it asleep until its next timeout. */
    uint32_t w = __atomic_load_n(&shm->waiters, __ATOMIC_RELAXED);
    if (w == 2 && r->doorbell >= 0)
        ring_bell(r->doorbell);
    else if (w)
        ring_wake(shm);
}

void bt_ring_set_doorbell(bt_ring *r, int efd)
{
    if (r && r->role == BT_RING_PRODUCER)
        r->doorbell = efd < 0 ? -1 : efd;
}

void bt_ring_release(bt_ring *r)
{
    if (r->pos == r->published)
        return;
    r->published = r->pos;
    /* Release: every read of the records we consumed happens before the producer, acquiring head, may
     * overwrite those bytes. */
    __atomic_store_n(&r->shm->head, r->pos, __ATOMIC_RELEASE);
}

int bt_ring_write(bt_ring *r, const void *data, uint32_t len)
{
    if (!r || r->role != BT_RING_PRODUCER || (len && !data))
        return -EINVAL;
    if (len > r->max_record)
        return -EMSGSIZE;
    void *dst = bt_ring_reserve(r, len);
    if (!dst) {
        /* Full, or the consumer published an impossible head: tell them apart for the caller. */
        int rc = bti_ring_refresh_head(r);
        return rc < 0 ? rc : -ENOSPC;
    }
    if (len)
        memcpy(dst, data, len);
    bt_ring_commit(r);
    bt_ring_publish(r);
    return 0;
}

int bt_ring_write_batch(bt_ring *r, const void *buf, const uint32_t *lens, int n)
{
    if (!r || r->role != BT_RING_PRODUCER || n < 0 || (n > 0 && (!lens || !buf)))
        return -EINVAL;
    const uint8_t *src = buf;
    int i;
    for (i = 0; i < n; i++) {
        uint32_t len = lens[i];
        if (len > r->max_record) {
            if (i == 0)
                return -EMSGSIZE;
            break;
        }
        void *dst = bt_ring_reserve(r, len);
        if (!dst) {
            if (i == 0) {
                int rc = bti_ring_refresh_head(r);
                return rc < 0 ? rc : -ENOSPC;
            }
            break;
        }
        memcpy(dst, src, len);
        bt_ring_commit(r);
        src += len;
    }
    bt_ring_publish(r);
    return i;
}

int bt_ring_read_batch(bt_ring *r, void *buf, size_t cap, uint32_t *lens, int max_n)
{
    if (!r || r->role != BT_RING_CONSUMER || max_n <= 0 || !lens || (cap && !buf))
        return -EINVAL;
    uint8_t *dst = buf;
    size_t used = 0;
    int n = 0, rc = 0;
    while (n < max_n) {
        const void *p;
        rc = bt_ring_peek(r, &p);
        if (rc < 0)
            break;
        if ((size_t)rc > cap - used) {
            rc = -ENOBUFS;
            break;
        }
        if (rc > 0) {
            memcpy(dst + used, p, (size_t)rc);
            used += (size_t)rc;
        }
        lens[n++] = (uint32_t)rc;
        bt_ring_consume(r, (uint32_t)rc);
    }
    /* Also after only skipping a PAD, so the producer gets that space back. */
    bt_ring_release(r);
    if (n > 0)
        return n; /* an error behind the records is reported by the next call, where it is still there */
    return rc;
}

/* Has the producer gone away without closing?  kill(pid, 0) says ESRCH once it is reaped; a killed child
 * of ours stays a zombie until we (or whoever is its parent) reap it, so also read its state in /proc.
 * A pid reused by an unrelated process reads as alive: the wait then ends by its timeout, not -EPIPE. */
static int ring_producer_dead(bt_ring *r)
{
    /* Relaxed: a hint, see the header. */
    int32_t pid = __atomic_load_n(&r->shm->producer_pid, __ATOMIC_RELAXED);
    if (pid <= 0)
        return 0; /* no producer attached yet, or a value we must never pass to kill() */
    if (kill(pid, 0) < 0 && errno == ESRCH)
        return 1;
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    char buf[512];
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    /* "pid (comm) S ...": comm may contain ')' so take the last one. */
    char *rp = strrchr(buf, ')');
    return rp && rp[1] == ' ' && (rp[2] == 'Z' || rp[2] == 'X');
}

/* Is a record ready (1), the ring empty (0), or corrupt (-EPROTO)?  Steps over PADs, nothing else. */
static inline int ring_ready(bt_ring *r)
{
    const void *p;
    int rc = bt_ring_peek(r, &p);
    if (rc >= 0)
        return 1;
    return rc == -EAGAIN ? 0 : rc;
}

/* Empty ring: has the producer closed, or died (probed at most once per liveness slice)? */
static int ring_gone(bt_ring *r, uint64_t now)
{
    /* Acquire: pairs with the release in bt_ring_close, so records committed before the close are visible
     * to the re-check that follows a positive answer. */
    if (__atomic_load_n(&r->shm->producer_closed, __ATOMIC_ACQUIRE))
        return 1;
    if (r->live_check_ns == UINT64_MAX)
        return 1; /* found dead before: a dead producer does not come back */
    if (now < r->live_check_ns)
        return 0;
    if (ring_producer_dead(r)) {
        r->live_check_ns = UINT64_MAX;
        return 1;
    }
    r->live_check_ns = now + RING_LIVENESS_SLICE_NS;
    return 0;
}

/* RING_SPIN_CLOCK_EVERY polls of the next record's size word: its ring_ready result, 0 if nothing came. */
static inline int ring_poll_burst(bt_ring *r)
{
    for (int i = 0; i < RING_SPIN_CLOCK_EVERY; i++) {
        bti_cpu_relax();
        int rc = ring_ready(r);
        if (rc != 0)
            return rc;
    }
    return 0;
}

int bt_ring_wait(bt_ring *r, uint64_t timeout_ns)
{
    if (!r || r->role != BT_RING_CONSUMER)
        return -EINVAL;
    int rc = ring_ready(r);
    if (rc != 0)
        return rc;
    /* Spin: the common case when the producer is busy, and the only one without syscalls on either side.
     * Only the record's size word is polled, a line the producer writes anyway.  The clock and the closed
     * flag are looked at once per RING_SPIN_CLOCK_EVERY polls, and not at all when the record arrives
     * within the first ones: a clock read costs as much as a cross-core hop, and the closed flag shares the
     * producer's line with tail, so polling it would take that line away from every publish. */
    int spin = r->spin_ns > 0 && timeout_ns > 0;
    if (spin && (rc = ring_poll_burst(r)) != 0)
        return rc;
    uint64_t start = bt_now_ns(), now = start;
    uint64_t deadline = timeout_ns > UINT64_MAX - start ? UINT64_MAX : start + timeout_ns;
    uint64_t spin_end = r->spin_ns > UINT64_MAX - start ? UINT64_MAX : start + r->spin_ns;
    if (spin_end > deadline)
        spin_end = deadline;
    /* Closed or dead ends the spin early, however long the budget; the park loop below then reports it. */
    while (spin && now < spin_end && !ring_gone(r, now)) {
        if ((rc = ring_poll_burst(r)) != 0)
            return rc;
        now = bt_now_ns();
    }
    bt_ring_shm *shm = r->shm;
    for (;;) {
        if (ring_gone(r, now)) {
            /* Re-check after seeing closed/dead: records committed before that are still delivered. */
            rc = ring_ready(r);
            return rc != 0 ? rc : -EPIPE;
        }
        if (now >= deadline)
            return -ETIMEDOUT;
        /* Acquire: the sequence must be read before we re-check the ring below; if the producer bumps it
         * after our re-check, FUTEX_WAIT sees the new value and returns at once instead of sleeping. */
        uint32_t seq = __atomic_load_n(&shm->futex_seq, __ATOMIC_ACQUIRE);
        /* Relaxed store + seq_cst fence: the mirror of bt_ring_publish (commit; fence; load waiters).  The
         * fence makes `waiters = 1` globally visible before we load the size word and the closed flag. */
        __atomic_store_n(&shm->waiters, 1u, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        rc = ring_ready(r);
        if (rc != 0 || __atomic_load_n(&shm->producer_closed, __ATOMIC_ACQUIRE)) {
            __atomic_store_n(&shm->waiters, 0u, __ATOMIC_RELAXED);
            if (rc != 0)
                return rc;
            now = bt_now_ns();
            continue; /* closed: the top of the loop drains and reports -EPIPE */
        }
        uint64_t slice = deadline - now;
        if (slice > RING_LIVENESS_SLICE_NS)
            slice = RING_LIVENESS_SLICE_NS;
        int frc = ring_futex_wait(&shm->futex_seq, seq, slice);
        /* Relaxed: only tells the producer whether to bother with FUTEX_WAKE; a stale 1 costs it one
         * syscall, and we set it again (with the fence) before every sleep. */
        __atomic_store_n(&shm->waiters, 0u, __ATOMIC_RELAXED);
        if (frc < 0 && frc != -ETIMEDOUT && frc != -EAGAIN && frc != -EINTR)
            return frc;
        rc = ring_ready(r);
        if (rc != 0)
            return rc;
        now = bt_now_ns();
    }
}

int bt_ring_arm(bt_ring *r)
{
    if (!r || r->role != BT_RING_CONSUMER)
        return -EINVAL;
    bt_ring_shm *shm = r->shm;
    /* Relaxed store + seq_cst fence, exactly as bt_ring_wait's park: publish stores the commit, fences and
     * loads `waiters`; we store `waiters`, fence and load the commit.  At least one side sees the other, so
     * either our re-check below finds the record or the producer rings the bell. */
    __atomic_store_n(&shm->waiters, 2u, __ATOMIC_RELAXED); /* 2: "ring my doorbell", see bt_ring_publish */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int rc = ring_ready(r);
    if (rc == 0 && !__atomic_load_n(&shm->producer_closed, __ATOMIC_ACQUIRE))
        return 0;
    __atomic_store_n(&shm->waiters, 0u, __ATOMIC_RELAXED);
    if (rc != 0)
        return rc;
    /* Closed: records committed before the close are visible now (acquire above); deliver them first. */
    rc = ring_ready(r);
    return rc != 0 ? rc : -EPIPE;
}

void bt_ring_disarm(bt_ring *r)
{
    if (r && r->role == BT_RING_CONSUMER)
        __atomic_store_n(&r->shm->waiters, 0u, __ATOMIC_RELAXED);
}

int bt_ring_producer_gone(bt_ring *r)
{
    if (!r || r->role != BT_RING_CONSUMER)
        return -EINVAL;
    return ring_gone(r, bt_now_ns());
}

int bt_ring_read_wait(bt_ring *r, void *buf, size_t cap, uint32_t *lens, int max_n, uint64_t timeout_ns)
{
    int rc = bt_ring_wait(r, timeout_ns);
    if (rc < 0)
        return rc;
    return bt_ring_read_batch(r, buf, cap, lens, max_n);
}

int bt_ring_exchange(bt_ring *out, const void *data, uint32_t len, bt_ring *in, const bt_ring_batch *dst)
{
    int rc = bt_ring_write(out, data, len);
    if (rc < 0)
        return rc;
    return bt_ring_read_wait(in, dst->buf, dst->cap, dst->lens, dst->max_n, dst->timeout_ns);
}
