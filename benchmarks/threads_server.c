/*
 * threads_server: tsechod's shape in C, the floor of a thread per connection.
 *
 * One thread per connection, blocking read() and write(), nothing else: no
 * interpreter, no GIL, no deadlines. Same protocol as tsechod and
 * epoll_server: for each line `payload\n` it answers `[<ctime>] payload\n`
 * (a '\r' before the '\n' is echoed unchanged); all replies to one read go out
 * in one write(); a partial last line is answered at EOF; a line over 65536
 * bytes gets `ERR line too long` and a close.
 *
 * It is in the benchmark to tell what the shape costs from what Python costs:
 * with 256 connections on one CPU, which runnable thread runs next is the
 * kernel scheduler's choice, not first-come-first-served, and the latency tail
 * it gives is the shape's, whatever the language (docs/performance.md).
 *
 * It binds 127.0.0.1 port 0 (or the port given as argv[1]), prints
 * `listening on 127.0.0.1:PORT` to stdout and serves until SIGTERM/SIGINT.
 *
 * Build: gcc -O2 -Wall -pthread -o threads_server threads_server.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bench_server.h"

#define MAX_LINE 65536
#define READ_CHUNK 65536
#define STAMP_MAX 64

/* "[Thu Sep 15 22:29:12 2016] ", like Python's time.ctime(); each thread keeps its own copy. */
static size_t make_stamp(char *stamp, time_t *sec) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    if (ts.tv_sec == *sec) return strlen(stamp);
    *sec = ts.tv_sec;
    char buf[64];
    struct tm tm;
    localtime_r(sec, &tm);
    asctime_r(&tm, buf);
    size_t n = strcspn(buf, "\n");
    stamp[0] = '[';
    memcpy(stamp + 1, buf, n);
    stamp[n + 1] = ']';
    stamp[n + 2] = ' ';
    stamp[n + 3] = '\0';
    return n + 3;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Append `stamp line '\n'` to out (grown as needed); returns the new out or NULL. */
static char *reply(char *out, size_t *len, size_t *cap, const char *stamp, size_t stamp_len, const char *line,
                   size_t n) {
    size_t need = *len + stamp_len + n + 1;
    if (need > *cap) {
        size_t c = *cap ? *cap : 4096;
        while (c < need) c *= 2;
        char *q = realloc(out, c);
        if (!q) return NULL;
        out = q;
        *cap = c;
    }
    memcpy(out + *len, stamp, stamp_len);
    memcpy(out + *len + stamp_len, line, n);
    out[*len + stamp_len + n] = '\n';
    *len = need;
    return out;
}

static void *serve(void *arg) {
    int fd = (int)(long)arg;
    char *buf = malloc(READ_CHUNK + MAX_LINE + 1); /* a partial line, then what the next read adds */
    char *out = NULL;
    size_t held = 0, out_len = 0, out_cap = 0;
    char stamp[STAMP_MAX] = "";
    time_t stamp_sec = -1;
    if (!buf) goto done;
    for (;;) {
        ssize_t r = read(fd, buf + held, READ_CHUNK);
        if (r < 0 && errno == EINTR) continue;
        size_t stamp_len = make_stamp(stamp, &stamp_sec);
        out_len = 0;
        if (r <= 0) {
            if (r == 0 && held && (out = reply(out, &out_len, &out_cap, stamp, stamp_len, buf, held)))
                write_all(fd, out, out_len); /* answer a partial last line */
            break;
        }
        size_t end = held + (size_t)r, start = 0;
        char *nl;
        while ((nl = memchr(buf + start, '\n', end - start)) != NULL) {
            size_t n = (size_t)(nl - (buf + start));
            if (n > MAX_LINE) goto too_long;
            if (!(out = reply(out, &out_len, &out_cap, stamp, stamp_len, buf + start, n))) goto done;
            start += n + 1;
        }
        held = end - start;
        if (held > MAX_LINE) goto too_long;
        memmove(buf, buf + start, held);
        if (out_len && write_all(fd, out, out_len) < 0) break;
    }
    goto done;
too_long:
    {
        static const char msg[] = "ERR line too long (max 65536 bytes)\n";
        if (out_len) write_all(fd, out, out_len);
        write_all(fd, msg, sizeof msg - 1);
    }
done:
    free(buf);
    free(out);
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    raise_nofile();
    signal(SIGPIPE, SIG_IGN); /* SIGTERM/SIGINT: the default action ends the process */

    int lfd = listen_loopback(port, SOCK_CLOEXEC, "threads_server: bind/listen");
    if (lfd < 0) return 1;
    int one = 1; /* TCP_NODELAY on every accepted connection */

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 << 10); /* the buffers are on the heap */
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE) usleep(10000);
            continue;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        pthread_t thread;
        if (pthread_create(&thread, &attr, serve, (void *)(long)fd) != 0) close(fd);
    }
}
