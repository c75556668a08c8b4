/* udpblast: UDP sender and receiver in one process, for the queue benchmark.
 *
 *   udpblast closed  --duration S [--window W]   lossless closed loop: packets/s
 *   udpblast flood   --duration S                open loop: sent vs received
 *   udpblast latency --duration S | --count N    one packet in flight: RTT
 *                    [--warmup S]                 (round trips in the first S s not recorded)
 *
 * Common options: --dst A (127.0.0.1) --port P (9000) --size BYTES (64: the IP
 * packet) --sources N (1: senders bound to 127.0.0.10, .11, ... so that
 * --queue-balance, which hashes addresses, spreads them) --spread BITS (0: with
 * BITS > 0 every packet comes from a new flow: a raw socket writes the IP and
 * UDP headers, the source address walks 2^BITS addresses of 127.64.0.0/10 and
 * the source port 1024-65535, so no two packets of a run share a flow until
 * the walk wraps).
 * Prints one JSON object on stdout.
 *
 * One thread does both ends: the sender never races the receiver for a CPU
 * of its own, and the window is exact (sent - received).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_SOURCES 64
#define IP_UDP_HEADERS 28
#define STALL_NS 200000000LL   /* a window that does not move for this long lost packets */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "udpblast: %s: %s\n", what, strerror(errno));
    exit(2);
}

struct blast {
    int rx;
    int tx[MAX_SOURCES];
    int sources;
    int raw;                    /* --spread: the raw socket, else -1 */
    uint32_t spread_mask, next_flow;
    struct sockaddr_in dst;
    size_t payload;
    uint64_t sent, received, lost, send_errors;
};

static void setup(struct blast *b, const char *dst, int port, int size, int sources,
                  int spread)
{
    int big = 8 << 20;
    struct sockaddr_in addr;

    memset(&b->dst, 0, sizeof b->dst);
    b->dst.sin_family = AF_INET;
    b->dst.sin_port = htons(port);
    if (inet_pton(AF_INET, dst, &b->dst.sin_addr) != 1) {
        fprintf(stderr, "udpblast: bad address %s\n", dst);
        exit(2);
    }
    b->payload = size > IP_UDP_HEADERS ? (size_t)(size - IP_UDP_HEADERS) : 8;
    if (b->payload < 8)
        b->payload = 8;
    b->rx = socket(AF_INET, SOCK_DGRAM, 0);
    if (b->rx < 0)
        die("socket");
    /* Root: past rmem_max, so the receiver never drops what the queue passed. */
    if (setsockopt(b->rx, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big) < 0)
        setsockopt(b->rx, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (bind(b->rx, (struct sockaddr *)&b->dst, sizeof b->dst) < 0)
        die("bind receiver");
    b->sources = sources;
    b->raw = -1;
    if (spread > 0) {
        b->raw = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);    /* implies IP_HDRINCL */
        if (b->raw < 0)
            die("raw socket");
        setsockopt(b->raw, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big);
        b->spread_mask = (1u << spread) - 1;
        b->sources = 0;
        return;
    }
    for (int i = 0; i < sources; i++) {
        b->tx[i] = socket(AF_INET, SOCK_DGRAM, 0);
        if (b->tx[i] < 0)
            die("socket");
        setsockopt(b->tx[i], SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big);
        memset(&addr, 0, sizeof addr);
        addr.sin_family = AF_INET;
        addr.sin_addr.s_addr = htonl(0x7f00000a + i);   /* 127.0.0.10 + i */
        if (bind(b->tx[i], (struct sockaddr *)&addr, sizeof addr) < 0)
            die("bind sender");
    }
}

