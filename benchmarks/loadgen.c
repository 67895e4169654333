/*
 * loadgen: load generator for the tsecho benchmark (see docs/performance.md).
 *
 * One thread, non-blocking sockets, level-triggered epoll. It speaks the
 * timestamp echo protocol: it sends `payload\n` and expects `[<timestamp>] payload\n`
 * back, in order. EVERY reply is checked (opening bracket, timestamp shape,
 * "] ", exact payload bytes, newline, order); anything else is counted as a
 * bad reply. Each payload carries its connection id and sequence number, so a
 * reply that is reordered, duplicated or belongs to another connection fails
 * the byte comparison.
 *
 * Workloads:
 *   pingpong  N connections; each sends a line, waits for the reply, repeats.
 *   pipeline  N connections; each writes --lines lines, then reads as many
 *             replies (reading starts as soon as replies arrive), repeats.
 *   connrate  N slots; each: connect, one line, reply, close, repeat.
 *   hold      N connections opened (at most --concurrency at a time in
 *             flight), each answers one line; all idle for --idle seconds;
 *             then each sends a second line and must answer it.
 *
 * Every run is bounded: a warm-up, a measured window of --duration seconds,
 * then at most --grace seconds to collect replies still in flight (missing
 * ones count as lost). Per-request latency is measured with CLOCK_MONOTONIC
 * from the moment the whole line was handed to the kernel to the moment its
 * reply was parsed. Output: one JSON object on stdout. Progress for the
 * runner (the "holding" mark of the hold workload) goes to stderr.
 *
 * Build: gcc -O2 -Wall -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum workload { W_PINGPONG, W_PIPELINE, W_CONNRATE, W_HOLD };
static const char *const WORKLOAD_NAMES[] = {"pingpong", "pipeline", "connrate", "hold"};

enum state { S_IDLE, S_CONNECTING, S_ACTIVE, S_HELD, S_DONE, S_DEAD };

/* ---------- options ---------- */
static struct {
    enum workload workload;
    struct sockaddr_in addr;
    int conns;
    double duration_s, warmup_s, grace_s, idle_s, setup_timeout_s;
    int lines;       /* pipeline batch */
    int payload;     /* payload bytes, without the newline */
    int concurrency; /* hold: connections being set up at once */
    int ts_any;      /* accept any timestamp text, not only ctime's shape */
    int spin;        /* poll epoll without sleeping */
    int src_ips;     /* > 1: spread connections over 127.0.0.2 .. 127.0.0.(src_ips+1) */
    int proxy_header; /* 1 or 2: start every connection with a PROXY v1/v2 header (tsechod's PROXY listener) */
    const char *label;
} opt;

/* ---------- clock ---------- */
static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---------- latency histogram: log-linear, 64 sub-buckets per power of two (<1.6% error) ---------- */
#define HIST_BUCKETS (64 * 42)
typedef struct {
    uint64_t count[HIST_BUCKETS];
    uint64_t n;
    int64_t max;
} hist_t;

static int hist_index(int64_t v) {
    if (v < 0) v = 0;
    if (v < 128) return (int)v;
    int msb = 63 - __builtin_clzll((uint64_t)v);
    int e = msb - 6;
    int idx = 64 * (e + 1) + (int)((v >> e) - 64);
    return idx < HIST_BUCKETS ? idx : HIST_BUCKETS - 1;
}

static int64_t hist_value(int idx) { /* upper edge of the bucket */
    if (idx < 128) return idx;
    int e = idx / 64 - 1;
    int64_t sub = idx % 64 + 64;
    return ((sub + 1) << e) - 1;
}

static void hist_add(hist_t *h, int64_t v) {
    h->count[hist_index(v)]++;
    h->n++;
    if (v > h->max) h->max = v;
}

