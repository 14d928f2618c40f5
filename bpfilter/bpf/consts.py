"""Kernel constants of the bpf(2) interface, as named in include/uapi/linux/bpf.h.

Debian's headers are older than the running kernel (no tcx, no netfilter programs), so these are
kept here and checked against /sys/kernel/btf/vmlinux by the test suite.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

SYS_BPF = 321  # x86_64


class Cmd(IntEnum):
    """bpf(2) commands."""

    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    PROG_LOAD = 5
    OBJ_PIN = 6
    OBJ_GET = 7
    PROG_ATTACH = 8
    PROG_DETACH = 9
    PROG_TEST_RUN = 10
    PROG_GET_NEXT_ID = 11
    MAP_GET_NEXT_ID = 12
    PROG_GET_FD_BY_ID = 13
    MAP_GET_FD_BY_ID = 14
    OBJ_GET_INFO_BY_FD = 15
    PROG_QUERY = 16
    BTF_LOAD = 18
    BTF_GET_FD_BY_ID = 19
    MAP_LOOKUP_AND_DELETE_ELEM = 21
    MAP_FREEZE = 22
    MAP_LOOKUP_BATCH = 24
    MAP_LOOKUP_AND_DELETE_BATCH = 25
    MAP_UPDATE_BATCH = 26
    MAP_DELETE_BATCH = 27
    LINK_CREATE = 28
    LINK_UPDATE = 29
    LINK_GET_FD_BY_ID = 30
    LINK_GET_NEXT_ID = 31
    LINK_DETACH = 34
    PROG_BIND_MAP = 35


class MapType(IntEnum):
    """Map types (the subset pybpfilter uses)."""

    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    RINGBUF = 27
    BLOOM_FILTER = 30

    @property
    def per_cpu(self) -> bool:
        """True when a value exists once per possible CPU."""
        return self in (MapType.PERCPU_HASH, MapType.PERCPU_ARRAY, MapType.LRU_PERCPU_HASH)


class ProgType(IntEnum):
    """Program types (the subset pybpfilter uses)."""

    SOCKET_FILTER = 1
    SCHED_CLS = 3
    SCHED_ACT = 4
    XDP = 6
    CGROUP_SKB = 8
    CGROUP_SOCK = 9
    CGROUP_SOCK_ADDR = 18
    SYSCALL = 31
    NETFILTER = 32


class AttachType(IntEnum):
    """Attach types (the subset pybpfilter uses)."""

    CGROUP_INET_INGRESS = 0
    CGROUP_INET_EGRESS = 1
    CGROUP_INET_SOCK_CREATE = 2
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_UDP4_SENDMSG = 14
    CGROUP_UDP6_SENDMSG = 15
    XDP = 37
    NETFILTER = 45
    TCX_INGRESS = 46
    TCX_EGRESS = 47


class LinkType(IntEnum):
    """Link types, as reported by link info."""

    UNSPEC = 0
    RAW_TRACEPOINT = 1
    TRACING = 2
    CGROUP = 3
    ITER = 4
    NETNS = 5
    XDP = 6
    PERF_EVENT = 7
    KPROBE_MULTI = 8
    STRUCT_OPS = 9
    NETFILTER = 10
    TCX = 11
    UPROBE_MULTI = 12
    NETKIT = 13


class MapFlags(IntFlag):
    """Flags for map creation."""

    NONE = 0
    NO_PREALLOC = 1 << 0
    NO_COMMON_LRU = 1 << 1
    NUMA_NODE = 1 << 2
    RDONLY = 1 << 3
    WRONLY = 1 << 4
    RDONLY_PROG = 1 << 7
    WRONLY_PROG = 1 << 8
    MMAPABLE = 1 << 10


class UpdateFlags(IntEnum):
    """Flags for element updates."""

    ANY = 0
    NOEXIST = 1
    EXIST = 2
    F_LOCK = 4


class ProgFlags(IntFlag):
    """Flags for program load."""

    NONE = 0
    STRICT_ALIGNMENT = 1 << 0
    ANY_ALIGNMENT = 1 << 1
    TEST_RND_HI32 = 1 << 2
    TEST_STATE_FREQ = 1 << 3
    SLEEPABLE = 1 << 4
    XDP_HAS_FRAGS = 1 << 5


class LinkFlags(IntFlag):
    """Flags for link create and update, and tcx ordering (BPF_F_BEFORE/AFTER/...)."""

    NONE = 0
    REPLACE = 1 << 2
    BEFORE = 1 << 3
    AFTER = 1 << 4
    ID = 1 << 5
    LINK = 1 << 13


class TestRunFlags(IntFlag):
    """Flags of BPF_PROG_TEST_RUN."""

    NONE = 0
    RUN_ON_CPU = 1 << 0
    XDP_LIVE_FRAMES = 1 << 1


class XdpAction(IntEnum):
    """XDP program return codes."""

    ABORTED = 0
    DROP = 1
    PASS = 2
    TX = 3
    REDIRECT = 4


class SkbStoreFlags(IntFlag):
    """Flags of bpf_skb_store_bytes."""

    NONE = 0
    RECOMPUTE_CSUM = 1 << 0  # keep a CHECKSUM_COMPLETE skb->csum right
    INVALIDATE_HASH = 1 << 1


class RedirectFlags(IntFlag):
    """Flags of bpf_redirect."""

    NONE = 0
    INGRESS = 1 << 0  # into the device's receive path instead of out of it


class TcAction(IntEnum):
    """tc/tcx program return codes (TC_ACT_*, TCX_*)."""

    NEXT = -1  # TCX_NEXT / TC_ACT_UNSPEC
    OK = 0  # TCX_PASS
    SHOT = 2  # TCX_DROP
    REDIRECT = 7


class NfVerdict(IntEnum):
    """Netfilter verdicts a BPF_PROG_TYPE_NETFILTER program may return."""

    DROP = 0
    ACCEPT = 1


class CgroupSkbVerdict(IntEnum):
    """cgroup_skb program return codes (bit 0: let the packet through)."""

    DROP = 0
    ALLOW = 1


class NfProto(IntEnum):
    """Netfilter protocol families (netfilter link `pf`)."""

    IPV4 = 2
    IPV6 = 10


class NfHook(IntEnum):
    """Netfilter hook numbers (netfilter link `hooknum`)."""

    PRE_ROUTING = 0
    LOCAL_IN = 1
    FORWARD = 2
    LOCAL_OUT = 3
    POST_ROUTING = 4


# Helper function names by number, in the kernel's order (enum bpf_func_id).
HELPER_NAMES: tuple[str, ...] = tuple("""
    unspec map_lookup_elem map_update_elem map_delete_elem probe_read ktime_get_ns trace_printk
    get_prandom_u32 get_smp_processor_id skb_store_bytes l3_csum_replace l4_csum_replace
    tail_call clone_redirect get_current_pid_tgid get_current_uid_gid get_current_comm
    get_cgroup_classid skb_vlan_push skb_vlan_pop skb_get_tunnel_key skb_set_tunnel_key
    perf_event_read redirect get_route_realm perf_event_output skb_load_bytes get_stackid
    csum_diff skb_get_tunnel_opt skb_set_tunnel_opt skb_change_proto skb_change_type
    skb_under_cgroup get_hash_recalc get_current_task probe_write_user
    current_task_under_cgroup skb_change_tail skb_pull_data csum_update set_hash_invalid
    get_numa_node_id skb_change_head xdp_adjust_head probe_read_str get_socket_cookie
    get_socket_uid set_hash setsockopt skb_adjust_room redirect_map sk_redirect_map
    sock_map_update xdp_adjust_meta perf_event_read_value perf_prog_read_value getsockopt
    override_return sock_ops_cb_flags_set msg_redirect_map msg_apply_bytes msg_cork_bytes
    msg_pull_data bind xdp_adjust_tail skb_get_xfrm_state get_stack skb_load_bytes_relative
    fib_lookup sock_hash_update msg_redirect_hash sk_redirect_hash lwt_push_encap
    lwt_seg6_store_bytes lwt_seg6_adjust_srh lwt_seg6_action rc_repeat rc_keydown skb_cgroup_id
    get_current_cgroup_id get_local_storage sk_select_reuseport skb_ancestor_cgroup_id
    sk_lookup_tcp sk_lookup_udp sk_release map_push_elem map_pop_elem map_peek_elem
    msg_push_data msg_pop_data rc_pointer_rel spin_lock spin_unlock sk_fullsock tcp_sock
    skb_ecn_set_ce get_listener_sock skc_lookup_tcp tcp_check_syncookie sysctl_get_name
    sysctl_get_current_value sysctl_get_new_value sysctl_set_new_value strtol strtoul
    sk_storage_get sk_storage_delete send_signal tcp_gen_syncookie skb_output probe_read_user
    probe_read_kernel probe_read_user_str probe_read_kernel_str tcp_send_ack send_signal_thread
    jiffies64 read_branch_records get_ns_current_pid_tgid xdp_output get_netns_cookie
    get_current_ancestor_cgroup_id sk_assign ktime_get_boot_ns seq_printf seq_write
    sk_cgroup_id sk_ancestor_cgroup_id ringbuf_output ringbuf_reserve ringbuf_submit
    ringbuf_discard ringbuf_query csum_level skc_to_tcp6_sock skc_to_tcp_sock
    skc_to_tcp_timewait_sock skc_to_tcp_request_sock skc_to_udp6_sock get_task_stack
    load_hdr_opt store_hdr_opt reserve_hdr_opt inode_storage_get inode_storage_delete d_path
    copy_from_user snprintf_btf seq_printf_btf skb_cgroup_classid redirect_neigh per_cpu_ptr
    this_cpu_ptr redirect_peer task_storage_get task_storage_delete get_current_task_btf
    bprm_opts_set ktime_get_coarse_ns ima_inode_hash sock_from_file check_mtu for_each_map_elem
    snprintf sys_bpf btf_find_by_name_kind sys_close timer_init timer_set_callback timer_start
    timer_cancel get_func_ip get_attach_cookie task_pt_regs get_branch_snapshot trace_vprintk
    skc_to_unix_sock kallsyms_lookup_name find_vma loop strncmp get_func_arg get_func_ret
    get_func_arg_cnt get_retval set_retval xdp_get_buff_len xdp_load_bytes xdp_store_bytes
    copy_from_user_task skb_set_tstamp ima_file_hash kptr_xchg map_lookup_percpu_elem
    skc_to_mptcp_sock dynptr_from_mem ringbuf_reserve_dynptr ringbuf_submit_dynptr
    ringbuf_discard_dynptr dynptr_read dynptr_write dynptr_data tcp_raw_gen_syncookie_ipv4
    tcp_raw_gen_syncookie_ipv6 tcp_raw_check_syncookie_ipv4 tcp_raw_check_syncookie_ipv6
    ktime_get_tai_ns user_ringbuf_drain cgrp_storage_get cgrp_storage_delete