/* Send up to n packets; returns how many left. Each carries its send time. */
static int send_some(struct blast *b, int n)
{
    static char bufs[BATCH][2048];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    int64_t t = now_ns();
    int done;
    static unsigned next_source;
    int sock = b->raw >= 0 ? b->raw : b->tx[next_source++ % b->sources];
    size_t head = b->raw >= 0 ? sizeof(struct iphdr) + sizeof(struct udphdr) : 0;

    if (n > BATCH)
        n = BATCH;
    memset(msgs, 0, sizeof(msgs[0]) * n);
    for (int i = 0; i < n; i++) {
        if (head) {
            /* A new flow: the next source address and port (a stride that
             * is odd, so the walk visits every address before it repeats). */
            struct iphdr *ip = (struct iphdr *)bufs[i];
            struct udphdr *udp = (struct udphdr *)(bufs[i] + sizeof *ip);
            uint32_t flow = b->next_flow++;
            memset(ip, 0, head);
            ip->version = 4;
            ip->ihl = 5;
            ip->ttl = 64;
            ip->protocol = IPPROTO_UDP;
            ip->tot_len = htons(head + b->payload);      /* the kernel fills id and checksum */
            ip->saddr = htonl(0x7f400000u | ((flow * 2654435761u) & b->spread_mask & 0x3fffff));
            ip->daddr = b->dst.sin_addr.s_addr;
            udp->source = htons(1024 + flow % 64512);
            udp->dest = b->dst.sin_port;
            udp->len = htons(sizeof *udp + b->payload);  /* checksum 0: none (IPv4) */
        }
        memcpy(bufs[i] + head, &t, sizeof t);
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = head + b->payload;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &b->dst;
        msgs[i].msg_hdr.msg_namelen = sizeof b->dst;
    }
    done = sendmmsg(sock, msgs, n, MSG_DONTWAIT);
    if (done < 0) {
        if (errno != EAGAIN && errno != EINTR)
            b->send_errors++;
        return 0;
    }
    b->sent += done;
    return done;
}

