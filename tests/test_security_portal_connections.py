"""Security regression: the portal holds at most ``[limits] connections_per_ip`` connections
from one address, as SMTP and IMAP do; the next gets a plain 503 and is closed, and a slot
that frees is usable again (the process's descriptors are shared by every listener)."""

from __future__ import annotations

import socket
import ssl

from tests.gateway_proc import Gateway
from tests.helpers import tls_context

PER_IP = 3  # the ``limited`` fixture's [limits] connections_per_ip


def _connect(gw: Gateway) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", gw.ports["web"]), timeout=30)
    return tls_context(gw).wrap_socket(sock, server_hostname="localhost")


def _get(tls: ssl.SSLSocket, path: str = "/") -> bytes:
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    return tls.recv(65536)


def test_connections_over_the_per_address_limit_get_503(limited: Gateway) -> None:
    held = [_connect(limited) for _ in range(PER_IP)]
    try:
        assert all(_get(tls).startswith(b"HTTP/1.1 ") for tls in held)  # all really served
        extra = _connect(limited)
        reply = extra.recv(65536)
        assert reply.startswith(b"HTTP/1.1 503 "), reply
        assert b"Retry-After: 10" in reply and b"Connection: close" in reply
        assert extra.recv(65536) == b""  # closed by the server
        extra.close()
        held.pop().close()
        again = _connect(limited)
        try:
            answer = _get(again)
            assert answer.startswith(b"HTTP/1.1 ") and not answer.startswith(b"HTTP/1.1 503")
        finally:
            again.close()
    finally:
        for tls in held:
            tls.close()
