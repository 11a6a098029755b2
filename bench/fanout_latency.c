/*
 * fanout_latency.c: an independent fan-out latency client for wirehub.
 *
 * Why: the publish-to-receive p99 in docs/benchmarks.md and issue #21 comes
 * from the bundled loadgen, a Python client on uvloop that reads 1,000
 * sockets at a million messages a second on one core; its own delays are in
 * what it reports. This client is one file of C (libc only: epoll, a timerfd,
 * plain sockets), so what it adds to a latency is a few microseconds.
 *
 * What it does: opens --subscribers WebSocket connections to
 * 127.0.0.1:--port --path and one publisher connection (blocking sockets
 * while setting up), subscribes each subscriber to --channel and waits for
 * every `subscribed`; then the publisher sends --rate publications per
 * second for --warmup + --duration seconds on a fixed schedule (a timerfd),
 * each a JSON string "<intended send time, ns>:<sequence>:<filler>" of
 * --size bytes, and every subscriber's `message`s are read as they come.
 *
 * Latency is from a publication's *intended* send time (so a late send is
 * the client's lateness, counted, not hidden: no coordinated omission) to
 * the read() that returned it, for the publications whose intended time is
 * in the measured window (after --warmup), in a 1 µs histogram. After the
 * last publication it waits up to --drain seconds for the rest.
 *
 * Checked per subscriber: sequences arrive in order, none missing, none
 * twice. `missing`, `duplicates`, `out_of_order` and anything the server
 * closed are reported; a run with any is exit status 1.
 *
 * --server-pid PID (repeatable): the CPU each process used over the
 * measured window (scheduler run time from /proc/PID/task/TID/schedstat,
 * as tools/loadgen/server_cpu.py reads it).
 *
 * Output: one JSON object on stdout. Exit status 0 when every publication
 * reached every subscriber once and in order, 1 otherwise, 2 on bad usage
 * or a local error (no server, a refused upgrade, a publisher that blocks).
 *
 *   cc -O2 -o fanout_latency bench/fanout_latency.c
 *   ./fanout_latency --port 8080 --subscribers 1000 --rate 1000 --duration 5
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "bench_common.h"

#define KEY "dGhlIHNhbXBsZSBub25jZQ=="
#define READ_BUF (256 * 1024)   /* per connection: more than the server queues for one read */
#define HIST_US 1000000         /* 1 µs buckets up to 1 s; later ones are counted as "over" */
#define MAX_PIDS 8
#define MAX_SIZE 60000

struct conn {
    int fd;
    int subscribed;
    uint64_t next_seq;   /* the sequence this subscriber expects next */
    long received;
    size_t got;          /* unparsed bytes in buf */
    unsigned char *buf;
};

static uint32_t hist[HIST_US];
static long over_hist, samples;
static int64_t max_latency_ns;
static long missing, duplicates, out_of_order, server_closes, other_frames;

static void usage(FILE *out, const char *prog) {
    fprintf(out,
            "usage: %s --port PORT [--path /ws] [--subscribers 1000] [--rate 1000]\n"
            "          [--duration 5] [--warmup 1] [--drain 5] [--size 64] [--channel bench]\n"
            "          [--host 127.0.0.1] [--server-pid PID]...\n"
            "Publishes --rate messages/s to --subscribers WebSocket subscribers of one\n"
            "wirehub channel and prints a JSON result with the publish-to-receive latency\n"
            "(see the comment at the top of fanout_latency.c).\n", prog);
}

static void fail(const char *what) {
    fprintf(stderr, "%s: %s\n", what, errno ? strerror(errno) : "failed");
    exit(2);
}

/* Write all of `len` bytes on a socket (setup, and a publisher that must not block). */
static void write_all(int fd, const void *data, size_t len, const char *what) {
    const char *p = data;
    while (len) {
        ssize_t w = write(fd, p, len);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) fail(what);
        p += w, len -= (size_t)w;
    }
}

/* A masked text (or pong) frame around `payload` into `out`; its length. The
 * zero mask key keeps the payload as it is, which a server cannot tell. */
static size_t client_frame(unsigned char *out, unsigned char opcode, const char *payload, size_t n) {
    size_t h = 0;
    out[h++] = 0x80 | opcode;
    if (n < 126) {
        out[h++] = 0x80 | (unsigned char)n;
    } else {
        out[h++] = 0x80 | 126;
        out[h++] = (unsigned char)(n >> 8), out[h++] = (unsigned char)n;
    }
    memset(out + h, 0, 4);
    memcpy(out + h + 4, payload, n);
    return h + 4 + n;
}

