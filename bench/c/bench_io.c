/*
 * bench_io -- the socket-plane I/O engine, epoll against io_uring in the same run, over a unix socketpair
 * between two processes (each pinned to its own CPU when there are two).
 *
 *   echo round trip          64-byte frame: A bt_io_send -> B READABLE, read, bt_io_send back -> A READABLE,
 *                            read.  Both sides block in bt_io_wait(-1).  Baseline: blocking read/write.
 *   one-way throughput       64-byte frames from A: N sends queued then one bt_io_wait collecting their SENT
 *                            events (N = 64, and N = 1 for the unbatched cost); B reads in 64 KiB chunks.
 *                            Baseline: one write() per frame.  Also the sender's CPU time per frame,
 *                            which is what batching saves (the sink's wakeups bound the wall-clock rate);
 *                            and 64 frames coalesced into one 4 KiB send, for comparison.
 *
 * Latencies are wall-clock per round trip (CLOCK_MONOTONIC), reported as p50/p99/p99.9.
 *
 *   build/c/bench/bench_io [--rt N] [--tput N] [--json FILE]
 */
#include "baton.h"
#include "bench_common.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <signal.h>
#include <unistd.h>

#define MSG 64
#define BATCH_MAX 64

typedef struct tput_result {
    const char *name;
    uint64_t n;
    double mfps, ns_per_frame, cpu_ns_per_frame; /* cpu: the sender's user+system time */
} tput_result;

static lat_result g_lat[8];
static int g_nlat;
static tput_result g_tput[12];
static int g_ntput;

static void report_lat(const char *name, uint64_t *s, uint64_t n)
{
    lat_result r = lat_summary(name, s, n, 1.0);
    g_lat[g_nlat++] = r;
    printf("  %-34s n=%-8llu p50 %8.2f us  p99 %8.2f us  p99.9 %8.2f us  mean %8.2f us\n", name,
           (unsigned long long)n, r.p50 / 1e3, r.p99 / 1e3, r.p999 / 1e3, r.mean / 1e3);
}

/* This process's CPU time (user + system), ns: what the sender pays, apart from the sink's wakeups. */
static uint64_t cpu_ns(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ((uint64_t)ru.ru_utime.tv_sec + (uint64_t)ru.ru_stime.tv_sec) * 1000000000u +
           ((uint64_t)ru.ru_utime.tv_usec + (uint64_t)ru.ru_stime.tv_usec) * 1000u;
}

static void report_tput(const char *name, uint64_t frames, uint64_t ns, uint64_t cpu)
{
    tput_result r = {name, frames, (double)frames * 1e3 / (double)ns, (double)ns / (double)frames,
                     (double)cpu / (double)frames};
    g_tput[g_ntput++] = r;
    printf("  %-34s n=%-9llu %8.3f M frames/s  %8.1f ns/frame  sender cpu %7.1f ns/frame\n", name,
           (unsigned long long)frames, r.mfps, r.ns_per_frame, r.cpu_ns_per_frame);
}

static void socketpair_or_die(int sv[2], int nonblock)
{
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0, sv) < 0)
        die("socketpair", errno);
}

static pid_t fork_child(void)
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        die("fork", errno);
    if (pid == 0)
        prctl(PR_SET_PDEATHSIG, SIGKILL);
    return pid;
}

/* bt_io_wait, retried on -EINTR (epoll_wait reports io_uring task work left by an earlier ring that way). */
static int io_wait(bt_io *io, bt_io_event *evs, int max)
{
    int n;
    while ((n = bt_io_wait(io, evs, max, -1)) == -EINTR)
        ;
    return n;
}

static bt_io *open_engine(int backend)
{
    bt_io *io;
    int rc = bt_io_open(backend, 256, &io);
    if (rc < 0)
        die("bt_io_open", rc);
    return io;
}

/* Read whatever is there (non-blocking fd); returns bytes, 0 at EOF, -1 when nothing. */
static ssize_t read_some(int fd, char *buf, size_t cap)
{
    ssize_t n = read(fd, buf, cap);
    if (n < 0 && errno == EAGAIN)
        return -1;
    if (n < 0)
        die("read", errno);
    return n;
}