static double hist_pct_us(const hist_t *h, double pct) {
    if (h->n == 0) return 0.0;
    uint64_t want = (uint64_t)((double)h->n * pct / 100.0 + 0.999999);
    if (want < 1) want = 1;
    uint64_t seen = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        seen += h->count[i];
        if (seen >= want) {
            int64_t v = hist_value(i);
            if (v > h->max) v = h->max;
            return (double)v / 1000.0;
        }
    }
    return (double)h->max / 1000.0;
}

/* ---------- connections ---------- */
typedef struct conn {
    int fd;
    uint32_t id; /* changes for every new connection of a connrate slot */
    enum state state;
    uint32_t events;     /* current epoll interest */
    uint64_t batch_base; /* seq of the first line of the batch being written */
    uint32_t batch_n;    /* lines in that batch */
    uint64_t written;    /* bytes of the batch handed to the kernel */
    uint32_t stamped;    /* lines of the batch that are completely written */
    uint64_t recvd;      /* replies received and checked (= next expected seq) */
    int64_t *stamps;     /* send time per line of the batch */
    char *out;           /* the batch bytes */
    char *in;
    size_t in_len;
    int64_t t_open; /* connrate/hold: when the socket was created */
} conn_t;

static int epfd;
static conn_t *conns;
static int n_state[S_DEAD + 1]; /* connections per state */

static void set_state(conn_t *c, enum state to) {
    n_state[c->state]--;
    n_state[to]++;
    c->state = to;
}
static size_t in_cap, line_len;
static int64_t t_measure_start, t_measure_end;
static int stopping;   /* no new requests/batches */
static int establishing; /* connections are being opened, each answering one line */
static int hold_phase;   /* hold: 0 set-up, 1 idle, 2 second line */

static struct {
    uint64_t replies;       /* checked replies inside the measured window */
    uint64_t replies_total; /* all checked replies */
    uint64_t bad_replies;   /* wrong bytes, wrong order, ERR lines, overlong lines */
    uint64_t closed_early;  /* the server closed or reset a connection we still needed */
    uint64_t connect_errors;
    uint64_t lost; /* requests still unanswered when the grace period ran out */
    uint64_t conn_done;     /* connrate: connections completed inside the window */
    uint64_t conn_total;
    char first_bad[160];
} st;

static hist_t lat;

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* "aaa...zabc...": the filler of a payload is a window of this, so no per-byte arithmetic */
static char alphabet[26 + 2048 + 1];

static void put_hex(char *p, uint64_t v, int digits) {
    static const char hex[] = "0123456789abcdef";
    for (int i = digits - 1; i >= 0; i--, v >>= 4) p[i] = hex[v & 15];
}

/* The payload of line seq of connection id: "%08x %016llx " then filler; unique per (id, seq). */
static void make_payload(uint32_t id, uint64_t seq, char *p) {
    put_hex(p, id, 8);
    p[8] = ' ';
    put_hex(p + 9, seq, 16);
    p[25] = ' ';
    memcpy(p + 26, alphabet + (id + seq + 26) % 26, (size_t)opt.payload - 26);
}

static void ep_set(conn_t *c, uint32_t events) {
    if (c->events == events) return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
    c->events = events;
}

static void conn_close(conn_t *c, enum state to) {
    if (c->fd >= 0) {
        close(c->fd); /* also removes it from the epoll set */
        c->fd = -1;
    }
    c->events = 0;
    set_state(c, to);
    c->in_len = 0;
}

static void note_bad(conn_t *c, const char *why, const char *line, size_t len) {
    st.bad_replies++;
    if (!st.first_bad[0]) {
        char shown[80];
        size_t n = len < sizeof shown - 1 ? len : sizeof shown - 1;
        for (size_t i = 0; i < n; i++) shown[i] = (line[i] >= 32 && line[i] < 127 && line[i] != '"' && line[i] != '\\') ? line[i] : '?';
        shown[n] = 0;
        snprintf(st.first_bad, sizeof st.first_bad, "conn %u seq %llu: %s: %s", c->id, (unsigned long long)c->recvd, why, shown);
    }
}

