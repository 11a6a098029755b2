/*
 * handshakes.c: an independent WebSocket handshake load generator.
 *
 * Why: the bundled loadgen (python -m tools.loadgen connect) is Python on
 * uvloop; a handshake benchmark measured only with it measures the
 * instrument too. This client is one file of C (libc only: epoll and
 * non-blocking sockets), so its share of each handshake is a few
 * microseconds and it does the same thing to every server.
 *
 * What it does: opens --connections TCP connections to 127.0.0.1:--port with
 * at most --concurrency handshakes in progress, sends one fixed upgrade
 * request on each (GET --path, Host, Upgrade: websocket, Connection: Upgrade,
 * Sec-WebSocket-Key, Sec-WebSocket-Version: 13), reads until the end of the
 * response head ("\r\n\r\n"), and checks the status is 101 and the
 * Sec-WebSocket-Accept matches the fixed key. Anything else is counted by
 * kind (http_503, bad_accept, connect_refused, ...). Then, by --close:
 *
 *   hold   (default) keep every upgraded connection open, unread, until all
 *          handshakes are done; then send each a masked CLOSE 1000 and
 *          close() it. This is what `python -m tools.loadgen connect` does
 *          (tools/loadgen/handshake.py, worker.py), so the two instruments
 *          give the server the same work: N handshakes, no teardown
 *          inside the measured window.
 *   frame  send a masked CLOSE 1000 right after the 101 and close() at once
 *          (without waiting for the server's CLOSE): connection churn; the
 *          server's teardown is inside the measured window.
 *   tcp    close() right after the 101, no CLOSE frame (the server sees
 *          EOF, or a reset when its first frame, e.g. wirehub's welcome,
 *          arrives after the close): churn, no WebSocket close handshake.
 *
 * --busy-poll: wait for events with epoll_wait(..., 0) in a loop instead of
 * sleeping in epoll_wait. The client core then never idles, so a server's
 * write never has to wake it: on loopback that wake-up (an inter-processor
 * interrupt, a VM exit on a virtual machine) is charged to the server's
 * write(). On the 2-vCPU VM this was written on, a sleeping client cost the
 * servers ~22 % of their CPU per handshake (wirehub 8.9k against 11.5k
 * handshakes per CPU-second, Node ws 11.8k against 15.2k); a busy client such
 * as the Python loadgen (~70 % of its core) is in between. Over a network a
 * server's write wakes nobody on its machine.
 *
 * Time: elapsed_s runs from the first connect() to the last handshake's end
 * (success or failure); latency is per connection, from its connect() call
 * to the end of its response head, in microseconds (p50/p99 of the
 * successful ones, nearest rank).
 *
 * Output: one JSON object on stdout. Exit status 0 when every handshake
 * succeeded, 1 when some failed, 2 on bad usage or a local error.
 *
 *   cc -O2 -o handshakes bench/handshakes.c
 *   ./handshakes --port 8080 --path /ws --connections 10000 --concurrency 100
 *   ./handshakes --port 9001 --path / --close frame
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
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bench_common.h"

/* RFC 6455 section 1.3's sample key and the accept value it must produce. */
#define KEY "dGhlIHNhbXBsZSBub25jZQ=="
#define ACCEPT "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
#define HEAD_MAX 8192 /* a response head longer than this is an error */
#define MAX_KINDS 32

enum close_mode { CLOSE_HOLD, CLOSE_FRAME, CLOSE_TCP };
enum state { FREE, CONNECTING, READING };

struct conn {
    int fd;
    enum state state;
    size_t sent;       /* request bytes written */
    size_t got;        /* response bytes read */
    int64_t start_ns;  /* connect() call */
    char buf[HEAD_MAX];
};

/* Error counters by kind: a tiny name -> count table. */
static struct { char name[32]; long count; } kinds[MAX_KINDS];
static int n_kinds;
static long n_errors;

