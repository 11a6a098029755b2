/*
 * bench_common.h: what bench/'s C clients share: clocks, the server address,
 * the open-file limit (included, not linked: each client stays one
 * `cc -O2 -o NAME NAME.c`).
 */
#ifndef WIREHUB_BENCH_COMMON_H
#define WIREHUB_BENCH_COMMON_H

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <time.h>

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* CPU seconds process `pid` has run so far, all threads (scheduler run time
 * from /proc/PID/task/TID/schedstat, as tools/loadgen/server_cpu.py reads it);
 * -1 when it cannot be read. */
static double process_cpu_s(int pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *dir = opendir(path);
    if (!dir) return -1;
    long long total_ns = 0;
    for (struct dirent *d; (d = readdir(dir));) {
        if (d->d_name[0] == '.') continue;
        char file[320];
        snprintf(file, sizeof file, "/proc/%d/task/%s/schedstat", pid, d->d_name);
        FILE *f = fopen(file, "r");
        long long ns;
        if (f && fscanf(f, "%lld", &ns) == 1) total_ns += ns;
        if (f) fclose(f);
    }
    closedir(dir);
    return total_ns / 1e9;
}

static double own_cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* --host and --port as an IPv4 address; 0, or -1 after saying why. */
static int server_address(const char *host, int port, struct sockaddr_in *addr) {
    *addr = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr->sin_addr) != 1) {
        fprintf(stderr, "--host: not an IPv4 address: %s\n", host);
        return -1;
    }
    return 0;
}

/* Raise the open-file limit to its maximum; 0 if `need` descriptors fit, or
 * -1 after saying so. */
static int open_files(long need) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && (rlim_t)need > rl.rlim_cur) {
        fprintf(stderr, "needs %ld open files, the limit is %ld (ulimit -n)\n", need, (long)rl.rlim_cur);
        return -1;
    }
    return 0;
}

#endif