/* Echo side: every byte received goes back through the engine, until EOF. */
static void echo_child(int backend, int fd)
{
    pin(1);
    bt_io *io = open_engine(backend);
    int rc = bt_io_watch(io, fd, 1);
    if (rc < 0)
        die("watch", rc);
    static char bufs[BATCH_MAX][4096];
    unsigned slot = 0;
    for (;;) {
        bt_io_event evs[16];
        int n = io_wait(io, evs, 16);
        if (n < 0)
            die("wait (echo)", n);
        for (int i = 0; i < n; i++) {
            if (evs[i].kind == BT_IO_EV_SENT) {
                if (evs[i].result <= 0)
                    die("echo send", evs[i].result);
                continue;
            }
            for (;;) { /* arrival-triggered: read until EAGAIN */
                char *b = bufs[slot++ % BATCH_MAX];
                ssize_t got = read_some(fd, b, sizeof(bufs[0]));
                if (got < 0)
                    break;
                if (got == 0) {
                    bt_io_close(io);
                    _exit(0);
                }
                if ((rc = bt_io_send(io, fd, b, (uint32_t)got, 2)) < 0)
                    die("send (echo)", rc);
            }
        }
    }
}

static void bench_engine_rt(const char *name, int backend, uint64_t n, uint64_t warm)
{
    int sv[2];
    socketpair_or_die(sv, 1);
    pid_t pid = fork_child();
    if (pid == 0) {
        close(sv[0]);
        echo_child(backend, sv[1]);
    }
    close(sv[1]);
    bt_io *io = open_engine(backend);
    int rc = bt_io_watch(io, sv[0], 1);
    if (rc < 0)
        die("watch", rc);
    uint64_t *s = malloc(n * sizeof(*s));
    if (!s)
        die("malloc", ENOMEM);
    static char msg[MSG], in[4096];
    memset(msg, 'x', sizeof(msg));
    for (uint64_t i = 0; i < warm + n; i++) {
        uint64_t t0 = bt_now_ns();
        if ((rc = bt_io_send(io, sv[0], msg, MSG, 2)) < 0)
            die("send", rc);
        size_t got = 0;
        int sent = 0;
        while (got < MSG || !sent) {
            bt_io_event evs[8];
            int k = io_wait(io, evs, 8);
            if (k < 0)
                die("wait", k);
            for (int j = 0; j < k; j++) {
                if (evs[j].kind == BT_IO_EV_SENT) {
                    if (evs[j].result != MSG)
                        die("send result", evs[j].result);
                    sent = 1;
                    continue;
                }
                ssize_t r;
                while ((r = read_some(sv[0], in, sizeof(in))) > 0)
                    got += (size_t)r;
                if (r == 0)
                    die("echo closed", EPIPE);
            }
        }
        if (i >= warm)
            s[i - warm] = bt_now_ns() - t0;
    }
    bt_io_close(io);
    close(sv[0]);
    reap(pid);
    report_lat(name, s, n);
    free(s);
}

static void bench_plain_rt(uint64_t n, uint64_t warm)
{
    int sv[2];
    socketpair_or_die(sv, 0);
    pid_t pid = fork_child();
    char b[MSG];
    if (pid == 0) {
        pin(1);
        close(sv[0]);
        for (;;) {
            ssize_t r = read(sv[1], b, sizeof(b));
            if (r <= 0)
                _exit(r == 0 ? 0 : 1);
            if (write(sv[1], b, (size_t)r) != r)
                _exit(1);
        }
    }
    close(sv[1]);
    uint64_t *s = malloc(n * sizeof(*s));
    if (!s)
        die("malloc", ENOMEM);
    memset(b, 'x', sizeof(b));
    for (uint64_t i = 0; i < warm + n; i++) {
        uint64_t t0 = bt_now_ns();
        if (write(sv[0], b, MSG) != MSG)
            die("write", errno);
        size_t got = 0;
        while (got < MSG) {
            ssize_t r = read(sv[0], b, MSG - got);
            if (r <= 0)
                die("read", errno);
            got += (size_t)r;
        }
        if (i >= warm)
            s[i - warm] = bt_now_ns() - t0;
    }
    close(sv[0]);
    reap(pid);
    report_lat("socketpair read/write (baseline)", s, n);
    free(s);
}