/* Fill the batch buffer with lines batch_base .. batch_base+n-1 and start writing it. */
static void start_batch(conn_t *c, uint32_t n);
static int try_write(conn_t *c);

static int open_conn(conn_t *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->events = 0;
    c->recvd = 0;
    c->batch_base = 0;
    c->batch_n = 0;
    c->written = 0;
    c->stamped = 0;
    c->in_len = 0;
    c->t_open = now_ns();
    if (opt.src_ips > 1) {
        /* Spread connections over source addresses 127.0.0.2.. so connect()
         * doesn't search a port range full of TIME_WAIT entries (connrate). */
        setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000002u + (c->id % (uint32_t)opt.src_ips));
        if (bind(c->fd, (struct sockaddr *)&src, sizeof src) < 0) die("bind source address");
    }
    if (connect(c->fd, (struct sockaddr *)&opt.addr, sizeof opt.addr) < 0 && errno != EINPROGRESS) {
        st.connect_errors++;
        conn_close(c, opt.workload == W_CONNRATE ? S_IDLE : S_DEAD);
        return -1;
    }
    set_state(c, S_CONNECTING);
    ep_set(c, EPOLLOUT);
    return 0;
}

static void start_batch(conn_t *c, uint32_t n) {
    c->batch_base = c->recvd;
    c->batch_n = n;
    c->written = 0;
    c->stamped = 0;
    for (uint32_t i = 0; i < n; i++) {
        char *p = c->out + (size_t)i * line_len;
        make_payload(c->id, c->batch_base + i, p);
        p[opt.payload] = '\n';
    }
    try_write(c);
}

/* Returns -1 if the connection died. */
static int try_write(conn_t *c) {
    size_t total = (size_t)c->batch_n * line_len;
    while (c->written < total) {
        ssize_t w = send(c->fd, c->out + c->written, total - c->written, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) break;
            st.closed_early++;
            conn_close(c, S_DEAD);
            return -1;
        }
        c->written += (size_t)w;
        int64_t t = now_ns();
        while (c->stamped < c->batch_n && (uint64_t)(c->stamped + 1) * line_len <= c->written) c->stamps[c->stamped++] = t;
    }
    ep_set(c, c->written < total ? EPOLLIN | EPOLLOUT : EPOLLIN);
    return 0;
}

