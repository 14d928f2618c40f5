"""Helpers the test suite shares: names, namespaces and topologies, packets, programs."""
