"""pybpfilter: compile iptables and nftables rulesets to eBPF programs."""

__version__ = "0.1.0"