static int ctime_shape(const char *t, size_t n) {
    /* "Thu Sep 15 22:29:12 2016" (time.ctime(), C asctime) */
    static const char pat[] = "aaa aaa dd dd:dd:dd dddd";
    if (n != sizeof pat - 1) return 0;
    for (size_t i = 0; i < n; i++) {
        char p = pat[i], ch = t[i];
        if (p == 'a' && !((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z'))) return 0;
        if (p == 'd' && !((ch >= '0' && ch <= '9') || (i == 8 && ch == ' '))) return 0;
        if ((p == ' ' || p == ':') && ch != p) return 0;
    }
    return 1;
}

/* Check one reply line (without its '\n'); returns 1 if it is the expected one. */
static int check_reply(conn_t *c, const char *line, size_t len) {
    if (len < 4 || line[0] != '[') {
        note_bad(c, "no [timestamp] prefix", line, len);
        return 0;
    }
    const char *close_br = memchr(line, ']', len);
    if (!close_br || close_br == line + 1 || (size_t)(close_br - line) + 2 > len || close_br[1] != ' ') {
        note_bad(c, "no '] ' after the timestamp", line, len);
        return 0;
    }
    size_t ts_len = (size_t)(close_br - line) - 1;
    /* the text changes once a second: re-check its shape only when it changes */
    static char last_ts[64];
    static size_t last_ts_len;
    if (!opt.ts_any && !(ts_len == last_ts_len && memcmp(line + 1, last_ts, ts_len) == 0)) {
        if (!ctime_shape(line + 1, ts_len)) {
            note_bad(c, "timestamp is not ctime-shaped", line, len);
            return 0;
        }
        memcpy(last_ts, line + 1, ts_len); /* ctime-shaped: 24 bytes */
        last_ts_len = ts_len;
    }
    const char *payload = close_br + 2;
    size_t plen = len - (size_t)(payload - line);
    /* the line as sent is still in the batch buffer (the caller checked it was sent) */
    const char *want = c->out + (size_t)(c->recvd - c->batch_base) * line_len;
    if (plen != (size_t)opt.payload || memcmp(payload, want, plen) != 0) {
        note_bad(c, "payload differs (wrong bytes or order)", line, len);
        return 0;
    }
    return 1;
}

static void on_reply_ok(conn_t *c, int64_t t);

/* Read what is there, check each complete line. Returns -1 if the connection died. */
static int do_read(conn_t *c) {
    for (;;) {
        ssize_t r = recv(c->fd, c->in + c->in_len, in_cap - c->in_len, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return 0;
            st.closed_early++;
            conn_close(c, S_DEAD);
            return -1;
        }
        if (r == 0) {
            if (c->in_len) note_bad(c, "unterminated last line", c->in, c->in_len);
            st.closed_early++;
            conn_close(c, S_DEAD);
            return -1;
        }
        int64_t t = now_ns();
        c->in_len += (size_t)r;
        char *p = c->in, *end = c->in + c->in_len;
        char *nl;
        while ((nl = memchr(p, '\n', (size_t)(end - p))) != NULL) {
            size_t len = (size_t)(nl - p);
            if (c->recvd >= c->batch_base + c->stamped) {
                note_bad(c, "reply to a line not sent (yet)", p, len);
                conn_close(c, S_DEAD);
                return -1;
            }
            if (!check_reply(c, p, len)) {
                /* the stream can't be trusted any more */
                conn_close(c, S_DEAD);
                return -1;
            }
            /* connrate and the hold set-up time a whole connection: socket() to reply */
            int64_t sent = (opt.workload == W_CONNRATE || establishing)
                               ? c->t_open
                               : c->stamps[c->recvd - c->batch_base];
            c->recvd++;
            st.replies_total++;
            if (t >= t_measure_start && t < t_measure_end) {
                st.replies++;
                hist_add(&lat, t - sent);
            }
            p = nl + 1;
            on_reply_ok(c, t);
            if (c->fd < 0 || c->state != S_ACTIVE) {
                /* closed (connrate) or parked (hold): nothing more is expected now */
                if (c->fd >= 0 && p < end) {
                    note_bad(c, "unexpected extra data", p, (size_t)(end - p));
                    conn_close(c, S_DEAD);
                }
                c->in_len = 0;
                return 0;
            }
        }
        size_t rest = (size_t)(end - p);
        if (rest == in_cap) {
            note_bad(c, "reply line too long", c->in, 64);
            conn_close(c, S_DEAD);
            return -1;
        }
        memmove(c->in, p, rest);
        c->in_len = rest;
        if ((size_t)r < in_cap / 2) return 0; /* probably drained; level-triggered epoll tells us otherwise */
    }
}

/* ---------- workload logic ---------- */
static int next_to_open; /* hold: next connection index to open */
static uint32_t next_id;
static double setup_s; /* time to set up all connections */
static int64_t hold_second_done_t;

/* A PROXY header naming client 192.0.2.1:1 (one address: limits per address are the server's
 * business), sent alone before the first line, as a load balancer does. On a fresh socket the
 * send buffer is empty, so these few bytes go out whole. */
static void send_proxy_header(conn_t *c) {
    static const char v1[] = "PROXY TCP4 192.0.2.1 127.0.0.1 1 8009\r\n";
    static const unsigned char v2[28] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
                                         0x21, 0x11, 0x00, 0x0C, 192, 0, 2, 1, 127, 0, 0, 1, 0, 1, 0x1F, 0x49};
    const void *h = opt.proxy_header == 1 ? (const void *)v1 : (const void *)v2;
    size_t n = opt.proxy_header == 1 ? sizeof v1 - 1 : sizeof v2;
    if (send(c->fd, h, n, MSG_NOSIGNAL) != (ssize_t)n) st.closed_early++;
}

static void on_connected(conn_t *c) {
    set_state(c, S_ACTIVE);
    ep_set(c, EPOLLIN);
    if (opt.proxy_header) send_proxy_header(c);
    start_batch(c, 1); /* the first line: during set-up, or connrate's only one */
}

static void on_reply_ok(conn_t *c, int64_t t) {
    if (c->recvd < c->batch_base + c->batch_n) return; /* batch not complete yet */
    if (establishing) {
        set_state(c, S_HELD); /* set up; waits for the measured phase */
        return;
    }
    switch (opt.workload) {
    case W_PINGPONG:
        if (!stopping) start_batch(c, 1);
        break;
    case W_PIPELINE:
        if (!stopping) start_batch(c, (uint32_t)opt.lines);
        break;
    case W_CONNRATE:
        st.conn_total++;
        if (t >= t_measure_start && t < t_measure_end) st.conn_done++;
        conn_close(c, S_IDLE);
        break;
    case W_HOLD:
        set_state(c, S_DONE);
        hold_second_done_t = t;
        break;
    }
}

static void handle_events(int timeout_ms) {
    struct epoll_event evs[512];
    /* --spin: never sleep, so a reply never has to wake this CPU (no IPI) */
    int n = epoll_wait(epfd, evs, 512, opt.spin ? 0 : timeout_ms);
    if (n < 0) {
        if (errno == EINTR) return;
        die("epoll_wait");
    }
    for (int i = 0; i < n; i++) {
        conn_t *c = evs[i].data.ptr;
        uint32_t e = evs[i].events;
        if (c->fd < 0) continue;
        if (c->state == S_CONNECTING) {
            int err = 0;
            socklen_t l = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
            if (err || (e & (EPOLLERR | EPOLLHUP))) {
                st.connect_errors++;
                conn_close(c, opt.workload == W_CONNRATE ? S_IDLE : S_DEAD);
                continue;
            }
            on_connected(c);
            continue;
        }
        if (e & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
            if (c->state == S_HELD || c->state == S_DONE) {
                /* an idle connection became readable: the server closed it or sent junk */
                char junk[256];
                ssize_t r = recv(c->fd, junk, sizeof junk, 0);
                if (r > 0) note_bad(c, "data while idle", junk, (size_t)r);
                st.closed_early++;
                conn_close(c, S_DEAD);
                continue;
            }
            if (do_read(c) < 0) continue;
        }
        if ((e & EPOLLOUT) && c->fd >= 0 && c->state == S_ACTIVE) try_write(c);
    }
}

static int outstanding(void) { return n_state[S_CONNECTING] + n_state[S_ACTIVE]; }

static int ms_until(int64_t t) {
    int64_t d = t - now_ns();
    if (d <= 0) return 0;
    return (int)(d / 1000000) + 1;
}

/*
 * Open all connections, at most --concurrency of them being set up at a time;
 * each sends one line and is set up (S_HELD) once the reply is checked. That
 * proves the server accepted it, so the measured phase starts with every
 * connection live. Returns the time the last one was set up.
 */
static int64_t establish(int64_t deadline) {
    int64_t t0 = now_ns(), last = t0;
    establishing = 1;
    while (now_ns() < deadline) {
        while (outstanding() < opt.concurrency && next_to_open < opt.conns) {
            conn_t *c = &conns[next_to_open++];
            c->id = next_id++;
            open_conn(c);
        }
        if (outstanding() == 0 && next_to_open >= opt.conns) break;
        int before = n_state[S_HELD];
        handle_events(ms_until(deadline));
        if (n_state[S_HELD] != before) last = now_ns();
    }
    for (int i = 0; i < opt.conns; i++) /* still not set up at the deadline */
        if (conns[i].state == S_CONNECTING || conns[i].state == S_ACTIVE) {
            st.lost++;
            conn_close(&conns[i], S_DEAD);
        }
    establishing = 0;
    return last;
}

static void run_steady(void) {
    /* pingpong / pipeline / connrate */
    int64_t t0 = now_ns();
    int64_t connect_deadline = t0 + (int64_t)(opt.setup_timeout_s * 1e9);
    t_measure_start = INT64_MAX;
    t_measure_end = INT64_MAX;
    if (opt.workload == W_CONNRATE) {
        t_measure_start = t0 + (int64_t)(opt.warmup_s * 1e9);
        t_measure_end = t_measure_start + (int64_t)(opt.duration_s * 1e9);
        for (int i = 0; i < opt.conns; i++) {
            conns[i].id = next_id++;
            open_conn(&conns[i]);
        }
    } else {
        /* set up all connections first, then start the clock and the traffic together */
        setup_s = (double)(establish(connect_deadline) - t0) / 1e9;
        int64_t t = now_ns();
        t_measure_start = t + (int64_t)(opt.warmup_s * 1e9);
        t_measure_end = t_measure_start + (int64_t)(opt.duration_s * 1e9);
        for (int i = 0; i < opt.conns; i++) {
            if (conns[i].state == S_HELD) {
                set_state(&conns[i], S_ACTIVE);
                start_batch(&conns[i], opt.workload == W_PIPELINE ? (uint32_t)opt.lines : 1);
            }
        }
    }
    while (now_ns() < t_measure_end) {
        handle_events(ms_until(t_measure_end));
        if (opt.workload == W_CONNRATE) {
            for (int i = 0; i < opt.conns; i++) {
                if (conns[i].state == S_IDLE && now_ns() < t_measure_end) {
                    conns[i].id = next_id++;
                    open_conn(&conns[i]);
                }
            }
        }
    }
    stopping = 1;
    int64_t grace_end = now_ns() + (int64_t)(opt.grace_s * 1e9);
    while (now_ns() < grace_end) {
        int busy = 0;
        for (int i = 0; i < opt.conns; i++) {
            conn_t *c = &conns[i];
            if (c->fd >= 0 && (c->state == S_CONNECTING || c->recvd < c->batch_base + c->batch_n)) busy = 1;
        }
        if (!busy) break;
        handle_events(ms_until(grace_end));
    }
    for (int i = 0; i < opt.conns; i++) {
        conn_t *c = &conns[i];
        if (c->fd >= 0 && c->recvd < c->batch_base + c->batch_n) st.lost += c->batch_base + c->batch_n - c->recvd;
    }
}

static double hold_second_s;
static int held_after_setup, held_at_mark;

static void run_hold(void) {
    int64_t t0 = now_ns();
    int64_t setup_deadline = t0 + (int64_t)(opt.setup_timeout_s * 1e9);
    t_measure_start = t0;
    t_measure_end = INT64_MAX;
    setup_s = (double)(establish(setup_deadline) - t0) / 1e9;
    held_at_mark = n_state[S_HELD];
    fprintf(stderr, "holding %d\n", n_state[S_HELD]);
    fflush(stderr);
    hold_phase = 1;
    t_measure_end = now_ns(); /* latency = set-up latency only */
    int64_t idle_end = now_ns() + (int64_t)(opt.idle_s * 1e9);
    while (now_ns() < idle_end) handle_events(ms_until(idle_end));
    fprintf(stderr, "idle done %d\n", n_state[S_HELD]);
    fflush(stderr);
    hold_phase = 2;
    int64_t t2 = now_ns();
    hold_second_done_t = t2;
    for (int i = 0; i < opt.conns; i++) {
        conn_t *c = &conns[i];
        if (c->state == S_HELD) {
            set_state(c, S_ACTIVE);
            start_batch(c, 1);
        }
    }
    int64_t grace_end = now_ns() + (int64_t)(opt.grace_s * 1e9);
    while (now_ns() < grace_end && outstanding() > 0) handle_events(ms_until(grace_end));
    for (int i = 0; i < opt.conns; i++)
        if (conns[i].state == S_ACTIVE && conns[i].fd >= 0) st.lost++;
    hold_second_s = (double)(hold_second_done_t - t2) / 1e9;
    held_after_setup = held_at_mark;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --port P [--host 127.0.0.1] --workload pingpong|pipeline|connrate|hold\n"
            "               [--conns N] [--duration S] [--warmup S] [--grace S] [--lines N]\n"
            "               [--payload BYTES] [--idle S] [--concurrency N] [--setup-timeout S]\n"
            "               [--ts-any] [--spin] [--src-ips N] [--proxy-header 1|2] [--label TEXT]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0;
    opt.workload = W_PINGPONG;
    opt.conns = 1;
    opt.duration_s = 2.0;
    opt.warmup_s = 0.5;
    opt.grace_s = 5.0;
    opt.idle_s = 3.0;
    opt.setup_timeout_s = 60.0;
    opt.lines = 1000;
    opt.payload = 64;
    opt.concurrency = 64;
    opt.label = "";
    static const struct option longopts[] = {
        {"host", 1, 0, 'h'},    {"port", 1, 0, 'p'},     {"workload", 1, 0, 'w'},      {"conns", 1, 0, 'c'},
        {"duration", 1, 0, 'd'}, {"warmup", 1, 0, 'W'},  {"grace", 1, 0, 'g'},         {"lines", 1, 0, 'l'},
        {"payload", 1, 0, 's'}, {"idle", 1, 0, 'i'},     {"concurrency", 1, 0, 'C'},   {"setup-timeout", 1, 0, 'T'},
        {"ts-any", 0, 0, 'a'},  {"spin", 0, 0, 'S'}, {"src-ips", 1, 0, 'I'},  {"label", 1, 0, 'L'},
        {"proxy-header", 1, 0, 'P'}, {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'w': {
            int found = 0;
            for (int i = 0; i < 4; i++)
                if (!strcmp(optarg, WORKLOAD_NAMES[i])) opt.workload = (enum workload)i, found = 1;
            if (!found) usage();
            break;
        }
        case 'c': opt.conns = atoi(optarg); break;
        case 'd': opt.duration_s = atof(optarg); break;
        case 'W': opt.warmup_s = atof(optarg); break;
        case 'g': opt.grace_s = atof(optarg); break;
        case 'l': opt.lines = atoi(optarg); break;
        case 's': opt.payload = atoi(optarg); break;
        case 'i': opt.idle_s = atof(optarg); break;
        case 'C': opt.concurrency = atoi(optarg); break;
        case 'T': opt.setup_timeout_s = atof(optarg); break;
        case 'a': opt.ts_any = 1; break;
        case 'S': opt.spin = 1; break;
        case 'I': opt.src_ips = atoi(optarg); break;
        case 'L': opt.label = optarg; break;
        case 'P': opt.proxy_header = atoi(optarg); if (opt.proxy_header < 1 || opt.proxy_header > 2) usage(); break;
        default: usage();
        }
    }
    if (port <= 0 || port > 65535 || opt.conns < 1 || opt.conns > 1000000 || opt.payload < 32 || opt.payload > 2048 ||
        opt.lines < 1 || opt.duration_s <= 0 || opt.duration_s > 3600 || opt.concurrency < 1)
        usage();
    opt.addr.sin_family = AF_INET;
    opt.addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &opt.addr.sin_addr) != 1) usage();

    /* enough descriptors for the hold workload */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    getrlimit(RLIMIT_NOFILE, &rl);
    if ((rlim_t)opt.conns + 16 > rl.rlim_cur) {
        fprintf(stderr, "loadgen: %d connections need more descriptors than RLIMIT_NOFILE allows (%llu); raise ulimit -n\n",
                opt.conns, (unsigned long long)rl.rlim_cur);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    line_len = (size_t)opt.payload + 1;
    for (size_t i = 0; i < sizeof alphabet - 1; i++) alphabet[i] = (char)('a' + i % 26);
    uint32_t window = opt.workload == W_PIPELINE ? (uint32_t)opt.lines : 1;
    /* a reply is the payload plus "[" timestamp "] " and "\n"; keep room for a whole batch of them */
    in_cap = opt.workload == W_PIPELINE ? 65536 : (size_t)opt.payload + 1024;
    conns = calloc((size_t)opt.conns, sizeof *conns);
    if (!conns) die("calloc");
    n_state[S_IDLE] = opt.conns;
    for (int i = 0; i < opt.conns; i++) {
        conns[i].fd = -1;
        conns[i].state = S_IDLE;
        conns[i].stamps = malloc(sizeof(int64_t) * window);
        conns[i].out = malloc(line_len * window);
        conns[i].in = malloc(in_cap);
        if (!conns[i].stamps || !conns[i].out || !conns[i].in) die("malloc");
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    next_id = 1;

    if (opt.workload == W_HOLD) run_hold();
    else run_steady();

    double window_s = (t_measure_end != INT64_MAX && t_measure_start != INT64_MAX)
                          ? (double)(t_measure_end - t_measure_start) / 1e9
                          : 0.0;
    int alive = 0;
    for (int i = 0; i < opt.conns; i++) alive += conns[i].fd >= 0;
    uint64_t errors = st.bad_replies + st.closed_early + st.connect_errors + st.lost;

    printf("{\"label\":\"%s\",\"workload\":\"%s\",\"conns\":%d,\"payload_bytes\":%d", opt.label,
           WORKLOAD_NAMES[opt.workload], opt.conns, opt.payload);
    if (opt.workload == W_PIPELINE) printf(",\"lines\":%d", opt.lines);
    if (opt.workload == W_HOLD) {
        printf(",\"setup_s\":%.3f,\"held\":%d,\"survivors\":%d,\"second_round_s\":%.3f,\"idle_s\":%.1f", setup_s,
               held_after_setup, n_state[S_DONE], hold_second_s, opt.idle_s);
    } else {
        printf(",\"duration_s\":%.3f,\"replies\":%llu,\"replies_per_s\":%.1f", window_s, (unsigned long long)st.replies,
               window_s > 0 ? (double)st.replies / window_s : 0.0);
    }
    if (opt.workload == W_PINGPONG || opt.workload == W_PIPELINE)
        printf(",\"setup_s\":%.3f,\"live_conns\":%d", setup_s, alive);
    if (opt.workload == W_CONNRATE)
        printf(",\"connections\":%llu,\"connections_per_s\":%.1f", (unsigned long long)st.conn_done,
               window_s > 0 ? (double)st.conn_done / window_s : 0.0);
    printf(",\"p50_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,\"max_us\":%.1f", hist_pct_us(&lat, 50), hist_pct_us(&lat, 99),
           hist_pct_us(&lat, 99.9), (double)lat.max / 1000.0);
    printf(",\"replies_checked\":%llu,\"errors\":%llu,\"bad_replies\":%llu,\"closed_early\":%llu,\"connect_errors\":%llu,"
           "\"lost\":%llu,\"first_bad\":\"%s\"}\n",
           (unsigned long long)st.replies_total, (unsigned long long)errors, (unsigned long long)st.bad_replies,
           (unsigned long long)st.closed_early, (unsigned long long)st.connect_errors, (unsigned long long)st.lost,
           st.first_bad);
    fflush(stdout);
    for (int i = 0; i < opt.conns; i++)
        if (conns[i].fd >= 0) close(conns[i].fd);
    return 0;
}
