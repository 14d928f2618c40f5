"""The PNG: cost against N on log scales — ns/packet, packets/s, and build time."""

from __future__ import annotations

from report import BPF_HOOKS, total_build, worst
from systems import BY_KEY

HOOK_COLORS = {"xdp": "tab:blue", "tc": "tab:orange", "nf": "tab:green"}
SHAPE_STYLES = {"exact": "-", "cidr": "--", "ports": ":", "mix": "-."}
SHAPE_COLORS = {"exact": "tab:blue", "cidr": "tab:orange", "ports": "tab:green", "mix": "tab:red"}
SYSTEM_COLORS = {"bpf-xdp": "tab:blue", "bpf-tc": "tab:orange", "bpf-nf": "tab:green",
                 "ipt-legacy": "tab:red", "ipt-nft": "tab:purple", "nft-linear": "tab:brown",
                 "nft-set": "tab:gray", "floor": "black"}


def save_plot(res: dict, path: str) -> bool:
    """Write the plot; False (and nothing written) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(19, 6.2))
    _testrun(axes[0], res.get("testrun") or [])
    _traffic(axes[1], res.get("traffic") or [])
    _builds(axes[2], res.get("builds") or [])
    m = res["machine"]
    fig.suptitle(f"pybpfilter benchmark — {m['cpu']}, {m['cores']} cores, Linux {m['kernel']} "
                 f"({res['started'][:10]}, {'full' if res['config']['full'] else 'quick'} run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _testrun(ax, rows: list[dict]) -> None:
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for hook in dict.fromkeys(r["hook"] for r in rows):
            pts = sorted((r["n"], worst(r)) for r in rows
                         if r["shape"] == shape and r["hook"] == hook)
            if pts:
                ax.plot(*zip(*pts, strict=True), SHAPE_STYLES.get(shape, "-"), marker="o",
                        ms=3, color=HOOK_COLORS.get(hook), label=f"{hook}, {shape}")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("rules (N)")
    ax.set_ylabel("ns per packet (worst of miss / last rule)")
    ax.set_title("BPF_PROG_TEST_RUN")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def _traffic(ax, traffic: list[dict]) -> None:
    for tr in traffic[:1]:
        cells = tr["cells"]
        for s in dict.fromkeys(c["system"] for c in cells):
            pts = sorted((c["n"], c["median_pps"]) for c in cells
                         if c["system"] == s and c.get("median_pps"))
            if not pts:
                continue
            if s == "floor":
                ax.axhline(pts[0][1], color="black", lw=0.8, ls=":",
                           label=BY_KEY[s].label)
                continue
            ax.plot(*zip(*pts, strict=True), "-" if s in BPF_HOOKS else "--", marker="o",
                    ms=3, color=SYSTEM_COLORS.get(s), label=BY_KEY[s].label)
        ax.set_title(f"real traffic through a veth ({tr['shape']}, packets matching no rule)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rules (N)")
    ax.set_ylabel("packets per second handled by the receiving CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _builds(ax, builds: list[dict]) -> None:
    for shape in dict.fromkeys(b["shape"] for b in builds):
        ns = sorted({b["n"] for b in builds if b["shape"] == shape})
        pts = [(n, max(total_build(b) for b in builds if b["shape"] == shape and b["n"] == n))
               for n in ns]
        ax.plot(*zip(*pts, strict=True), SHAPE_STYLES.get(shape, "-"), marker="o", ms=3,
                color=SHAPE_COLORS.get(shape), label=f"{shape}: parse + compile + maps + load")
    ax.scatter([10_000, 100_000], [1.5, 15], marker="x", color="red", zorder=3,
               label="targets (1.5 s, 15 s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rules (N)")
    ax.set_ylabel("seconds (worst hook)")
    ax.set_title("compile + load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