/* Sink: read until EOF, then report the byte count through the pipe. */
static void sink_child(int fd, int report)
{
    pin(1);
    static char buf[65536];
    uint64_t total = 0;
    for (;;) {
        ssize_t r = read(fd, buf, sizeof(buf));
        if (r == 0)
            break;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            _exit(1);
        }
        total += (uint64_t)r;
    }
    if (write(report, &total, sizeof(total)) != (ssize_t)sizeof(total))
        _exit(1);
    _exit(0);
}

/* A socketpair (sv[0] non-blocking when asked, with a 4 MiB send buffer) whose sv[1] a forked sink_child
 * reads; returns its pid, the parent keeping sv[0] and the report pipe's read end *report. */
static pid_t start_sink(int sv[2], int nonblock, int *report)
{
    int rp[2];
    socketpair_or_die(sv, nonblock);
    if (pipe(rp) < 0)
        die("pipe", errno);
    int big = 4 << 20;
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
    pid_t pid = fork_child();
    if (pid == 0) {
        close(sv[0]);
        close(rp[0]);
        /* The sink blocks in read(): clear O_NONBLOCK on its end. */
        if (nonblock && fcntl(sv[1], F_SETFL, 0) < 0)
            _exit(1);
        sink_child(sv[1], rp[1]);
    }
    close(sv[1]);
    close(rp[1]);
    *report = rp[0];
    return pid;
}

/* Close the sending end, wait for the sink's byte count and the sink itself; the count must be `sent`. */
static void finish_sink(int fd, int report, pid_t pid, uint64_t sent)
{
    close(fd);
    uint64_t total = 0;
    if (read(report, &total, sizeof(total)) != (ssize_t)sizeof(total))
        die("sink report", EIO);
    close(report);
    reap(pid);
    if (total != sent)
        die("sink byte count", EIO);
}

/*
 * frames x 64 bytes, batch sends queued per bt_io_wait.  A short or -EAGAIN result (socket full) is sent
 * again from where it stopped; the sink only counts bytes.
 */
static void bench_engine_tput(const char *name, int backend, int batch, int per_send, uint64_t frames)
{
    int sv[2], report;
    pid_t pid = start_sink(sv, 1, &report);
    bt_io *io = open_engine(backend);
    static char frame[BATCH_MAX][MSG * BATCH_MAX];
    uint32_t off[BATCH_MAX];
    const uint32_t len = (uint32_t)(MSG * per_send);
    memset(frame, 'y', sizeof(frame));
    uint64_t sent_bytes = 0, want = frames * MSG;
    uint64_t c0 = cpu_ns();
    uint64_t t0 = bt_now_ns();
    while (sent_bytes < want) {
        int q = 0;
        for (; q < batch && sent_bytes + (uint64_t)q * len < want; q++) {
            off[q] = 0;
            int rc = bt_io_send(io, sv[0], frame[q], len, (uint64_t)q);
            if (rc < 0)
                die("send", rc);
        }
        int done = 0;
        while (done < q) {
            bt_io_event evs[BATCH_MAX];
            int k = io_wait(io, evs, BATCH_MAX);
            if (k < 0)
                die("wait", k);
            for (int j = 0; j < k; j++) {
                int t = (int)evs[j].tag, r = evs[j].result;
                if (r < 0 && r != -EAGAIN)
                    die("send result", r);
                if (r > 0) {
                    off[t] += (uint32_t)r;
                    sent_bytes += (uint64_t)r;
                }
                if (off[t] < len) { /* full socket: send the rest again */
                    int rc = bt_io_send(io, sv[0], frame[t] + off[t], len - off[t], (uint64_t)t);
                    if (rc < 0)
                        die("resend", rc);
                } else {
                    done++;
                }
            }
        }
    }
    uint64_t ns = bt_now_ns() - t0;
    uint64_t cpu = cpu_ns() - c0;
    bt_io_close(io);
    finish_sink(sv[0], report, pid, sent_bytes);
    report_tput(name, frames, ns, cpu);
}

