// l4lb's kernel data path: VIP translation at the socket layer (cgroup/sock_addr hooks).
//
// connect4/6 give TCP and connected UDP sockets to a VIP:port a backend's address once, so every
// packet after that goes straight to the backend; sendmsg4/6 do it per datagram for unconnected
// UDP; recvmsg4/6 and getpeername4/6 show the VIP again to the application, from the reverse
// table written at translation time (keyed by socket cookie + backend). sockets.bpf.c (a
// separate object: its kfunc needs a GPL-compatible license) closes the sockets translated to
// a backend that is gone, found through `revnat`.
//
// Maps (their Rust side: src/agent/bpf/layout.rs, checked against this object's BTF by a test):
//   services  VIP (16-byte address, IPv4 as ::ffff:a.b.c.d; port; protocol) -> (count, set)
//   backends  (set, slot) -> backend address, port, counter index
//   revnat    LRU (socket cookie, backend) -> VIP, for recvmsg/getpeername and sockets.bpf.c
//   counters  per-CPU, by counter index: connections, datagrams
// Userspace writes a changed VIP's active backends as a new set, then switches the service
// entry to it in one update; a VIP with no service entry is left alone (the proxy listener on
// the VIP address still serves it).
//
// Build: scripts/build-bpf.sh (clang -O2 -g -target bpf, then llvm-strip -g: DWARF goes, BTF
// stays); the object is committed beside this file and scripts/check.sh rebuilds and compares.
// Only helpers that are not GPL-only are used, so the project's license is declared.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "shared.h"

#define MAX_SERVICES 65536
#define MAX_BACKENDS 262144
#define MAX_COUNTERS 65536

/* What a cgroup sock_addr program returns: go on with the (possibly rewritten) call, or fail
 * it with EPERM. l4lb never refuses a call: what it does not translate goes where it was sent. */
enum verdict {
	VERDICT_REJECT = 0,
	VERDICT_PROCEED = 1,
};

struct svc_val {
	__u32 count;   /* active backends in the set, > 0 */
	__u32 set;     /* backend set id */
};

struct be_key {
	__u32 set;
	__u32 slot;
};

struct be_val {
	__u32 ip[4];
	__u16 port;
	__u16 pad;
	__u32 counter; /* index into counters */
};

struct counters {
	__u64 conns;
	__u64 datagrams;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* replaced entries are freed after RCU */
	__type(key, struct svc_key);
	__type(value, struct svc_val);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BACKENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct be_key);
	__type(value, struct be_val);
} backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_COUNTERS);
	__type(key, __u32);
	__type(value, struct counters);
} counters SEC(".maps");

/* 0: act on every socket; otherwise only on sockets of the network namespace with this cookie. */
const volatile __u64 netns_cookie = 0;

static __always_inline int in_scope(struct bpf_sock_addr *ctx)
{
	return netns_cookie == 0 || bpf_get_netns_cookie(ctx) == netns_cookie;
}

static __always_inline int is_v4mapped(const __u32 *ip)
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0xffff);
}

