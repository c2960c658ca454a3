/*
 * bench_ring -- the shared-memory ring between two processes, each pinned to its own CPU, against a unix
 * socketpair in the same run.
 *
 *   ring round trip, both spinning      64-byte records, A writes, B reads and writes back, A reads
 *   ring round trip, both parked        the same with spin 0: every hop is a FUTEX_WAKE / FUTEX_WAIT
 *   socketpair round trip               AF_UNIX SOCK_STREAM, 64 bytes each way, blocking read/write
 *   ring one-way throughput             64-byte records: publish per record; reserve/commit x64 or x256
 *                                       then one publish; and write_batch/read_batch (copying API) x64
 *
 * Latencies are per round trip (rdtsc, calibrated against CLOCK_MONOTONIC), reported as p50/p99/p99.9.
 *
 *   build/c/bench/bench_ring [--rt N] [--park-rt N] [--tput N] [--json FILE]
 */
#include "baton.h"
#include "bench_common.h"

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#endif

#define MSG 64
#define SPIN_FOREVER (3600ull * 1000000000ull)
#define WAIT_NS (30ull * 1000000000ull)

static void relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* ---- clock: rdtsc where there is one, calibrated once; CLOCK_MONOTONIC otherwise ---- */
static double g_ns_per_tick = 1.0;

static inline uint64_t ticks(void)
{
#if defined(__x86_64__) || defined(__i386__)
    return __rdtsc();
#else
    return bt_now_ns();
#endif
}

static void calibrate(void)
{
#if defined(__x86_64__) || defined(__i386__)
    uint64_t n0 = bt_now_ns(), t0 = ticks();
    while (bt_now_ns() - n0 < 100000000ull)
        ;
    uint64_t n1 = bt_now_ns(), t1 = ticks();
    g_ns_per_tick = (double)(n1 - n0) / (double)(t1 - t0);
#endif
}

/* ---- results ---- */
typedef struct tput {
    const char *name;
    uint64_t n;
    double mfps; /* million frames per second */
    double ns_per_frame;
} tput;

static lat_result g_lat[8];
static int g_nlat;
static tput g_tput[8];
static int g_ntput;

static void add_lat(const char *name, uint64_t *s, uint64_t n)
{
    lat_result *l = &g_lat[g_nlat++];
    *l = lat_summary(name, s, n, g_ns_per_tick);
    printf("  %-34s n=%-8llu p50 %8.0f ns  p99 %8.0f ns  p99.9 %8.0f ns  mean %8.0f  min %6.0f\n", name,
           (unsigned long long)n, l->p50, l->p99, l->p999, l->mean, l->min);
    fflush(stdout);
}

static void add_tput(const char *name, uint64_t n, uint64_t ns)
{
    tput *t = &g_tput[g_ntput++];
    t->name = name;
    t->n = n;
    t->mfps = (double)n / ((double)ns / 1e9) / 1e6;
    t->ns_per_frame = (double)ns / (double)n;
    printf("  %-34s n=%-9llu %7.1f M frames/s  %6.2f ns/frame  %6.2f GB/s payload\n", name,
           (unsigned long long)n, t->mfps, t->ns_per_frame, t->mfps * MSG / 1e3);
    fflush(stdout);
}

/* Wait (bounded) for a record on r: 1 when there is one, 0 when the peer has closed; any other error dies. */
static int wait_record(bt_ring *r, const char *what)
{
    int rc = bt_ring_wait(r, WAIT_NS);
    if (rc == -EPIPE)
        return 0;
    if (rc < 0)
        die(what, rc);
    return 1;
}

/* ---- two processes ---- */
static pid_t spawn(void (*fn)(void *), void *arg)
{
    pid_t parent = getpid();
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        die("fork", errno);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(3);
        pin(1);
        fn(arg);
        _exit(0);
    }
    return pid;
}

