"""`distributed.connect_back.accept_named`: peers that dial back and name themselves are
matched to their names; one that ended first, one that never dials and one that names no
expected peer are errors in one line, never a hang."""

from __future__ import annotations

import secrets
import threading
from multiprocessing.connection import Client, Listener

import pytest

from distserve_rt.distributed.connect_back import accept_named


def _dial(address, authkey, name) -> None:
    conn = Client(address, authkey=authkey)
    conn.send(name)
    conn.send(f"hello from {name}")


@pytest.fixture
def listener():
    authkey = secrets.token_bytes(16)
    with Listener(("127.0.0.1", 0), authkey=authkey) as lst:
        yield lst, authkey


def test_each_peer_is_matched_to_the_name_it_sends(listener):
    lst, key = listener
    for name in ("b", "a"):
        threading.Thread(target=_dial, args=(lst.address, key, name)).start()
    conns = accept_named(lst, ["a", "b"], lambda n: None, 10.0, "instance")
    assert {n: c.recv() for n, c in conns.items()} == {"a": "hello from a", "b": "hello from b"}


def test_a_peer_that_ended_before_dialling_is_reported_at_once(listener):
    lst, _ = listener
    reasons = {"a": None, "b": "its Ray actor died (ActorDiedError)"}
    with pytest.raises(RuntimeError, match=r"^instance b failed to start: its Ray actor died"):
        accept_named(lst, ["a", "b"], reasons.get, 30.0, "instance")


def test_peers_that_never_dial_time_out_by_name(listener):
    lst, key = listener
    threading.Thread(target=_dial, args=(lst.address, key, 0)).start()
    with pytest.raises(TimeoutError, match=r"p-0: rank \[1\] placed but not connected back"):
        accept_named(lst, [0, 1], lambda r: None, 0.5, "p-0: rank")


def test_a_peer_naming_no_expected_peer_is_refused(listener):
    lst, key = listener
    threading.Thread(target=_dial, args=(lst.address, key, "stranger")).start()
    with pytest.raises(RuntimeError, match="accepting the connections of instance"):
        accept_named(lst, ["a"], lambda n: None, 10.0, "instance")
