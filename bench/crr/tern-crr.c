/*
 * tern-crr: the TCP connection-rate load generator of ternbench, built at
 * bench time with the machine's cc (bench/crr.go) and used identically on
 * every path.
 *
 *   tern-crr server ADDR PORT
 *   tern-crr client ADDR PORT INFLIGHT OMIT_MS DURATION_MS MAX_CONNS
 *
 * One transaction: the client connects (non-blocking), sends one byte; the
 * server answers one byte and closes; the client reads the byte and
 * aborts with SO_LINGER {1, 0} (RST). Neither side keeps TIME_WAIT, so the
 * client's ports are free again at once and the sockets in play stay
 * bounded by INFLIGHT. One thread per side and epoll: no per-connection
 * thread or runtime cost, so what grows per connection is the kernel's
 * work (the datapath under test) rather than the generator's.
 *
 * The client keeps INFLIGHT connections open at all times, counts those
 * that complete inside the measured window (after OMIT_MS of warm-up, for
 * DURATION_MS), and stops early when it has started MAX_CONNS (a bound on
 * the conntrack entries one sample leaves in the node). It prints:
 *   conns N / errors N / window_s S / total N / cpu_us U / p50_us U /
 *   p99_us U / over_100ms N
 * (total: connections completed over the whole run, warm-up included;
 * cpu_us: the client's CPU time over the run). The server answers until
 * SIGTERM and then prints "answered N" and "server_cpu_us U".
 * A connection that fails or has not completed after 2 s is an error.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HIST_US 100000 /* latency bins of 1 µs; the last one holds the rest */
#define CONN_TIMEOUT_NS 2000000000LL

/* cpu_us is the CPU time this process used, user and system: the system
 * part includes the softirq work (veths, tc programs, netfilter) that ran
 * in its context, which is where a veth's receive path runs for the
 * packets the process sends. */
static double cpu_us(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e6 + (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "tern-crr: %s: %s\n", what, strerror(errno));
	exit(1);
}

static struct sockaddr_in parse_addr(const char *ip, const char *port)
{
	struct sockaddr_in a;
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons((uint16_t)atoi(port));
	if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
		fprintf(stderr, "tern-crr: bad IPv4 address %s\n", ip);
		exit(2);
	}
	return a;
}

static volatile sig_atomic_t stop;

static void on_term(int sig)
{
	(void)sig;
	stop = 1;
}

/* server answers until SIGTERM, then prints "answered N": the connections
 * it answered, which the bench compares with those the client completed. */
