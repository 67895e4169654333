/*
 * bench_server.h: what the benchmark's C reference servers share: more file
 * descriptors, and the loopback listener that prints the `listening on` line
 * run.py reads. Header-only (static functions): each server is one gcc call.
 */
#ifndef BENCH_SERVER_H
#define BENCH_SERVER_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/socket.h>

/* Raise RLIMIT_NOFILE's soft limit to the hard one (the hold workload keeps 10,000 connections). */
static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/*
 * Listen on 127.0.0.1:port (0: any free port) with socket() flags *flags*, print
 * `listening on 127.0.0.1:PORT` to stdout; the listening fd, or -1 after perror(who).
 */
static int listen_loopback(int port, int flags, const char *who) {
    int lfd = socket(AF_INET, SOCK_STREAM | flags, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, SOMAXCONN) < 0) {
        perror(who);
        return -1;
    }
    socklen_t alen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &alen);
    printf("listening on 127.0.0.1:%d\n", ntohs(addr.sin_port));
    fflush(stdout);
    return lfd;
}

#endif