static __always_inline int same_ip(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* The backend for `key`, uniform among the set's active backends; NULL when not a VIP. */
static __always_inline struct be_val *pick(struct svc_key *key)
{
	struct svc_val *svc = bpf_map_lookup_elem(&services, key);
	if (!svc)
		return NULL;
	__u32 count = svc->count;
	if (count == 0)
		return NULL;
	struct be_key bk = { .set = svc->set, .slot = bpf_get_prandom_u32() % count };
	return bpf_map_lookup_elem(&backends, &bk);
}

/* Record that this socket's `be` stands for `vip`, unless it already says so: a connected or
 * unconnected UDP socket comes here for every datagram, and the lookup spares it a write. */
static __always_inline void remember(struct bpf_sock_addr *ctx, const struct be_val *be,
				     const struct svc_key *vip)
{
	struct nat_key nk = { .cookie = bpf_get_socket_cookie(ctx), .port = be->port };
	__builtin_memcpy(nk.ip, be->ip, sizeof(nk.ip));
	struct nat_val *old = bpf_map_lookup_elem(&revnat, &nk);
	if (old && old->port == vip->port && same_ip(old->ip, vip->ip))
		return;
	struct nat_val nv = { .port = vip->port };
	__builtin_memcpy(nv.ip, vip->ip, sizeof(nv.ip));
	bpf_map_update_elem(&revnat, &nk, &nv, BPF_ANY);
}

static __always_inline void count(const struct be_val *be, int datagram)
{
	__u32 idx = be->counter;
	struct counters *c = bpf_map_lookup_elem(&counters, &idx);
	if (!c)
		return;
	if (datagram)
		c->datagrams++;
	else
		c->conns++;
}

static __always_inline int wanted(struct bpf_sock_addr *ctx, int udp_only)
{
	__u32 proto = ctx->protocol;
	if (proto != IPPROTO_UDP && (udp_only || proto != IPPROTO_TCP))
		return 0;
	return in_scope(ctx);
}

static __always_inline int translate4(struct bpf_sock_addr *ctx, int datagram)
{
	if (!wanted(ctx, datagram))
		return VERDICT_PROCEED;
	struct svc_key key = { .port = (__u16)ctx->user_port, .proto = (__u8)ctx->protocol };
	set_v4mapped(key.ip, ctx->user_ip4);
	struct be_val *be = pick(&key);
	/* An IPv6 backend cannot take an IPv4 socket: the proxy listener serves it. */
	if (!be || !is_v4mapped(be->ip))
		return VERDICT_PROCEED;
	ctx->user_ip4 = be->ip[3];
	ctx->user_port = be->port;
	remember(ctx, be, &key);
	count(be, datagram);
	return VERDICT_PROCEED;
}

static __always_inline int translate6(struct bpf_sock_addr *ctx, int datagram)
{
	if (!wanted(ctx, datagram))
		return VERDICT_PROCEED;
	struct svc_key key = { .port = (__u16)ctx->user_port, .proto = (__u8)ctx->protocol };
	/* The context's fields are loaded one 4-byte word at a time (the verifier allows no
	 * other access to them), so these are copies by word, not __builtin_memcpy. */
	key.ip[0] = ctx->user_ip6[0];
	key.ip[1] = ctx->user_ip6[1];
	key.ip[2] = ctx->user_ip6[2];
	key.ip[3] = ctx->user_ip6[3];
	struct be_val *be = pick(&key);
	if (!be)
		return VERDICT_PROCEED;
	ctx->user_ip6[0] = be->ip[0];
	ctx->user_ip6[1] = be->ip[1];
	ctx->user_ip6[2] = be->ip[2];
	ctx->user_ip6[3] = be->ip[3];
	ctx->user_port = be->port;
	remember(ctx, be, &key);
	count(be, datagram);
	return VERDICT_PROCEED;
}

/* The VIP this socket's peer `nk` stands for, if the kernel path still serves that VIP. An
 * entry for a VIP that lost its service entry is stale: deleted, and the peer shown as it is. */
static __always_inline struct nat_val *reverse_lookup(struct nat_key *nk, __u8 proto)
{
	struct nat_val *nv = bpf_map_lookup_elem(&revnat, nk);
	if (!nv)
		return NULL;
	struct svc_key vip = { .port = nv->port, .proto = proto };
	__builtin_memcpy(vip.ip, nv->ip, sizeof(vip.ip));
	if (!bpf_map_lookup_elem(&services, &vip)) {
		bpf_map_delete_elem(&revnat, nk);
		return NULL;
	}
	return nv;
}

/* Show the VIP instead of the backend the socket talks to (recvmsg source, getpeername). */
static __always_inline int reverse4(struct bpf_sock_addr *ctx)
{
	if (!in_scope(ctx))
		return VERDICT_PROCEED;
	struct nat_key nk = { .cookie = bpf_get_socket_cookie(ctx), .port = (__u16)ctx->user_port };
	set_v4mapped(nk.ip, ctx->user_ip4);
	struct nat_val *nv = reverse_lookup(&nk, (__u8)ctx->protocol);
	if (nv && is_v4mapped(nv->ip)) {
		ctx->user_ip4 = nv->ip[3];
		ctx->user_port = nv->port;
	}
	return VERDICT_PROCEED;
}

static __always_inline int reverse6(struct bpf_sock_addr *ctx)
{
	if (!in_scope(ctx))
		return VERDICT_PROCEED;
	struct nat_key nk = { .cookie = bpf_get_socket_cookie(ctx), .port = (__u16)ctx->user_port };
	nk.ip[0] = ctx->user_ip6[0];
	nk.ip[1] = ctx->user_ip6[1];
	nk.ip[2] = ctx->user_ip6[2];
	nk.ip[3] = ctx->user_ip6[3];
	struct nat_val *nv = reverse_lookup(&nk, (__u8)ctx->protocol);
	if (nv) {
		ctx->user_ip6[0] = nv->ip[0];
		ctx->user_ip6[1] = nv->ip[1];
		ctx->user_ip6[2] = nv->ip[2];
		ctx->user_ip6[3] = nv->ip[3];
		ctx->user_port = nv->port;
	}
	return VERDICT_PROCEED;
}

SEC("cgroup/connect4")
int l4lb_connect4(struct bpf_sock_addr *ctx) { return translate4(ctx, 0); }

SEC("cgroup/connect6")
int l4lb_connect6(struct bpf_sock_addr *ctx) { return translate6(ctx, 0); }

SEC("cgroup/sendmsg4")
int l4lb_sendmsg4(struct bpf_sock_addr *ctx) { return translate4(ctx, 1); }

SEC("cgroup/sendmsg6")
int l4lb_sendmsg6(struct bpf_sock_addr *ctx) { return translate6(ctx, 1); }

SEC("cgroup/recvmsg4")
int l4lb_recvmsg4(struct bpf_sock_addr *ctx) { return reverse4(ctx); }

SEC("cgroup/recvmsg6")
int l4lb_recvmsg6(struct bpf_sock_addr *ctx) { return reverse6(ctx); }

SEC("cgroup/getpeername4")
int l4lb_getpeername4(struct bpf_sock_addr *ctx) { return reverse4(ctx); }

SEC("cgroup/getpeername6")
int l4lb_getpeername6(struct bpf_sock_addr *ctx) { return reverse6(ctx); }

char LICENSE[] SEC("license") = "Apache-2.0";
