/*
 * bench_common.h -- the helpers bench_io.c and bench_ring.c share: error exit, reaping the child, the options,
 * pinning to a CPU, the CPU model and commit for the header line, the latency row of a set of samples, and the
 * parts of the JSON report that are the same in both (the opening fields and the "latency_ns" array).  Timing
 * and the "throughput" array stay in each program: they differ (rdtsc ticks against CLOCK_MONOTONIC, extra
 * fields).
 *
 * Each program sets bench_prog to its name first thing in main; die() and reap() print it, and it is the
 * JSON "bench" field.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>

static const char *bench_prog = "bench";

static inline void die(const char *what, int rc)
{
    fprintf(stderr, "%s: %s: %s\n", bench_prog, what, strerror(rc < 0 ? -rc : rc));
    exit(1);
}

static inline void reap(pid_t pid)
{
    int st;
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        fprintf(stderr, "%s: child failed (status %d)\n", bench_prog, st);
        exit(1);
    }
}

/* Online CPUs; each program sets it in main before pinning. */
static int g_ncpu;

/* Pins the calling thread or process to CPU cpu (modulo g_ncpu); a no-op on one CPU. */
static inline void pin(int cpu)
{
    if (g_ncpu < 2)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu % g_ncpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) < 0)
        die("sched_setaffinity", errno);
}

/* A "--flag N" option: bench_args stores N in *val. */
typedef struct bench_opt {
    const char *flag;
    uint64_t *val;
} bench_opt;

/* Parses argv: the options in opts, and "--json FILE" into *json.  Anything else prints the usage line (made
 * from opts) and returns -1; 0 otherwise. */
static inline int bench_args(int argc, char **argv, const bench_opt *opts, int nopts, const char **json)
{
    for (int i = 1; i < argc; i++) {
        int k = 0;
        while (k < nopts && strcmp(argv[i], opts[k].flag) != 0)
            k++;
        if (k < nopts && i + 1 < argc)
            *opts[k].val = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--json") && i + 1 < argc)
            *json = argv[++i];
        else {
            fprintf(stderr, "usage: %s", argv[0]);
            for (k = 0; k < nopts; k++)
                fprintf(stderr, " [%s N]", opts[k].flag);
            fprintf(stderr, " [--json FILE]\n");
            return -1;
        }
    }
    return 0;
}

/* One latency row; every value in ns. */
typedef struct lat_result {
    const char *name;
    uint64_t n;
    double p50, p99, p999, mean, min;
} lat_result;

static inline int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Sorts the n samples ascending, for the percentiles, and returns their sum. */
static inline double sort_samples(uint64_t *s, uint64_t n)
{
    qsort(s, n, sizeof(*s), cmp_u64);
    double sum = 0;
    for (uint64_t i = 0; i < n; i++)
        sum += (double)s[i];
    return sum;
}

/* The latency row of n samples (sorted here), each sample times ns_per_unit giving nanoseconds. */
static inline lat_result lat_summary(const char *name, uint64_t *s, uint64_t n, double ns_per_unit)
{
    double sum = sort_samples(s, n);
    lat_result r = {name, n, s[n / 2] * ns_per_unit, s[n * 99 / 100] * ns_per_unit, s[n * 999 / 1000] * ns_per_unit,
                    sum / (double)n * ns_per_unit, s[0] * ns_per_unit};
    return r;
}

/* The CPU model from /proc/cpuinfo, "unknown" when there is none. */
static inline void machine(char *out, size_t cap)
{
    snprintf(out, cap, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f)
        return;
    char line[512];
    while (fgets(line, sizeof(line), f)) {
        if (!strncmp(line, "model name", 10)) {
            char *p = strchr(line, ':');
            if (p) {
                p++;
                while (*p == ' ')
                    p++;
                p[strcspn(p, "\n")] = 0;
                snprintf(out, cap, "%s", p);
            }
            break;
        }
    }
    fclose(f);
}

/* $BATON_COMMIT, else `git rev-parse --short HEAD`, else "unknown". */
static inline void commit_id(char *out, size_t cap)
{
    snprintf(out, cap, "unknown");
    const char *env = getenv("BATON_COMMIT");
    if (env) {
        snprintf(out, cap, "%s", env);
        return;
    }
    FILE *p = popen("git rev-parse --short HEAD 2>/dev/null", "r");
    if (!p)
        return;
    if (fgets(out, (int)cap, p))
        out[strcspn(out, "\n")] = 0;
    else
        snprintf(out, cap, "unknown");
    pclose(p);
}

/* Opens the JSON report and writes its first fields, up to and including "frame_bytes". */
static inline FILE *json_begin(const char *path, const char *cpu, int ncpu, const char *commit, int frame_bytes)
{
    FILE *f = fopen(path, "w");
    if (!f)
        die("open json", errno);
    struct utsname u;
    uname(&u);
    fprintf(f,
            "{\n  \"bench\": \"%s\",\n  \"cpu\": \"%s\",\n  \"ncpu\": %d,\n  \"kernel\": \"%s\",\n"
            "  \"commit\": \"%s\",\n  \"frame_bytes\": %d,\n",
            bench_prog, cpu, ncpu, u.release, commit, frame_bytes);
    return f;
}

/* The "latency_ns" array, with the comma that follows it. */
static inline void json_latency(FILE *f, const lat_result *lat, int n)
{
    fprintf(f, "  \"latency_ns\": [\n");
    for (int i = 0; i < n; i++)
        fprintf(f,
                "    {\"name\": \"%s\", \"n\": %llu, \"p50\": %.1f, \"p99\": %.1f, \"p99_9\": %.1f, "
                "\"mean\": %.1f, \"min\": %.1f}%s\n",
                lat[i].name, (unsigned long long)lat[i].n, lat[i].p50, lat[i].p99, lat[i].p999, lat[i].mean,
                lat[i].min, i + 1 < n ? "," : "");
    fprintf(f, "  ],\n");
}

#endif
