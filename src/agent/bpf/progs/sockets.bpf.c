// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
//
// Socket iterators that close what l4lb's kernel path sent to a backend that is gone.
//
// iter/udp and iter/tcp walk the sockets of the reader's network namespace. A connected socket
// whose (cookie, peer) has an entry in `revnat` was translated by l4lb.bpf.c's connect
// program from a VIP to that peer; when userspace has put that (VIP, backend) pair in
// `destroy`, the socket is destroyed with bpf_sock_destroy(): the application gets
// ECONNABORTED and reconnects through the VIP. A socket connected to the backend directly has
// no `revnat` entry and is left alone. One byte goes to the reader per socket destroyed.
//
// This is a separate object because the kernel lets only GPL-compatible programs call a
// kfunc (and bpf_seq_write() is GPL-only): this file is offered under GPL-2.0 or BSD-2-Clause
// (the license declared below), the rest of l4lb under its own license.
//
// Maps (their Rust side: src/agent/bpf/layout.rs, checked against this object's BTF by a test):
//   revnat    l4lb.bpf.c's map, reused by the loader (one layout, in shared.h)
//   destroy   (VIP, backend) -> 1: the pairs whose sockets the next run closes
//
// Build: scripts/build-bpf.sh, as l4lb.bpf.c.

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "shared.h"

#define MAX_DESTROY 65536

struct destroy_key {
	struct svc_key vip;
	__u32 ip[4];   /* backend */
	__u16 port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_DESTROY);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct destroy_key);
	__type(value, __u8);
} destroy SEC(".maps");

/* The kernel types below hold only the fields read; their offsets come
 * from the running kernel's BTF (CO-RE relocations, applied by the loader). */
#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)
struct seq_file;
struct bpf_iter_meta {
	struct seq_file *seq;
};
struct sock_common {
	__be32 skc_daddr;
	__be16 skc_dport;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr skc_v6_daddr;
};
struct udp_sock;
struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
};
struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
};
#pragma clang attribute pop

#define AF_INET 2
#define AF_INET6 10
/* skc_state values (include/net/tcp_states.h): a connected UDP socket is ESTABLISHED; TCP
 * TIME_WAIT and NEW_SYN_RECV entries are not full sockets and are left alone. */
#define TCP_ESTABLISHED 1
#define TCP_TIME_WAIT 6
#define TCP_NEW_SYN_RECV 12

/* bpf_sock_destroy() is a kfunc: the loader this project uses does not resolve `__ksym`
 * externs, so the call is written as a call of this placeholder helper id, which the loader
 * rewrites into a kfunc call of the kernel's BTF id for bpf_sock_destroy before loading
 * (src/agent/bpf/object.rs, KFUNC_PLACEHOLDER). */
#define KFUNC_SOCK_DESTROY 0x7a00
static long (*const sock_destroy)(struct sock_common *sk) = (void *)KFUNC_SOCK_DESTROY;

/* Destroy `sk` if this program translated its peer as a VIP whose (VIP, backend) pair is in
 * `destroy`; one byte goes to the reader per socket destroyed. */
static __always_inline int destroy_if_gone(struct bpf_iter_meta *meta, struct sock_common *sk,
					   __u8 proto)
{
	struct nat_key nk = { .cookie = bpf_get_socket_cookie(sk), .port = sk->skc_dport };
	unsigned short family = sk->skc_family;
	if (family == AF_INET)
		set_v4mapped(nk.ip, sk->skc_daddr);
	else if (family == AF_INET6)
		__builtin_memcpy(nk.ip, &sk->skc_v6_daddr, sizeof(nk.ip));
	else
		return 0;
	struct nat_val *nv = bpf_map_lookup_elem(&revnat, &nk);
	if (!nv)
		return 0; /* not a socket this program sent to a backend */
	struct destroy_key dk = { .vip = { .port = nv->port, .proto = proto }, .port = nk.port };
	__builtin_memcpy(dk.vip.ip, nv->ip, sizeof(dk.vip.ip));
	__builtin_memcpy(dk.ip, nk.ip, sizeof(dk.ip));
	if (!bpf_map_lookup_elem(&destroy, &dk))
		return 0;
	if (sock_destroy(sk) == 0) {
		char one = 1;
		bpf_seq_write(meta->seq, &one, sizeof(one));
	}
	return 0;
}

SEC("iter/udp")
int l4lb_iter_udp(struct bpf_iter__udp *ctx)
{
	struct sock_common *sk = (struct sock_common *)ctx->udp_sk;
	if (!sk || sk->skc_state != TCP_ESTABLISHED)
		return 0; /* only connected sockets have a peer */
	return destroy_if_gone(ctx->meta, sk, IPPROTO_UDP);
}

SEC("iter/tcp")
int l4lb_iter_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *sk = ctx->sk_common;
	if (!sk)
		return 0;
	unsigned char state = sk->skc_state;
	if (state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV)
		return 0;
	return destroy_if_gone(ctx->meta, sk, IPPROTO_TCP);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
