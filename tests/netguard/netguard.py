"""A network guard for the tests: any socket connection outside this machine's loopback raises
:class:`NetworkAccessError` and is recorded.

Patched: ``socket.socket.connect``/``connect_ex``, ``socket.create_connection`` and ``socket.getaddrinfo`` (a name
lookup is where every HTTP client starts, and a DNS query is itself network traffic). Allowed: AF_UNIX sockets,
127.0.0.0/8, ::1 (and their IPv4-mapped forms), the unspecified address, and the names ``localhost`` and this host's
own name when they resolve to loopback. Every refused attempt is appended to ``ATTEMPTS`` and, when the environment
variable ``TINYDINO_NETWORK_LOG`` names a file, written there as one line (child processes report through it).
"""

from __future__ import annotations

import ipaddress
import os
import socket

#: Refused attempts of this process, as ``"<call> <address>"`` strings.
ATTEMPTS: list[str] = []
#: Environment variable: the file where every process appends its refused attempts (one line each).
LOG_ENV = "TINYDINO_NETWORK_LOG"

_original = {
    "connect": socket.socket.connect,
    "connect_ex": socket.socket.connect_ex,
    "create_connection": socket.create_connection,
    "getaddrinfo": socket.getaddrinfo,
}


class NetworkAccessError(RuntimeError):
    """A test (or a process it started) tried to reach the network. Not an ``OSError``: retry loops and offline
    fallbacks of HTTP clients must not swallow it."""


def is_loopback_ip(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    ip = mapped or ip
    return ip.is_loopback or ip.is_unspecified


def _local_name(host: str) -> bool:
    """``localhost`` or this host's name, when every address it resolves to is loopback."""
    if host.lower() not in {"localhost", "localhost.localdomain", socket.gethostname().lower()}:
        return False
    try:
        infos = _original["getaddrinfo"](host, None)
    except OSError:
        return False
    return bool(infos) and all(is_loopback_ip(info[4][0]) for info in infos)


def is_local_host(host) -> bool:
    if host is None:
        return True  # getaddrinfo(None, port): the local wildcard
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host)
    return host == "" or is_loopback_ip(host) or _local_name(host)


def _refuse(call: str, address) -> None:
    message = f"{call} {address!r}"
    ATTEMPTS.append(message)
    path = os.environ.get(LOG_ENV)
    if path:
        try:
            with open(path, "a") as fh:
                fh.write(f"pid {os.getpid()}: {message}\n")
        except OSError:
            pass
    raise NetworkAccessError(f"network access refused in the tests: {message} (only loopback is allowed)")


def _check_address(call: str, family, address) -> None:
    if family == getattr(socket, "AF_UNIX", None) or isinstance(address, (str, bytes)):
        return
    if isinstance(address, tuple) and address and is_local_host(address[0]):
        return
    _refuse(call, address)


def _connect(self, address):
    _check_address("connect", self.family, address)
    return _original["connect"](self, address)


def _connect_ex(self, address):
    _check_address("connect_ex", self.family, address)
    return _original["connect_ex"](self, address)


def _create_connection(address, *args, **kwargs):
    _check_address("create_connection", socket.AF_INET, address)
    return _original["create_connection"](address, *args, **kwargs)


def _getaddrinfo(host, *args, **kwargs):
    if not is_local_host(host):
        _refuse("getaddrinfo", host)
    return _original["getaddrinfo"](host, *args, **kwargs)


def install() -> None:
    """Patch the socket module of this process (idempotent)."""
    socket.socket.connect = _connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign]
    socket.create_connection = _create_connection  # type: ignore[assignment]
    socket.getaddrinfo = _getaddrinfo  # type: ignore[assignment]


def uninstall() -> None:
    socket.socket.connect = _original["connect"]  # type: ignore[method-assign]
    socket.socket.connect_ex = _original["connect_ex"]  # type: ignore[method-assign]
    socket.create_connection = _original["create_connection"]  # type: ignore[assignment]
    socket.getaddrinfo = _original["getaddrinfo"]  # type: ignore[assignment]