/* ---- ring round trip ---- */
typedef struct rt_arg {
    int fd_ab, fd_ba;
    uint64_t spin;
} rt_arg;

static void rt_echo(void *p)
{
    rt_arg *a = p;
    bt_ring *in, *out;
    int rc;
    if ((rc = bt_ring_attach(a->fd_ab, BT_RING_CONSUMER, &in)) < 0)
        die("attach", rc);
    if ((rc = bt_ring_attach(a->fd_ba, BT_RING_PRODUCER, &out)) < 0)
        die("attach", rc);
    bt_ring_set_spin(in, a->spin);
    uint8_t buf[MSG];
    while (wait_record(in, "echo wait")) {
        const void *d;
        int n = bt_ring_peek(in, &d);
        if (n < 0 || n > MSG)
            die("echo peek", n < 0 ? n : EMSGSIZE);
        memcpy(buf, d, (size_t)n);
        bt_ring_consume(in, (uint32_t)n);
        bt_ring_release(in);
        if ((rc = bt_ring_write(out, buf, (uint32_t)n)) < 0)
            die("echo write", rc);
    }
    bt_ring_close(out);
    bt_ring_close(in);
}

/*
 * The round-trip loop both transports share: stamp each message with its index, time one hop there and
 * back, check the echo, keep the samples after the warm-up.  always_inline: each caller gets its own copy
 * with its hop known at compile time, so no indirect call lands inside the timed region.
 */
typedef void (*rt_hop)(void *ctx, const uint8_t *msg, uint8_t *in);

static inline __attribute__((always_inline)) void measure_rt(const char *name, uint64_t n, uint64_t warm,
                                                              rt_hop hop, void *ctx)
{
    uint64_t *s = malloc(n * sizeof(*s));
    uint8_t msg[MSG], in[MSG];
    memset(msg, 0x5A, sizeof(msg));
    for (uint64_t i = 0; i < warm + n; i++) {
        memcpy(msg, &i, sizeof(i));
        uint64_t t0 = ticks();
        hop(ctx, msg, in);
        uint64_t t1 = ticks();
        if (memcmp(in, msg, MSG) != 0)
            die("echo mismatch", EBADMSG);
        if (i >= warm)
            s[i - warm] = t1 - t0;
    }
    add_lat(name, s, n);
    free(s);
}

typedef struct ring_pair {
    bt_ring *ab, *ba;
} ring_pair;

static void ring_hop(void *ctx, const uint8_t *msg, uint8_t *in)
{
    ring_pair *p = ctx;
    int rc;
    if ((rc = bt_ring_write(p->ab, msg, MSG)) < 0)
        die("write", rc);
    if ((rc = bt_ring_wait(p->ba, WAIT_NS)) < 0)
        die("wait", rc);
    const void *d;
    int len = bt_ring_peek(p->ba, &d);
    if (len != MSG)
        die("peek", len < 0 ? len : EMSGSIZE);
    memcpy(in, d, MSG);
    bt_ring_consume(p->ba, (uint32_t)len);
    bt_ring_release(p->ba);
}

static void bench_ring_rt(const char *name, uint64_t n, uint64_t warm, uint64_t spin)
{
    ring_pair p;
    int rc;
    if ((rc = bt_ring_create(1u << 16, BT_RING_PRODUCER, 1, &p.ab)) < 0)
        die("create", rc);
    if ((rc = bt_ring_create(1u << 16, BT_RING_CONSUMER, 2, &p.ba)) < 0)
        die("create", rc);
    bt_ring_set_spin(p.ba, spin);
    rt_arg arg = {bt_ring_fd(p.ab), bt_ring_fd(p.ba), spin};
    pid_t pid = spawn(rt_echo, &arg);
    measure_rt(name, n, warm, ring_hop, &p);
    bt_ring_close(p.ab);
    reap(pid);
    bt_ring_close(p.ba);
}

