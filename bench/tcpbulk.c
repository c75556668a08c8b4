/* tcpbulk: one TCP bulk transfer, for the flow offload benchmark.
 *
 *   tcpbulk recv --port P                      accept one connection, read to EOF
 *   tcpbulk send --dst A --port P --duration S  send for S seconds, then close
 *
 * The receiver prints one JSON object on stdout: bytes, seconds (first byte
 * to EOF) and mbit_s. Throughput is measured where the data arrives.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static int receive(int port)
{
    int one = 1, listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    static char buf[CHUNK];
    if (listener < 0)
        die("socket");
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 1))
        die("bind/listen");
    printf("{\"listening\": %d}\n", port);   /* the caller waits for this line */
    fflush(stdout);
    int conn = accept(listener, NULL, NULL);
    if (conn < 0)
        die("accept");
    long long total = 0;
    double first = 0, last = 0;
    for (;;) {
        ssize_t n = read(conn, buf, sizeof buf);
        if (n < 0)
            die("read");
        if (n == 0)
            break;
        last = now();
        if (!total)
            first = last;
        total += n;
    }
    double seconds = last > first ? last - first : 0;
    printf("{\"bytes\": %lld, \"seconds\": %.6f, \"mbit_s\": %.1f}\n", total, seconds,
           seconds ? total * 8 / seconds / 1e6 : 0.0);
    return 0;
}

static int send_for(const char *dst, int port, double duration)
{
    int sock = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    static char buf[CHUNK];
    if (sock < 0)
        die("socket");
    if (inet_pton(AF_INET, dst, &addr.sin_addr) != 1)
        die("inet_pton");
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr))
        die("connect");
    memset(buf, 'x', sizeof buf);
    double end = now() + duration;
    while (now() < end)
        if (write(sock, buf, sizeof buf) < 0)
            die("write");
    close(sock);
    return 0;
}

int main(int argc, char **argv)
{
    const char *dst = "127.0.0.1";
    int port = 9100;
    double duration = 3;
    if (argc < 2)
        goto usage;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--dst"))
            dst = argv[i + 1];
        else if (!strcmp(argv[i], "--port"))
            port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--duration"))
            duration = atof(argv[i + 1]);
        else
            goto usage;
    }
    if (!strcmp(argv[1], "recv"))
        return receive(port);
    if (!strcmp(argv[1], "send"))
        return send_for(dst, port, duration);
usage:
    fprintf(stderr, "usage: tcpbulk recv --port P | send --dst A --port P --duration S\n");
    return 2;
}