/* Connect and upgrade (blocking); leaves what followed the 101 in c->buf. */
static void open_conn(struct conn *c, const struct sockaddr_in *addr, const char *request) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0) fail("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (const struct sockaddr *)addr, sizeof *addr) < 0) fail("connect");
    write_all(c->fd, request, strlen(request), "upgrade request");
    c->buf = malloc(READ_BUF);
    if (!c->buf) fail("malloc");
    unsigned char *end = NULL;
    while (!end) {
        ssize_t got = read(c->fd, c->buf + c->got, READ_BUF - 1 - c->got);
        if (got <= 0) fail("reading the upgrade response");
        c->got += (size_t)got;
        end = memmem(c->buf, c->got, "\r\n\r\n", 4);
        if (!end && c->got >= 8192) { errno = 0; fail("upgrade response head too long"); }
    }
    if (memcmp(c->buf, "HTTP/1.1 101", 12) != 0) {
        c->buf[c->got < 64 ? c->got : 64] = 0;
        fprintf(stderr, "upgrade refused: %s\n", (char *)c->buf);
        exit(2);
    }
    size_t head = (size_t)(end + 4 - c->buf);
    memmove(c->buf, c->buf + head, c->got - head);
    c->got -= head;
}

static void record(struct conn *c, const unsigned char *p, size_t n, int64_t t, int64_t from, int64_t to) {
    static const char data_key[] = "\"data\":\"";
    unsigned char *d = memmem(p, n, data_key, sizeof data_key - 1);
    if (!d) { other_frames++; return; }
    char *s = (char *)d + sizeof data_key - 1, *colon;
    int64_t sent = strtoll(s, &colon, 10);
    uint64_t seq = strtoull(colon + 1, NULL, 10);
    c->received++;
    if (seq == c->next_seq) {
        c->next_seq++;
    } else if (seq > c->next_seq) {
        missing += (long)(seq - c->next_seq);
        c->next_seq = seq + 1;
    } else if (seq + 1 == c->next_seq) {
        duplicates++;    /* the one just received, again */
    } else {
        out_of_order++;  /* an older one (late, or a duplicate of it) */
    }
    if (sent < from || sent >= to) return;
    int64_t latency = t - sent;
    samples++;
    if (latency > max_latency_ns) max_latency_ns = latency;
    if (latency < 0) latency = 0;
    if (latency / 1000 < HIST_US) hist[latency / 1000]++;
    else over_hist++;
}

/* Parse every complete frame in c->buf; answer PINGs; count CLOSEs. */
static void parse(struct conn *c, int64_t t, int64_t from, int64_t to) {
    size_t pos = 0;
    while (c->got - pos >= 2) {
        unsigned char *f = c->buf + pos;
        size_t h = 2, n = f[1] & 0x7f;
        if (n == 126) {
            if (c->got - pos < 4) break;
            n = (size_t)f[2] << 8 | f[3], h = 4;
        } else if (n == 127) {
            if (c->got - pos < 10) break;
            n = 0;
            for (int i = 2; i < 10; i++) n = n << 8 | f[i];
            h = 10;
        }
        if (c->got - pos < h + n) break;
        unsigned char opcode = f[0] & 0x0f, *p = f + h;
        if (opcode == 1) {
            if (n > 17 && memcmp(p, "{\"type\":\"message\"", 17) == 0) record(c, p, n, t, from, to);
            else if (n > 20 && memcmp(p, "{\"type\":\"subscribed\"", 20) == 0) c->subscribed = 1;
        } else if (opcode == 9 && n < 126) {
            unsigned char pong[140];
            write_all(c->fd, pong, client_frame(pong, 0xA, (char *)p, n), "pong");
        } else if (opcode == 8) {
            server_closes++;
        }
        pos += h + n;
    }
    memmove(c->buf, c->buf + pos, c->got - pos);
    c->got -= pos;
}

/* Read what a connection has (non-blocking); 0 when it ended. A read that
 * leaves room in the buffer took everything: no second read() to hear EAGAIN
 * (epoll is level-triggered, so anything that came meanwhile is reported
 * again), which halves the client's system calls. */
static int drain(struct conn *c, int64_t from, int64_t to) {
    for (;;) {
        size_t room = READ_BUF - c->got;
        ssize_t got = read(c->fd, c->buf + c->got, room);
        if (got < 0) return errno == EAGAIN || errno == EINTR;
        if (got == 0) return 0;
        c->got += (size_t)got;
        parse(c, now_ns(), from, to);
        if (c->got == READ_BUF) { errno = 0; fail("a frame larger than the read buffer"); }
        if ((size_t)got < room) return 1;
    }
}