/* ---- socketpair round trip ---- */
static int full_io(int fd, void *buf, size_t len, int wr)
{
    size_t done = 0;
    while (done < len) {
        ssize_t k = wr ? write(fd, (char *)buf + done, len - done) : read(fd, (char *)buf + done, len - done);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return k == 0 ? -EPIPE : -errno;
        done += (size_t)k;
    }
    return 0;
}

static void sp_echo(void *p)
{
    int *sv = p;
    close(sv[0]); /* else the parent's close would never reach us as end of stream */
    int fd = sv[1];
    uint8_t buf[MSG];
    while (full_io(fd, buf, MSG, 0) == 0)
        if (full_io(fd, buf, MSG, 1) < 0)
            break;
}

static void socketpair_hop(void *ctx, const uint8_t *msg, uint8_t *in)
{
    int fd = *(int *)ctx;
    if (full_io(fd, (void *)msg, MSG, 1) < 0 || full_io(fd, in, MSG, 0) < 0)
        die("socketpair io", errno);
}

static void bench_socketpair_rt(uint64_t n, uint64_t warm)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        die("socketpair", errno);
    pid_t pid = spawn(sp_echo, sv);
    close(sv[1]);
    measure_rt("socketpair round trip", n, warm, socketpair_hop, &sv[0]);
    close(sv[0]);
    reap(pid);
}

/* ---- one-way throughput ---- */
enum { TP_UNBATCHED, TP_BATCH_INLINE, TP_BATCH_API };

typedef struct tp_arg {
    int fd;
    int mode;
    int batch;
    uint64_t n;
} tp_arg;

static void tp_producer(void *p)
{
    tp_arg *a = p;
    bt_ring *r;
    int rc;
    if ((rc = bt_ring_attach(a->fd, BT_RING_PRODUCER, &r)) < 0)
        die("attach", rc);
    uint8_t msg[MSG * 256];
    uint32_t lens[256];
    for (int i = 0; i < 256; i++)
        lens[i] = MSG;
    memset(msg, 0x33, sizeof(msg));
    uint64_t i = 0;
    if (a->mode == TP_UNBATCHED) {
        for (; i < a->n; i++) {
            memcpy(msg, &i, sizeof(i));
            while (bt_ring_write(r, msg, MSG) == -ENOSPC)
                relax();
        }
    } else if (a->mode == TP_BATCH_INLINE) {
        while (i < a->n) {
            for (int j = 0; j < a->batch && i < a->n; j++, i++) {
                void *d;
                while (!(d = bt_ring_reserve(r, MSG))) {
                    bt_ring_publish(r);
                    relax();
                }
                memcpy(d, msg, MSG);
                memcpy(d, &i, sizeof(i));
                bt_ring_commit(r);
            }
            bt_ring_publish(r);
        }
    } else {
        while (i < a->n) {
            int want = a->n - i < (uint64_t)a->batch ? (int)(a->n - i) : a->batch;
            memcpy(msg, &i, sizeof(i));
            rc = bt_ring_write_batch(r, msg, lens, want);
            if (rc == -ENOSPC) {
                relax();
                continue;
            }
            if (rc < 0)
                die("write_batch", rc);
            i += (uint64_t)rc;
        }
    }
    bt_ring_close(r);
}