static void count_error(const char *name) {
    n_errors++;
    for (int i = 0; i < n_kinds; i++)
        if (strcmp(kinds[i].name, name) == 0) { kinds[i].count++; return; }
    if (n_kinds < MAX_KINDS) {
        snprintf(kinds[n_kinds].name, sizeof kinds[n_kinds].name, "%s", name);
        kinds[n_kinds++].count = 1;
    }
}

static const char *errno_kind(int err) {
    switch (err) {
    case ECONNREFUSED: return "connect_refused";
    case ECONNRESET: case EPIPE: return "connect_reset";
    case ETIMEDOUT: return "connect_timeout";
    case EADDRNOTAVAIL: case EADDRINUSE: return "no_local_port";
    case EMFILE: case ENFILE: return "no_file_descriptor";
    default: return "connect_error";
    }
}

static void usage(FILE *out, const char *prog) {
    fprintf(out,
            "usage: %s --port PORT [--path /ws] [--connections 10000] [--concurrency 100]\n"
            "          [--close hold|frame|tcp] [--timeout 10] [--host 127.0.0.1]\n"
            "          [--server-pid PID] [--busy-poll]\n"
            "Opens N WebSocket connections, at most C handshakes at a time, and prints\n"
            "a JSON result (see the comment at the top of handshakes.c).\n", prog);
}

/* Case-insensitive search for a header line "name: value" in a head. */
static int has_header(const char *head, const char *name, const char *value) {
    size_t nlen = strlen(name), vlen = strlen(value);
    for (const char *line = strstr(head, "\r\n"); line; line = strstr(line, "\r\n")) {
        line += 2;
        if (strncasecmp(line, name, nlen) != 0 || line[nlen] != ':') continue;
        const char *v = line + nlen + 1;
        while (*v == ' ' || *v == '\t') v++;
        return strncmp(v, value, vlen) == 0 && (v[vlen] == '\r' || v[vlen] == ' ');
    }
    return 0;
}

