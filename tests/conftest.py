"""Shared fixtures: kernel-test skipping, test namespaces, a veth topology, bpffs, cgroups.

Everything a test creates is named with `helpers.names.unique_name()` (prefix + pid) and removed at
teardown, also on failure; a session-end check deletes and reports anything left over.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from helpers import cgroups, names
from helpers import topology as topo_mod
from helpers.bpffs import mounted_bpffs
from helpers.kernel import cgroup2_mount, require_kernel, skip_reason

from bpfilter import netns as netns_api

# nat OUTPUT attaches to the root cgroup unless told otherwise: in tests a forgotten --cgroup
# must fail (this path never exists), never touch every socket of the machine.
os.environ["BPFILTER_CGROUP"] = "/nonexistent/pybpfilter-tests-pass-cgroup"

# Tests using these fixtures touch the kernel whether or not they say so.
KERNEL_FIXTURES = {"netns", "topology", "bpffs", "cgroup2"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests that need the kernel, and skip them with the reason when it is unavailable."""
    for item in items:
        if KERNEL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kernel)
    kernel_items = [item for item in items if item.get_closest_marker("kernel")]
    reason = skip_reason() if kernel_items else None
    if reason:
        for item in kernel_items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def _leftover_check() -> Iterator[None]:
    """At session end, delete this run's leftover namespaces and cgroups, and fail if any."""
    yield
    left = [n for n in netns_api.list_names() if names.is_ours(n)]
    for name in left:
        netns_api.delete(name)
    root = cgroup2_mount()
    left_cg = []
    if root and os.path.isdir(root):
        left_cg = [d for d in os.listdir(root) if names.is_ours(d)]
        for d in left_cg:
            cgroups.remove(os.path.join(root, d))
    if left or left_cg:
        pytest.fail(f"tests left behind namespaces {left} and cgroups {left_cg} "
                    "(deleted now): a fixture or test does not clean up", pytrace=False)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh named network namespace with `lo` up; deleted at teardown."""
    require_kernel()
    name = topo_mod.create_netns()
    try:
        yield name
    finally:
        topo_mod.delete_netns(name)


@pytest.fixture
def topology() -> Iterator[topo_mod.Topology]:
    """Sender and receiver namespaces joined by a veth pair (IPv4 /24 and IPv6 /64)."""
    require_kernel()
    topo = topo_mod.create_topology()
    try:
        yield topo
    finally:
        topo_mod.destroy_topology(topo)


@pytest.fixture
def bpffs(tmp_path) -> Iterator[str]:
    """A private bpffs mount in a temporary directory; unpinned, unmounted and removed after."""
    require_kernel()
    path = str(tmp_path / "bpffs")
    os.mkdir(path)
    with mounted_bpffs(path):
        yield path
    os.rmdir(path)


@pytest.fixture
def cgroup2() -> Iterator[str]:
    """A fresh child cgroup of the cgroup v2 mount (never the root cgroup); removed after."""
    require_kernel()
    root = cgroup2_mount()
    if root is None:
        pytest.skip("kernel test: no cgroup v2 mount")
    path = cgroups.create(root, names.unique_name("c"))
    try:
        yield path
    finally:
        cgroups.remove(path)