static void bench_plain_tput(uint64_t frames)
{
    int sv[2], report;
    pid_t pid = start_sink(sv, 0, &report);
    static char frame[MSG];
    memset(frame, 'z', sizeof(frame));
    uint64_t c0 = cpu_ns();
    uint64_t t0 = bt_now_ns();
    for (uint64_t i = 0; i < frames; i++)
        if (write(sv[0], frame, MSG) != MSG)
            die("write", errno);
    uint64_t ns = bt_now_ns() - t0;
    uint64_t cpu = cpu_ns() - c0;
    finish_sink(sv[0], report, pid, frames * MSG);
    report_tput("write() per frame (baseline)", frames, ns, cpu);
}

static void write_json(const char *path, const char *cpu, const char *commit, int have_uring)
{
    FILE *f = json_begin(path, cpu, g_ncpu, commit, MSG);
    fprintf(f, "  \"io_uring\": %s,\n", have_uring ? "true" : "false");
    json_latency(f, g_lat, g_nlat);
    fprintf(f, "  \"throughput\": [\n");
    for (int i = 0; i < g_ntput; i++)
        fprintf(f,
                "    {\"name\": \"%s\", \"n\": %llu, \"mframes_per_s\": %.3f, \"ns_per_frame\": %.1f, "
                "\"sender_cpu_ns_per_frame\": %.1f}%s\n",
                g_tput[i].name, (unsigned long long)g_tput[i].n, g_tput[i].mfps, g_tput[i].ns_per_frame,
                g_tput[i].cpu_ns_per_frame, i + 1 < g_ntput ? "," : "");
    fprintf(f, "  ]\n}\n");
    fclose(f);
}

int main(int argc, char **argv)
{
    uint64_t rt = 50000, tp = 2000000;
    const char *json = NULL;
    bench_prog = "bench_io";
    const bench_opt opts[] = {{"--rt", &rt}, {"--tput", &tp}};
    if (bench_args(argc, argv, opts, 2, &json) < 0)
        return 2;
    if (rt < 10 || tp < 64) {
        fprintf(stderr, "bench_io: --rt >= 10 and --tput >= 64\n");
        return 2;
    }
    tp -= tp % BATCH_MAX; /* whole coalesced sends */
    g_ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
    pin(0);
    char cpu[128], commit[64];
    machine(cpu, sizeof(cpu));
    commit_id(commit, sizeof(commit));
    struct utsname u;
    uname(&u);
    bt_io *probe;
    int have_uring = bt_io_open(BT_IO_URING, 8, &probe) == 0;
    if (have_uring)
        bt_io_close(probe);
    printf("bench_io: %s, %d CPUs, kernel %s, commit %s, %d-byte frames, io_uring %s\n", cpu, g_ncpu, u.release,
           commit, MSG, have_uring ? "available" : "unavailable");
    printf("echo round trips (A -> B -> A through the engine, each process on its own CPU):\n");
    bench_engine_rt("engine round trip, epoll", BT_IO_EPOLL, rt, rt / 10);
    if (have_uring)
        bench_engine_rt("engine round trip, io_uring", BT_IO_URING, rt, rt / 10);
    bench_plain_rt(rt, rt / 10);
    printf("one-way throughput (sink reads 64 KiB chunks):\n");
    bench_engine_tput("epoll, 64 sends per wait", BT_IO_EPOLL, 64, 1, tp);
    if (have_uring)
        bench_engine_tput("io_uring, 64 sends per wait", BT_IO_URING, 64, 1, tp);
    bench_engine_tput("epoll, 1 send per wait", BT_IO_EPOLL, 1, 1, tp / 4);
    if (have_uring)
        bench_engine_tput("io_uring, 1 send per wait", BT_IO_URING, 1, 1, tp / 4);
    bench_engine_tput("epoll, 64 frames in 1 send", BT_IO_EPOLL, 1, 64, tp);
    if (have_uring)
        bench_engine_tput("io_uring, 64 frames in 1 send", BT_IO_URING, 1, 64, tp);
    bench_plain_tput(tp);
    if (json)
        write_json(json, cpu, commit, have_uring);
    return 0;
}