static int server(struct sockaddr_in addr)
{
	int one = 1;
	unsigned long long answered = 0;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_term; /* no SA_RESTART: epoll_wait returns EINTR */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	int ln = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (ln < 0)
		die("socket");
	setsockopt(ln, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(ln, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die("bind");
	if (listen(ln, 4096) < 0)
		die("listen");
	int ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1");
	struct epoll_event ev = {.events = EPOLLIN, .data.fd = ln};
	if (epoll_ctl(ep, EPOLL_CTL_ADD, ln, &ev) < 0)
		die("epoll_ctl");
	struct epoll_event evs[256];
	char buf[64];
	while (!stop) {
		int n = epoll_wait(ep, evs, 256, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("epoll_wait");
		}
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (fd == ln) {
				for (;;) {
					int c = accept4(ln, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
					if (c < 0)
						break;
					/* The byte is often there already. */
					ssize_t r = read(c, buf, sizeof(buf));
					if (r > 0) {
						if (write(c, buf, 1) == 1)
							answered++;
						close(c);
						continue;
					}
					if (r == 0 || errno != EAGAIN) {
						close(c);
						continue;
					}
					struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
					if (epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev) < 0)
						close(c);
				}
				continue;
			}
			ssize_t r = read(fd, buf, sizeof(buf));
			if (r < 0 && errno == EAGAIN)
				continue;
			if (r > 0 && write(fd, buf, 1) == 1)
				answered++;
			close(fd); /* also leaves the epoll set */
		}
	}
	printf("answered %llu\nserver_cpu_us %.0f\n", answered, cpu_us());
	return 0;
}

enum { IDLE, CONNECTING, WAITING };

struct slot {
	int fd;
	int state;
	uint64_t t0;
};

static uint64_t hist[HIST_US + 1];

static double percentile(uint64_t total, double p)
{
	uint64_t rank = (uint64_t)((p / 100.0) * (double)total);
	if (rank >= total)
		rank = total - 1;
	uint64_t seen = 0;
	for (int i = 0; i <= HIST_US; i++) {
		seen += hist[i];
		if (seen > rank)
			return (double)i + 0.5;
	}
	return HIST_US;
}

static int client(struct sockaddr_in addr, int inflight, long omit_ms, long dur_ms, long max_conns)
{
	int ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1");
	struct slot *slots = calloc((size_t)inflight, sizeof(*slots));
	struct epoll_event *evs = calloc((size_t)inflight, sizeof(*evs));
	if (!slots || !evs)
		die("calloc");
	uint64_t t_start = now_ns() + (uint64_t)omit_ms * 1000000ull;
	uint64_t t_end = t_start + (uint64_t)dur_ms * 1000000ull;
	uint64_t started = 0, done = 0, total = 0, errors = 0, last_done_ns = 0;
	struct linger lg = {.l_onoff = 1, .l_linger = 0};
	char b = 'x';

	/* FAIL closes a slot's socket and counts an error. */
#define FAIL(s)                                                                \
	do {                                                                   \
		close((s)->fd);                                                \
		(s)->state = IDLE;                                             \
		errors++;                                                      \
	} while (0)
	for (;;) {
		uint64_t now = now_ns();
		int active = 0;
		for (int i = 0; i < inflight; i++) {
			struct slot *s = &slots[i];
			if (s->state != IDLE && now - s->t0 > CONN_TIMEOUT_NS)
				FAIL(s);
			if (s->state == IDLE && now < t_end && started < (uint64_t)max_conns) {
				int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
				if (fd < 0)
					die("socket");
				setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
				s->fd = fd;
				s->t0 = now_ns();
				started++;
				if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 && errno != EINPROGRESS) {
					FAIL(s);
					usleep(1000);
					continue;
				}
				s->state = CONNECTING;
				struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)i};
				if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
					die("epoll_ctl");
			}
			if (s->state != IDLE)
				active++;
		}
		if (active == 0)
			break;
		int n = epoll_wait(ep, evs, inflight, 100);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("epoll_wait");
		}
		for (int k = 0; k < n; k++) {
			struct slot *s = &slots[evs[k].data.u32];
			if (s->state == CONNECTING) {
				int err = 0;
				socklen_t len = sizeof(err);
				getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
				if (err != 0 || write(s->fd, &b, 1) != 1) {
					FAIL(s);
					usleep(1000);
					continue;
				}
				s->state = WAITING;
				struct epoll_event ev = {.events = EPOLLIN, .data.u32 = evs[k].data.u32};
				epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
			} else if (s->state == WAITING) {
				char r;
				ssize_t got = read(s->fd, &r, 1);
				if (got < 0 && errno == EAGAIN)
					continue;
				if (got != 1) {
					FAIL(s);
					continue;
				}
				uint64_t t1 = now_ns();
				close(s->fd); /* SO_LINGER {1, 0}: RST, no TIME_WAIT */
				s->state = IDLE;
				total++;
				if (t1 >= t_start && t1 <= t_end) {
					uint64_t us = (t1 - s->t0) / 1000;
					hist[us > HIST_US ? HIST_US : us]++;
					done++;
					last_done_ns = t1;
				}
			}
		}
	}
	/* The window is cut short when MAX_CONNS ended the run early. */
	double window = (double)dur_ms / 1000.0;
	if (started >= (uint64_t)max_conns && last_done_ns > t_start && last_done_ns < t_end)
		window = (double)(last_done_ns - t_start) / 1e9;
	printf("conns %llu\nerrors %llu\nwindow_s %.6f\ntotal %llu\ncpu_us %.0f\n", (unsigned long long)done,
	       (unsigned long long)errors, window, (unsigned long long)total, cpu_us());
	if (done > 0)
		printf("p50_us %.1f\np99_us %.1f\nover_100ms %llu\n", percentile(done, 50), percentile(done, 99),
		       (unsigned long long)hist[HIST_US]);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && strcmp(argv[1], "server") == 0)
		return server(parse_addr(argv[2], argv[3]));
	if (argc == 8 && strcmp(argv[1], "client") == 0) {
		int inflight = atoi(argv[4]);
		if (inflight < 1 || inflight > 4096) {
			fprintf(stderr, "tern-crr: INFLIGHT must be 1..4096\n");
			return 2;
		}
		return client(parse_addr(argv[2], argv[3]), inflight, atol(argv[5]), atol(argv[6]), atol(argv[7]));
	}
	fprintf(stderr, "usage: tern-crr server ADDR PORT\n"
			"       tern-crr client ADDR PORT INFLIGHT OMIT_MS DURATION_MS MAX_CONNS\n");
	return 2;
}
