"""`--ray-address` where nothing listens fails in seconds with one line (ray.init alone
retries for minutes), and a malformed one is refused before any connection."""

from __future__ import annotations

import socket

import pytest

from distserve_rt.distributed import ray_cluster


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the test connects


def test_nothing_listening_fails_fast_in_one_line():
    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(ConnectionError, match="nothing answers there") as e:
        ray_cluster.check_reachable(address, timeout_s=2.0)
    assert address in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("address", ["headnode", "host:port", ":6379"])
def test_malformed_address_refused(address):
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        ray_cluster.check_reachable(address)
