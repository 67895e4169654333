/*
 * epoll_server: the near-limit reference for the tsecho benchmark.
 *
 * Single thread, non-blocking sockets, level-triggered epoll. Same protocol
 * as tsechod: for each line `payload\n` it answers `[<ctime>] payload\n`
 * (the bytes before the '\n', a '\r' included, are echoed unchanged, so CRLF
 * in gives CRLF out). All replies for one read are built into one buffer and
 * sent with one send(). A partial last line is answered when the peer shuts
 * down its side. A line over 65536 bytes gets `ERR line too long` and a close.
 *
 * It binds 127.0.0.1 port 0 (or the port given as argv[1]), prints
 * `listening on 127.0.0.1:PORT` to stdout and serves until SIGTERM/SIGINT.
 *
 * Build: gcc -O2 -Wall -o epoll_server epoll_server.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bench_server.h"

#define MAX_LINE 65536
#define READ_CHUNK 65536
#define OUT_HIGH_WATER (1 << 20) /* stop reading from a peer that doesn't read its replies */

typedef struct client {
    int fd;
    int eof;           /* peer shut down its side: close once the replies are out */
    unsigned events;   /* current epoll interest */
    char *in;          /* incomplete line */
    size_t in_len, in_cap;
    char *out;         /* replies not yet sent */
    size_t out_len, out_off, out_cap;
} client_t;

static volatile sig_atomic_t stop;
static int epfd;
static char stamp[64];
static size_t stamp_len;
static time_t stamp_sec = -1;

static void on_signal(int sig) { (void)sig; stop = 1; }

static void refresh_stamp(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    if (ts.tv_sec == stamp_sec) return; /* the text changes once a second */
    stamp_sec = ts.tv_sec;
    char buf[64];
    struct tm tm;
    localtime_r(&stamp_sec, &tm);
    asctime_r(&tm, buf); /* "Thu Sep 15 22:29:12 2016\n", like Python's time.ctime() */
    size_t n = strcspn(buf, "\n");
    stamp[0] = '[';
    memcpy(stamp + 1, buf, n);
    stamp[n + 1] = ']';
    stamp[n + 2] = ' ';
    stamp_len = n + 3;
}

static void *grow(char *p, size_t *cap, size_t need) {
    if (need <= *cap) return p;
    size_t c = *cap ? *cap : 256;
    while (c < need) c *= 2;
    char *q = realloc(p, c);
    if (!q) {
        perror("realloc");
        exit(1);
    }
    *cap = c;
    return q;
}

static void out_append(client_t *c, const char *p, size_t n) {
    c->out = grow(c->out, &c->out_cap, c->out_len + n);
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
}

static void reply(client_t *c, const char *line, size_t n) {
    c->out = grow(c->out, &c->out_cap, c->out_len + stamp_len + n + 1);
    memcpy(c->out + c->out_len, stamp, stamp_len);
    memcpy(c->out + c->out_len + stamp_len, line, n);
    c->out[c->out_len + stamp_len + n] = '\n';
    c->out_len += stamp_len + n + 1;
}

static void set_events(client_t *c, unsigned events) {
    if (events == c->events) return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->events = events;
}

static void drop(client_t *c) {
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

/* Send what is pending; returns -1 if the client is gone. */
static int flush_out(client_t *c) {
    while (c->out_off < c->out_len) {
        ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) break;
            drop(c);
            return -1;
        }
        c->out_off += (size_t)w;
    }
    if (c->out_off == c->out_len) {
        c->out_off = c->out_len = 0;
        if (c->eof) {
            drop(c);
            return -1;
        }
    }
    unsigned want = 0;
    if (c->out_len) want |= EPOLLOUT;
    if (!c->eof && c->out_len < OUT_HIGH_WATER) want |= EPOLLIN;
    set_events(c, want);
    return 0;
}

static void on_readable(client_t *c) {
    static char buf[READ_CHUNK];
    ssize_t r = recv(c->fd, buf, sizeof buf, 0);
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        drop(c);
        return;
    }
    refresh_stamp();
    if (r == 0) {
        c->eof = 1;
        if (c->in_len) reply(c, c->in, c->in_len); /* answer a partial last line */
        c->in_len = 0;
        flush_out(c);
        return;
    }
    const char *p = buf, *end = buf + r, *nl;
    while ((nl = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        if (c->in_len) { /* the line started in an earlier read */
            c->in = grow(c->in, &c->in_cap, c->in_len + (size_t)(nl - p));
            memcpy(c->in + c->in_len, p, (size_t)(nl - p));
            c->in_len += (size_t)(nl - p);
            if (c->in_len > MAX_LINE) goto too_long;
            reply(c, c->in, c->in_len);
            c->in_len = 0;
        } else {
            if (nl - p > MAX_LINE) goto too_long;
            reply(c, p, (size_t)(nl - p));
        }
        p = nl + 1;
    }
    if (p < end) {
        c->in = grow(c->in, &c->in_cap, c->in_len + (size_t)(end - p));
        memcpy(c->in + c->in_len, p, (size_t)(end - p));
        c->in_len += (size_t)(end - p);
        if (c->in_len > MAX_LINE) goto too_long;
    }
    flush_out(c);
    return;
too_long:
    {
        static const char msg[] = "ERR line too long (max 65536 bytes)\n";
        out_append(c, msg, sizeof msg - 1);
        c->eof = 1;
        c->in_len = 0;
        shutdown(c->fd, SHUT_RD);
        flush_out(c);
    }
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    raise_nofile();
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int lfd = listen_loopback(port, SOCK_NONBLOCK | SOCK_CLOEXEC, "epoll_server: bind/listen");
    if (lfd < 0) return 1;
    int one = 1; /* TCP_NODELAY on every accepted connection */

    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev);
    struct epoll_event evs[256];
    while (!stop) {
        int n = epoll_wait(epfd, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            client_t *c = evs[i].data.ptr;
            if (!c) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break; /* EAGAIN, or EMFILE: try again on the next wake-up */
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    client_t *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    nc->events = EPOLLIN;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            if (evs[i].events & EPOLLOUT) {
                if (flush_out(c) < 0) continue;
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                if (c->eof) { /* only here for EPOLLERR/HUP while flushing */
                    if (evs[i].events & (EPOLLHUP | EPOLLERR)) drop(c);
                    continue;
                }
                on_readable(c);
            }
        }
    }
    return 0;
}
