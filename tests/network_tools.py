"""Network helpers of the tests that download."""

from __future__ import annotations

import socket


def closed_port_url(path: str) -> str:
    """A loopback URL that refuses connections (nothing listens there)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