/* Check a complete response head (NUL-terminated); NULL if it is an upgrade. */
static const char *check_head(const char *head, char *kind, size_t kind_size) {
    if (strncmp(head, "HTTP/1.", 7) != 0 || head[8] != ' ') return "not_http";
    int status = atoi(head + 9);
    if (status != 101) {
        snprintf(kind, kind_size, "http_%d", status);
        return kind;
    }
    if (!has_header(head, "Sec-WebSocket-Accept", ACCEPT)) return "bad_accept";
    return NULL;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted values. */
static int64_t percentile(const int64_t *sorted, long n, double q) {
    if (n == 0) return 0;
    long rank = (long)(q * n + 0.999999999);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return sorted[rank - 1];
}

/* A masked CLOSE frame with status 1000 (mask 0x00000000 keeps it readable). */
static const unsigned char CLOSE_1000[] = {0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8};

/* What the event loop shares with finish(). */
struct run {
    int ep;                   /* epoll descriptor */
    enum close_mode close_mode;
    long finished, ok;        /* handshakes ended / ended with a 101 */
    int64_t *latency;         /* ns per successful handshake, `ok` of them */
    int *held;                /* --close hold: the upgraded sockets, `n_held` of them */
    long n_held;
    int64_t last_end;         /* when the last handshake ended */
};

/* End one connection's handshake (error_kind NULL: upgraded): record it,
 * then hold or close the socket, and free the slot. */
static void finish(struct run *r, struct conn *c, const char *error_kind) {
    int64_t t = now_ns();
    r->last_end = t;
    r->finished++;
    epoll_ctl(r->ep, EPOLL_CTL_DEL, c->fd, NULL);
    c->state = FREE;
    if (error_kind) {
        count_error(error_kind);
        close(c->fd);
        return;
    }
    r->latency[r->ok++] = t - c->start_ns;
    if (r->close_mode == CLOSE_HOLD) {
        r->held[r->n_held++] = c->fd;
        return;
    }
    if (r->close_mode == CLOSE_FRAME) (void)!write(c->fd, CLOSE_1000, sizeof CLOSE_1000);
    close(c->fd);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *path = "/";
    int port = 0, server_pid = 0;
    long total = 10000, concurrency = 100;
    double timeout_s = 10.0;
    enum close_mode close_mode = CLOSE_HOLD;
    const char *close_name = "hold";
    int busy_poll = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) { usage(stdout, argv[0]); return 0; }
        if (strcmp(a, "--busy-poll") == 0) { busy_poll = 1; continue; }
        if (!v) { usage(stderr, argv[0]); return 2; }
        if (strcmp(a, "--port") == 0) port = atoi(v);
        else if (strcmp(a, "--host") == 0) host = v;
        else if (strcmp(a, "--path") == 0) path = v;
        else if (strcmp(a, "--connections") == 0) total = atol(v);
        else if (strcmp(a, "--concurrency") == 0) concurrency = atol(v);
        else if (strcmp(a, "--timeout") == 0) timeout_s = atof(v);
        else if (strcmp(a, "--server-pid") == 0) server_pid = atoi(v);
        else if (strcmp(a, "--close") == 0) {
            close_name = v;
            if (strcmp(v, "hold") == 0) close_mode = CLOSE_HOLD;
            else if (strcmp(v, "frame") == 0) close_mode = CLOSE_FRAME;
            else if (strcmp(v, "tcp") == 0) close_mode = CLOSE_TCP;
            else { fprintf(stderr, "--close: hold, frame or tcp\n"); return 2; }
        } else { usage(stderr, argv[0]); return 2; }
        i++;
    }
    if (port <= 0 || port > 65535 || total < 1 || concurrency < 1 || timeout_s <= 0) {
        usage(stderr, argv[0]);
        return 2;
    }
    if (concurrency > total) concurrency = total;

    struct sockaddr_in addr;
    if (server_address(host, port, &addr) < 0) return 2;
    /* Held connections need a descriptor each. */
    if (open_files(concurrency + (close_mode == CLOSE_HOLD ? total : 0) + 16) < 0) return 2;

    char request[1024];
    int req_len = snprintf(request, sizeof request,
                           "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: " KEY "\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n", path, host, port);
    if (req_len <= 0 || req_len >= (int)sizeof request) {
        fprintf(stderr, "--path too long\n");
        return 2;
    }

    struct conn *slots = calloc((size_t)concurrency, sizeof *slots);
    struct epoll_event *events = malloc((size_t)concurrency * sizeof *events);
    struct run run = {
        .ep = epoll_create1(EPOLL_CLOEXEC),
        .close_mode = close_mode,
        .latency = malloc((size_t)total * sizeof *run.latency),
        .held = close_mode == CLOSE_HOLD ? malloc((size_t)total * sizeof *run.held) : NULL,
    };
    struct run *r = &run;
    if (!slots || !events || r->ep < 0 || !r->latency || (close_mode == CLOSE_HOLD && !r->held)) {
        perror("setup");
        return 2;
    }
    long started = 0;
    int64_t timeout_ns = (int64_t)(timeout_s * 1e9);
    double server_cpu0 = server_pid ? process_cpu_s(server_pid) : -1, client_cpu0 = own_cpu_s();
    int64_t t0 = now_ns(), next_timeout_scan = t0 + 100000000;
    r->last_end = t0;

    while (r->finished < total) {
        /* Fill the free slots with new connections. */
        for (long i = 0; i < concurrency && started < total; i++) {
            struct conn *c = &slots[i];
            if (c->state != FREE) continue;
            started++;
            c->start_ns = now_ns();
            c->sent = c->got = 0;
            c->state = CONNECTING;
            c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (c->fd < 0) { finish(r, c, errno_kind(errno)); continue; }
            int one = 1;
            setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
                finish(r, c, errno_kind(errno));
                continue;
            }
            struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
            epoll_ctl(r->ep, EPOLL_CTL_ADD, c->fd, &ev);
        }

        int n = epoll_wait(r->ep, events, (int)concurrency, busy_poll ? 0 : 100);
        if (n < 0 && errno != EINTR) { perror("epoll_wait"); return 2; }
        for (int e = 0; e < n; e++) {
            struct conn *c = events[e].data.ptr;
            if (c->state == CONNECTING) {
                /* Connected (or failed): send the request, then wait for the response. */
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) { finish(r, c, errno_kind(err)); continue; }
                ssize_t w = write(c->fd, request + c->sent, (size_t)req_len - c->sent);
                if (w < 0) {
                    if (errno != EAGAIN) finish(r, c, errno_kind(errno));
                    continue;
                }
                c->sent += (size_t)w;
                if (c->sent < (size_t)req_len) continue;  /* the rest when writable again */
                c->state = READING;
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(r->ep, EPOLL_CTL_MOD, c->fd, &ev);
            } else if (c->state == READING) {
                ssize_t got = read(c->fd, c->buf + c->got, HEAD_MAX - 1 - c->got);
                if (got < 0) {
                    if (errno != EAGAIN) finish(r, c, errno_kind(errno));
                    continue;
                }
                if (got == 0) { finish(r, c, "closed_before_response"); continue; }
                size_t from = c->got >= 3 ? c->got - 3 : 0;
                c->got += (size_t)got;
                c->buf[c->got] = '\0';
                /* The head may be followed by frames (wirehub's welcome): ignored. */
                char *end = memmem(c->buf + from, c->got - from, "\r\n\r\n", 4);
                if (!end) {
                    if (c->got >= HEAD_MAX - 1) finish(r, c, "head_too_long");
                    continue;
                }
                end[2] = '\0';  /* keep the last header's CRLF for has_header */
                char kind[32];
                finish(r, c, check_head(c->buf, kind, sizeof kind));
            }
        }

        int64_t t = now_ns();
        if (t >= next_timeout_scan) {
            next_timeout_scan = t + 100000000;
            for (long i = 0; i < concurrency; i++)
                if (slots[i].state != FREE && t - slots[i].start_ns > timeout_ns)
                    finish(r, &slots[i], "timeout");
        }
    }
    double elapsed_s = (double)(r->last_end - t0) / 1e9;
    double client_cpu = own_cpu_s() - client_cpu0;
    double server_cpu = server_cpu0 >= 0 ? process_cpu_s(server_pid) - server_cpu0 : -1;

    /* Held connections: CLOSE 1000 and close, after the measured window. */
    for (long i = 0; i < r->n_held; i++) {
        (void)!write(r->held[i], CLOSE_1000, sizeof CLOSE_1000);
        close(r->held[i]);
    }

    long ok = r->ok;
    qsort(r->latency, (size_t)ok, sizeof *r->latency, cmp_i64);
    printf("{\"connections\": %ld, \"handshakes\": %ld, \"errors\": %ld, \"error_kinds\": {",
           total, ok, n_errors);
    for (int i = 0; i < n_kinds; i++)
        printf("%s\"%s\": %ld", i ? ", " : "", kinds[i].name, kinds[i].count);
    printf("}, \"concurrency\": %ld, \"close\": \"%s\", \"busy_poll\": %s, \"elapsed_s\": %.6f, "
           "\"handshakes_per_s\": %.1f, \"latency_us\": {\"p50\": %.1f, \"p99\": %.1f, "
           "\"max\": %.1f}, \"client_cpu_s\": %.6f",
           concurrency, close_name, busy_poll ? "true" : "false", elapsed_s,
           elapsed_s > 0 ? ok / elapsed_s : 0.0, percentile(r->latency, ok, 0.50) / 1e3,
           percentile(r->latency, ok, 0.99) / 1e3, ok ? r->latency[ok - 1] / 1e3 : 0.0, client_cpu);
    /* The server's CPU over the same window (the held connections' closes come after). */
    if (server_cpu >= 0)
        printf(", \"server\": {\"pid\": %d, \"cpu_s\": %.6f, \"cpu_percent\": %.1f, "
               "\"handshakes_per_cpu_s\": %.0f}", server_pid, server_cpu,
               elapsed_s > 0 ? 100 * server_cpu / elapsed_s : 0.0,
               server_cpu > 0 ? ok / server_cpu : 0.0);
    printf("}\n");
    free(slots), free(events), free(r->latency), free(r->held);
    close(r->ep);
    return n_errors ? 1 : 0;
}
