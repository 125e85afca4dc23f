"""The one network probe: downloads are attempted only when their host answers quickly, so an
offline machine fails at once with a message naming the file and where to put it."""

from __future__ import annotations

import socket
import threading


def online(host_or_url: str, port: int = 443, timeout: float = 2.0) -> bool:
    """True when the host (or the host of a URL) accepts a connection within ``timeout``
    seconds. The probe runs in a daemon thread, so a hanging DNS lookup cannot exceed
    ``timeout`` either."""
    host = host_or_url.split("/")[2] if "://" in host_or_url else host_or_url
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])