static double quantile_us(double q) {
    long rank = (long)(q * samples + 0.999999999), seen = 0;
    if (rank < 1) rank = 1;
    for (long i = 0; i < HIST_US; i++)
        if ((seen += hist[i]) >= rank) return (double)i + 1;
    return max_latency_ns / 1e3;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *path = "/ws", *channel = "bench";
    int port = 0, pids[MAX_PIDS], n_pids = 0;
    long n_subs = 1000, size = 64;
    double rate = 1000, duration_s = 5, warmup_s = 1, drain_s = 5;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) { usage(stdout, argv[0]); return 0; }
        if (!v) { usage(stderr, argv[0]); return 2; }
        if (strcmp(a, "--port") == 0) port = atoi(v);
        else if (strcmp(a, "--host") == 0) host = v;
        else if (strcmp(a, "--path") == 0) path = v;
        else if (strcmp(a, "--channel") == 0) channel = v;
        else if (strcmp(a, "--subscribers") == 0) n_subs = atol(v);
        else if (strcmp(a, "--rate") == 0) rate = atof(v);
        else if (strcmp(a, "--duration") == 0) duration_s = atof(v);
        else if (strcmp(a, "--warmup") == 0) warmup_s = atof(v);
        else if (strcmp(a, "--drain") == 0) drain_s = atof(v);
        else if (strcmp(a, "--size") == 0) size = atol(v);
        else if (strcmp(a, "--server-pid") == 0 && n_pids < MAX_PIDS) pids[n_pids++] = atoi(v);
        else { usage(stderr, argv[0]); return 2; }
        i++;
    }
    if (port <= 0 || port > 65535 || n_subs < 1 || rate <= 0 || duration_s <= 0 || warmup_s < 0
        || drain_s < 0 || size < 32 || size > MAX_SIZE || strlen(channel) > 200) {
        usage(stderr, argv[0]);
        return 2;
    }
    struct sockaddr_in addr;
    if (server_address(host, port, &addr) < 0 || open_files(n_subs + 16) < 0) return 2;

    char request[1024], text[512];
    snprintf(request, sizeof request,
             "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: " KEY "\r\nSec-WebSocket-Version: 13\r\n\r\n", path, host, port);
    unsigned char frame[MAX_SIZE + 600];

    /* Setup: connect and subscribe everyone, then wait for every `subscribed`. */
    struct conn *conns = calloc((size_t)n_subs + 1, sizeof *conns), *pub = &conns[n_subs];
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (!conns || ep < 0) fail("setup");
    int n_sub_text = snprintf(text, sizeof text, "{\"type\":\"subscribe\",\"channel\":\"%s\"}", channel);
    for (long i = 0; i <= n_subs; i++) {
        struct conn *c = &conns[i];
        open_conn(c, &addr, request);
        if (c != pub) write_all(c->fd, frame, client_frame(frame, 1, text, (size_t)n_sub_text), "subscribe");
        if (fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK) < 0) fail("fcntl");
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) fail("epoll_ctl");
    }
    int max_events = 1024;
    struct epoll_event *events = malloc((size_t)max_events * sizeof *events);
    if (!events) fail("malloc");
    long subscribed;
    int64_t deadline = now_ns() + 30000000000LL;
    for (long i = 0; i < n_subs; i++) parse(&conns[i], 0, 0, 0);  /* what came with the 101 */
    for (;;) {
        subscribed = 0;
        for (long i = 0; i < n_subs; i++) subscribed += conns[i].subscribed;
        if (subscribed == n_subs) break;
        if (now_ns() > deadline) {
            fprintf(stderr, "only %ld of %ld subscribers were answered `subscribed` in 30 s\n", subscribed, n_subs);
            return 2;
        }
        int n = epoll_wait(ep, events, max_events, 100);
        for (int e = 0; e < n; e++)
            if (!drain(events[e].data.ptr, 0, 0)) { errno = 0; fail("the server closed a connection while subscribing"); }
    }

    /* The run: publications on a fixed schedule, every socket read as it comes. */
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event tev = {.events = EPOLLIN, .data.ptr = NULL};
    if (tfd < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev) < 0) fail("timerfd");
    int64_t period = (int64_t)(1e9 / rate), start = now_ns() + 50000000;
    int64_t from = start + (int64_t)(warmup_s * 1e9), to = from + (int64_t)(duration_s * 1e9);
    int64_t stop = to + (int64_t)(drain_s * 1e9);
    uint64_t seq = 0, sent_in_window = 0;
    int64_t next = start;
    double cpu0[MAX_PIDS], cpu1[MAX_PIDS], own0 = 0, own1 = 0;
    int sampled0 = 0, sampled1 = 0;
    char data[MAX_SIZE + 1], body[MAX_SIZE + 512];
    memset(data, 'x', sizeof data);
    long expected_total = 0, received_total = 0;
    for (;;) {
        int64_t t = now_ns();
        if (!sampled0 && t >= from) {
            for (int i = 0; i < n_pids; i++) cpu0[i] = process_cpu_s(pids[i]);
            own0 = own_cpu_s(), sampled0 = 1;
        }
        if (!sampled1 && t >= to) {
            for (int i = 0; i < n_pids; i++) cpu1[i] = process_cpu_s(pids[i]);
            own1 = own_cpu_s(), sampled1 = 1;
        }
        /* Every publication due by now, each stamped with when it was due. */
        while (next < to && next <= t) {
            int prefix = snprintf(data, sizeof data, "%lld:%llu:", (long long)next, (unsigned long long)seq);
            data[prefix] = 'x';
            int n = snprintf(text, sizeof text, "{\"type\":\"publish\",\"channel\":\"%s\",\"data\":\"", channel);
            memcpy(body, text, (size_t)n);
            memcpy(body + n, data, (size_t)size);
            memcpy(body + n + size, "\"}", 2);
            size_t len = client_frame(frame, 1, body, (size_t)n + (size_t)size + 2);
            ssize_t w = write(pub->fd, frame, len);
            if (w != (ssize_t)len) { errno = w < 0 ? errno : 0; fail("the publisher's write did not go out at once"); }
            if (next >= from) sent_in_window++;
            seq++, next = start + (int64_t)seq * period;
        }
        if (sampled1) {
            received_total = 0;
            for (long i = 0; i < n_subs; i++) received_total += conns[i].received;
            expected_total = (long)seq * n_subs;
            if (received_total >= expected_total || t >= stop || server_closes) break;
        }
        if (next < to) {
            struct itimerspec its = {.it_value = {.tv_sec = next / 1000000000, .tv_nsec = next % 1000000000}};
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
        }
        int n = epoll_wait(ep, events, max_events, sampled1 ? 10 : (next < to ? -1 : (int)((to - t) / 1000000) + 1));
        if (n < 0 && errno != EINTR) fail("epoll_wait");
        for (int e = 0; e < n; e++) {
            struct conn *c = events[e].data.ptr;
            if (!c) {
                uint64_t expirations;
                (void)!read(tfd, &expirations, sizeof expirations);
                continue;
            }
            if (!drain(c, from, to)) server_closes++;
        }
    }
    double window_s = (to - from) / 1e9;
    for (long i = 0; i < n_subs; i++) missing += (long)(seq - conns[i].next_seq);
    int clean = !missing && !duplicates && !out_of_order && !server_closes;
    printf("{\"subscribers\": %ld, \"rate\": %.1f, \"size\": %ld, \"duration_s\": %.3f, \"warmup_s\": %.3f, "
           "\"published\": %llu, \"expected\": %ld, \"received\": %ld, \"missing\": %ld, \"duplicates\": %ld, "
           "\"out_of_order\": %ld, \"server_closes\": %ld, \"other_frames\": %ld, "
           "\"published_per_s\": %.1f, \"deliveries_per_s\": %.1f, \"latency_us\": {\"samples\": %ld, "
           "\"p50\": %.0f, \"p90\": %.0f, \"p99\": %.0f, \"p999\": %.0f, \"max\": %.0f, \"over_1s\": %ld}, "
           "\"client_cpu_s\": %.6f, \"servers\": [",
           n_subs, rate, size, duration_s, warmup_s, (unsigned long long)seq, expected_total, received_total,
           missing, duplicates, out_of_order, server_closes, other_frames, sent_in_window / window_s,
           sent_in_window * (double)n_subs / window_s, samples, quantile_us(0.5), quantile_us(0.9),
           quantile_us(0.99), quantile_us(0.999), max_latency_ns / 1e3, over_hist, own1 - own0);
    for (int i = 0; i < n_pids; i++) {
        double cpu = cpu0[i] >= 0 && cpu1[i] >= 0 ? cpu1[i] - cpu0[i] : -1;
        printf("%s{\"pid\": %d, \"cpu_s\": %.6f, \"cpu_percent\": %.1f}", i ? ", " : "", pids[i], cpu,
               cpu >= 0 ? 100 * cpu / window_s : -1.0);
    }
    printf("]}\n");
    return clean ? 0 : 1;
}
