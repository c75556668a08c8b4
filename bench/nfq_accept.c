/* nfq_accept: the C reference consumer. libnetfilter_queue, accept every packet.
 *
 *   nfq_accept QUEUE [--batch]
 *
 * Without --batch: one verdict message per packet (what most C consumers do).
 * With --batch: drain what is queued (up to 256 messages), then one batch
 * verdict up to the last id, the same scheme as ipqd's worker.
 * Runs until SIGTERM or SIGINT.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include <linux/netfilter.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define DRAIN_MAX 256

static volatile sig_atomic_t stop;
static int batch;
static uint32_t last_id;
static int pending;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa, void *data)
{
    struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
    uint32_t id;

    (void)msg;
    (void)data;
    if (!ph)
        return 0;
    id = ntohl(ph->packet_id);
    if (batch) {
        last_id = id;
        pending = 1;
        return 0;
    }
    return nfq_set_verdict(qh, id, NF_ACCEPT, 0, NULL);
}

int main(int argc, char **argv)
{
    static char buf[1 << 17] __attribute__((aligned));
    struct nfq_handle *h;
    struct nfq_q_handle *qh;
    struct sigaction sa;
    int fd, queue;

    if (argc < 2) {
        fprintf(stderr, "usage: nfq_accept QUEUE [--batch]\n");
        return 2;
    }
    queue = atoi(argv[1]);
    batch = argc > 2 && !strcmp(argv[2], "--batch");
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;      /* no SA_RESTART: recv returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    h = nfq_open();
    if (!h) {
        perror("nfq_open");
        return 1;
    }
    qh = nfq_create_queue(h, queue, on_packet, NULL);
    if (!qh) {
        perror("nfq_create_queue");
        return 1;
    }
    if (nfq_set_mode(qh, NFQNL_COPY_PACKET, 0xffff) < 0) {
        perror("nfq_set_mode");
        return 1;
    }
    fd = nfq_fd(h);
    printf("ready\n");
    fflush(stdout);
    while (!stop) {
        int n = recv(fd, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EINTR || errno == ENOBUFS)
                continue;
            perror("recv");
            break;
        }
        nfq_handle_packet(h, buf, n);
        if (!batch)
            continue;
        for (int i = 0; i < DRAIN_MAX; i++) {
            n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
            if (n < 0)
                break;
            nfq_handle_packet(h, buf, n);
        }
        if (pending) {
            nfq_set_verdict_batch(qh, last_id, NF_ACCEPT);
            pending = 0;
        }
    }
    nfq_destroy_queue(qh);
    nfq_close(h);
    return 0;
}
