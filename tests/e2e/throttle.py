"""A slow hospital uplink on loopback: a TCP relay whose site -> coordinator direction is capped.

Bytes pass through unchanged (TLS stays end to end between the SuperNode and the SuperLink);
only their pace upstream is limited, and every upstream chunk is recorded with its time so a
test can say how long an upload took.
"""

from __future__ import annotations

import socket
import threading
import time

CHUNK = 16 * 1024
BUFFER = 64 * 1024  # the relay's socket buffers: keeps what waits in the relay itself small


class ThrottledLink:
    """Relay ``127.0.0.1:<port>`` to ``127.0.0.1:<target>``, upstream at most ``rate`` B/s.

    Parameters
    ----------
    target : int
        The coordinator's Fleet API port.
    rate : float
        Upstream bytes per second (downstream is not limited).
    """

    def __init__(self, target: int, rate: float) -> None:
        self.target, self.rate = target, rate
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)  # accepted inherit
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.port = int(self.server.getsockname()[1])
        self.upstream: list[tuple[float, int]] = []  # (monotonic time, bytes) per chunk
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                site, _ = self.server.accept()
            except OSError:
                return
            try:
                link = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the coordinator is gone (a site reconnecting as the test ends)
                site.close()
                continue
            link.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
            self._sockets += [site, link]
            threading.Thread(target=self._pipe, args=(site, link, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(link, site, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(CHUNK):
                dst.sendall(data)
                if up:
                    with self._lock:
                        self.upstream.append((time.monotonic(), len(data)))
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def longest_upload(self, gap: float = 1.0) -> tuple[float, int]:
        """The stretch of upstream traffic (no pause over ``gap`` seconds) that carried most bytes.

        (By bytes, not duration: the SuperNode's polls every 0.5 s make long stretches of a few
        kB, which under load can outlast the update's own upload.)

        Returns
        -------
        tuple of (float, int)
            Its duration in seconds and its bytes.
        """
        with self._lock:
            chunks = list(self.upstream)
        best, start, last, total = (0.0, 0), None, 0.0, 0
        for t, n in chunks:
            if start is None or t - last > gap:
                start, total = t, 0
            total, last = total + n, t
            if total > best[1]:
                best = (last - start, total)
        return best

    def close(self) -> None:
        self._closed.set()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass
