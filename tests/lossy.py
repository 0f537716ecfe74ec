"""A TCP proxy that loses replies: it forwards what clients send to the server as it is, and
cuts a connection, at random, just as a reply comes back, instead of forwarding it. So a
request has reached the server (and was applied) and its caller sees a broken connection:
the case request ids exist for (issue 12). A real connection, cut for real.
"""

from __future__ import annotations

import random
import socket
import threading

from mpstore.manager.ports import free_port

__all__ = ["LossyProxy"]


class LossyProxy:
    """Listens on a free 127.0.0.1 port and proxies to ``target_port``; each chunk of data
    from the server is, with probability ``loss``, replaced by closing both sides."""

    def __init__(self, target_port: int, loss: float, seed: int = 0) -> None:
        self.port = free_port("127.0.0.1")
        self.cuts = 0
        self._target = target_port
        self._loss = loss
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _cut(self) -> bool:
        with self._lock:
            cut = self._rng.random() < self._loss
            self.cuts += cut
            return cut

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, lossy: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data or (lossy and self._cut()):
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
