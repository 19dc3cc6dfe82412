"""A loopback UDP listener for tests of the valve sink."""
from __future__ import annotations

import socket
import threading


class UDPReceiver(threading.Thread):
    """Collects datagrams on a loopback port until told to stop and the socket runs dry."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.got: list[bytes] = []
        self.done = threading.Event()

    def run(self):
        while True:
            try:
                self.got.append(self.sock.recv(65536))
            except (socket.timeout, TimeoutError):
                if self.done.is_set():
                    break
        self.sock.close()

    def finish(self) -> list[bytes]:
        self.done.set()
        self.join(10)
        return self.got