/* Receive what is waiting; stores the send time of the last one in *stamp. */
static int recv_some(struct blast *b, int flags, int64_t *stamp)
{
    static char bufs[BATCH][2048];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    int got;

    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof bufs[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    got = recvmmsg(b->rx, msgs, BATCH, flags, NULL);
    if (got <= 0)
        return 0;
    if (stamp)
        memcpy(stamp, bufs[got - 1], sizeof *stamp);
    b->received += got;
    return got;
}

static int wait_rx(struct blast *b, int ms)
{
    struct pollfd p = { .fd = b->rx, .events = POLLIN };
    return poll(&p, 1, ms) > 0;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static void closed_loop(struct blast *b, double duration, int window)
{
    int64_t start = now_ns(), end = start + (int64_t)(duration * 1e9), last_move = start, t;

    while ((t = now_ns()) < end) {
        uint64_t inflight = b->sent - b->received - b->lost;
        int moved = 0;
        if (inflight < (uint64_t)window)
            moved += send_some(b, window - (int)inflight);
        moved += recv_some(b, MSG_DONTWAIT, NULL);
        if (moved) {
            last_move = t;
            continue;
        }
        if (!wait_rx(b, 50) && now_ns() - last_move > STALL_NS) {
            b->lost += b->sent - b->received - b->lost;   /* give up on them */
            last_move = now_ns();
        }
    }
    t = now_ns();
    printf("{\"mode\": \"closed\", \"seconds\": %.6f, \"sent\": %lu, \"received\": %lu, "
           "\"lost\": %lu, \"pps\": %.1f, \"window\": %d, \"send_errors\": %lu}\n",
           (t - start) / 1e9, b->sent, b->received, b->lost,
           b->received / ((t - start) / 1e9), window, b->send_errors);
}

static void flood(struct blast *b, double duration)
{
    int64_t start = now_ns(), end = start + (int64_t)(duration * 1e9), t, quiet;

    while (now_ns() < end) {
        send_some(b, BATCH);
        recv_some(b, MSG_DONTWAIT, NULL);
    }
    t = now_ns();
    /* What the queue still holds arrives after the last send. */
    quiet = now_ns();
    while (now_ns() - quiet < 300000000LL) {
        if (wait_rx(b, 50) && recv_some(b, MSG_DONTWAIT, NULL))
            quiet = now_ns();
    }
    printf("{\"mode\": \"flood\", \"seconds\": %.6f, \"sent\": %lu, \"received\": %lu, "
           "\"sent_pps\": %.1f, \"received_pps\": %.1f, \"send_errors\": %lu}\n",
           (t - start) / 1e9, b->sent, b->received, b->sent / ((t - start) / 1e9),
           b->received / ((t - start) / 1e9), b->send_errors);
}

static void latency(struct blast *b, double duration, long count, double warmup)
{
    long cap = count > 0 ? count : 2000000, n = 0;
    int64_t *rtt = malloc(sizeof(int64_t) * cap), *at = malloc(sizeof(int64_t) * cap);
    int64_t start = now_ns(), end = start + (int64_t)(duration * 1e9), t, stamp;
    int64_t worst = 0, worst_at = 0;

    if (!rtt || !at)
        die("malloc");
    while (n < cap && (count > 0 || now_ns() < end)) {
        uint64_t before = b->received;
        t = now_ns();
        if (send_some(b, 1) != 1)
            continue;
        while (b->received == before) {
            if (!wait_rx(b, 1000)) {
                b->lost++;
                break;
            }
            recv_some(b, MSG_DONTWAIT, &stamp);
        }
        if (b->received == before || t - start < (int64_t)(warmup * 1e9))
            continue;
        rtt[n] = now_ns() - t;
        at[n] = t - start;
        if (rtt[n] > worst) {
            worst = rtt[n];
            worst_at = at[n];
        }
        n++;
    }
    qsort(rtt, n, sizeof *rtt, cmp_i64);
    printf("{\"mode\": \"latency\", \"samples\": %ld, \"lost\": %lu, \"median_us\": %.2f, "
           "\"p99_us\": %.2f, \"max_us\": %.2f, \"max_at_s\": %.3f}\n",
           n, b->lost, n ? rtt[n / 2] / 1e3 : 0.0, n ? rtt[(long)(n * 0.99)] / 1e3 : 0.0,
           n ? rtt[n - 1] / 1e3 : 0.0, worst_at / 1e9);
    free(rtt);
    free(at);
}

int main(int argc, char **argv)
{
    const char *mode, *dst = "127.0.0.1";
    int port = 9000, size = 64, sources = 1, window = 256, spread = 0;
    double duration = 2.0, warmup = 0.0;
    long count = 0;
    struct blast b;

    if (argc < 2) {
        fprintf(stderr, "usage: udpblast closed|flood|latency [options]\n");
        return 2;
    }
    mode = argv[1];
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--dst")) dst = argv[i + 1];
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--size")) size = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--sources")) sources = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--spread")) spread = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--window")) window = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--duration")) duration = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--count")) count = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--warmup")) warmup = atof(argv[i + 1]);
        else {
            fprintf(stderr, "udpblast: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (sources < 1 || sources > MAX_SOURCES) {
        fprintf(stderr, "udpblast: --sources must be 1..%d\n", MAX_SOURCES);
        return 2;
    }
    if (spread < 0 || spread > 22) {
        fprintf(stderr, "udpblast: --spread must be 0..22 (127.64.0.0/10)\n");
        return 2;
    }
    memset(&b, 0, sizeof b);
    setup(&b, dst, port, size, sources, spread);
    if (!strcmp(mode, "closed"))
        closed_loop(&b, duration, window);
    else if (!strcmp(mode, "flood"))
        flood(&b, duration);
    else if (!strcmp(mode, "latency"))
        latency(&b, duration, count, warmup);
    else {
        fprintf(stderr, "udpblast: unknown mode %s\n", mode);
        return 2;
    }
    return 0;
}