""".split())  # noqa: SIM905 (a 212-item list literal reads worse)


class Helper(IntEnum):
    """Helper functions pybpfilter calls, by number."""

    map_lookup_elem = 1
    map_update_elem = 2
    map_delete_elem = 3
    ktime_get_ns = 5
    trace_printk = 6
    get_prandom_u32 = 7
    get_smp_processor_id = 8
    skb_store_bytes = 9
    l3_csum_replace = 10
    l4_csum_replace = 11
    tail_call = 12
    redirect = 23
    skb_load_bytes = 26
    csum_diff = 28
    fib_lookup = 69
    xdp_adjust_head = 44
    skb_load_bytes_relative = 68
    ktime_get_boot_ns = 125
    ringbuf_output = 130
    ringbuf_reserve = 131
    ringbuf_submit = 132
    ringbuf_discard = 133
    xdp_get_buff_len = 188
    xdp_load_bytes = 189
    dynptr_read = 201
    ktime_get_coarse_ns = 160
    probe_read_kernel = 113
    skb_change_tail = 38
    xdp_adjust_tail = 65
    xdp_store_bytes = 190


def helper_name(helper_id: int) -> str:
    """The kernel's name of helper `helper_id` (without the `bpf_` prefix), or "unknown"."""
    if 0 < helper_id < len(HELPER_NAMES):
        return HELPER_NAMES[helper_id]
    return "unknown"