static void bench_tput(const char *name, int mode, int batch, uint64_t n)
{
    bt_ring *c;
    int rc;
    if ((rc = bt_ring_create(1u << 18, BT_RING_CONSUMER, 3, &c)) < 0)
        die("create", rc);
    bt_ring_set_spin(c, SPIN_FOREVER);
    tp_arg arg = {bt_ring_fd(c), mode, batch, n};
    pid_t pid = spawn(tp_producer, &arg);
    static uint8_t buf[MSG * 256];
    uint32_t lens[256];
    uint64_t got = 0, sum = 0, t0 = 0;
    int rb = batch > 0 ? batch : 64;
    while (wait_record(c, "consumer wait")) {
        if (!t0)
            t0 = bt_now_ns();
        if (mode == TP_BATCH_API) {
            rc = bt_ring_read_batch(c, buf, sizeof(buf), lens, rb);
            if (rc < 0)
                die("read_batch", rc);
            for (int j = 0; j < rc; j++) {
                uint64_t v;
                memcpy(&v, buf + (size_t)j * MSG, sizeof(v));
                sum += v;
            }
            got += (uint64_t)rc;
        } else {
            const void *d;
            int k = 0, len;
            while (k < rb && (len = bt_ring_peek(c, &d)) >= 0) {
                uint64_t v;
                memcpy(&v, d, sizeof(v)); /* read the payload, as a real consumer would */
                sum += v;
                bt_ring_consume(c, (uint32_t)len);
                k++;
            }
            bt_ring_release(c);
            got += (uint64_t)k;
        }
    }
    uint64_t t1 = bt_now_ns();
    reap(pid);
    bt_ring_close(c);
    /* Every record arrived; where each carries its index (all but the copying-API mode, which stamps only
     * the first of each batch), the indices add up too. */
    if (got != n || (mode != TP_BATCH_API && sum != (n - 1) * n / 2)) {
        fprintf(stderr, "bench_ring: %s: got %llu of %llu (sum %llu)\n", name, (unsigned long long)got,
                (unsigned long long)n, (unsigned long long)sum);
        exit(1);
    }
    add_tput(name, n, t1 - t0);
}

/* ---- report ---- */
static void write_json(const char *path, const char *cpu, const char *commit)
{
    FILE *f = json_begin(path, cpu, g_ncpu, commit, MSG);
    json_latency(f, g_lat, g_nlat);
    fprintf(f, "  \"throughput\": [\n");
    for (int i = 0; i < g_ntput; i++)
        fprintf(f, "    {\"name\": \"%s\", \"n\": %llu, \"mframes_per_s\": %.2f, \"ns_per_frame\": %.3f}%s\n",
                g_tput[i].name, (unsigned long long)g_tput[i].n, g_tput[i].mfps, g_tput[i].ns_per_frame,
                i + 1 < g_ntput ? "," : "");
    fprintf(f, "  ]\n}\n");
    fclose(f);
}

int main(int argc, char **argv)
{
    uint64_t rt = 1000000, park_rt = 100000, tp = 20000000;
    const char *json = NULL;
    bench_prog = "bench_ring";
    const bench_opt opts[] = {{"--rt", &rt}, {"--park-rt", &park_rt}, {"--tput", &tp}};
    if (bench_args(argc, argv, opts, 3, &json) < 0)
        return 2;
    g_ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
    pin(0);
    calibrate();
    char cpu[128], commit[64];
    machine(cpu, sizeof(cpu));
    commit_id(commit, sizeof(commit));
    struct utsname u;
    uname(&u);
    printf("bench_ring: %s, %d CPUs, kernel %s, commit %s, %d-byte records, %.3f ns/tick\n", cpu, g_ncpu,
           u.release, commit, MSG, g_ns_per_tick);
    printf("round trips (A -> B -> A, each process on its own CPU):\n");
    bench_ring_rt("ring round trip, spinning", rt, rt / 10, SPIN_FOREVER);
    bench_ring_rt("ring round trip, parked (spin 0)", park_rt, park_rt / 10, 0);
    bench_socketpair_rt(park_rt, park_rt / 10);
    printf("one-way throughput (consumer spinning):\n");
    bench_tput("ring one-way, publish per record", TP_UNBATCHED, 0, tp / 2);
    bench_tput("ring one-way, batch 64 (inline)", TP_BATCH_INLINE, 64, tp);
    bench_tput("ring one-way, batch 256 (inline)", TP_BATCH_INLINE, 256, tp);
    bench_tput("ring one-way, write/read_batch 64", TP_BATCH_API, 64, tp);
    if (json)
        write_json(json, cpu, commit);
    return 0;
}
