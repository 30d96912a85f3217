"""The session's network guard (tests/conftest.py, tests/netguard/): connections outside the loopback are refused in
this process and in the processes the tests start; loopback and Unix sockets work."""

import contextlib
import socket
import subprocess
import sys

import netguard
import pytest
from conftest import NETWORK_LOG, ROOT


@contextlib.contextmanager
def refusals_expected():
    """Yield a function returning the refusals logged inside the block; take them back out of the session log so
    that the guard's own check does not fail this test."""
    before = NETWORK_LOG.read_text() if NETWORK_LOG.exists() else ""
    try:
        yield lambda: NETWORK_LOG.read_text()[len(before) :].splitlines() if NETWORK_LOG.exists() else []
    finally:
        NETWORK_LOG.write_text(before)


@pytest.mark.parametrize(
    "attempt",
    [
        lambda: socket.create_connection(("192.0.2.1", 80), timeout=0.1),  # TEST-NET-1: never routed
        lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("192.0.2.1", 80)),
        lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect_ex(("192.0.2.1", 80)),
        lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).connect(("2001:db8::1", 80)),
        lambda: socket.getaddrinfo("huggingface.co", 443),
    ],
    ids=["create_connection", "connect", "connect_ex", "connect_ipv6", "getaddrinfo"],
)
def test_outside_connections_are_refused_and_logged(attempt):
    with refusals_expected() as refusals:
        with pytest.raises(netguard.NetworkAccessError, match="refused"):
            attempt()
        assert len(refusals()) == 1


def test_loopback_and_unix_sockets_work(tmp_path):
    for family, host in [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "localhost"), (socket.AF_INET6, "::1")]:
        with socket.socket(family, socket.SOCK_STREAM) as server:
            server.bind((host, 0))
            server.listen(1)
            with socket.create_connection((host, server.getsockname()[1]), timeout=5):
                server.accept()[0].close()
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        server.bind(path)
        server.listen(1)
        client.connect(path)


def test_child_processes_are_guarded_and_report_to_the_session():
    code = "import socket; socket.create_connection(('192.0.2.1', 80), timeout=0.1)"
    with refusals_expected() as refusals:
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and "NetworkAccessError" in result.stderr
        assert len(refusals()) == 1 and refusals()[0].startswith("pid ")


def test_a_file_left_in_the_repository_root_fails_the_test(tmp_path, monkeypatch):
    """The session's other rule (tests/conftest.py): a script run at ``--output_dir .`` fails the test that ran it.
    (Here the "repository root" is a temporary folder.)"""
    import types

    import conftest

    monkeypatch.setattr(conftest, "ROOT", tmp_path)
    monkeypatch.setattr(conftest, "LAUNCH_DIR", tmp_path)
    item = types.SimpleNamespace(nodeid="t")
    rules = conftest._session_rules(item, "call")
    next(rules)
    (tmp_path / "knn_results.json").write_text("{}")
    with pytest.raises(AssertionError, match=r"t \(call\) wrote outside its temporary folders: .*knn_results.json"):
        rules.send(None)
    (tmp_path / "knn_results.json").unlink()  # this very test runs under the rule too
    rules = conftest._session_rules(item, "call")
    next(rules)
    with pytest.raises(StopIteration):  # nothing new: the test passes
        rules.send(None)
