// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
//
// What l4lb.bpf.c and sockets.bpf.c share: the service key, the reverse-NAT entries and the
// `revnat` map (defined in both objects with this one layout; the loader hands sockets.bpf.c
// the map l4lb.bpf.c created), and the IPv4-mapped address form both use. Offered under
// GPL-2.0 or BSD-2-Clause, as sockets.bpf.c, so that both objects can include it.

#ifndef L4LB_SHARED_H
#define L4LB_SHARED_H

#define MAX_REVNAT 65536

struct svc_key {
	__u32 ip[4];   /* network order; IPv4 as ::ffff:a.b.c.d */
	__u16 port;    /* network order */
	__u8 proto;    /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 pad;
};

struct nat_key {
	__u64 cookie;
	__u32 ip[4];   /* backend */
	__u16 port;
	__u16 pad[3];
};

struct nat_val {
	__u32 ip[4];   /* VIP */
	__u16 port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_REVNAT);
	__type(key, struct nat_key);
	__type(value, struct nat_val);
} revnat SEC(".maps");

static __always_inline void set_v4mapped(__u32 *ip, __u32 v4)
{
	ip[0] = 0;
	ip[1] = 0;
	ip[2] = bpf_htonl(0xffff);
	ip[3] = v4;
}

#endif
