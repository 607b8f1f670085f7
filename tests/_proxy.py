"""A loopback TCP proxy that injects network faults between an SDK and an
emulator: connection resets, stalls, and "the network died after N bytes".

Faults are counted per burst of client data (roughly one per HTTP request),
so they also hit pooled keep-alive connections opened before the fault was
armed.

    proxy = FaultProxy("127.0.0.1", emulator_port)
    proxy.start()
    proxy.reset_next(2)      # the next 2 requests see a TCP reset
    proxy.stall_next(1)      # the next request never gets an answer
    proxy.reply_next(5, 503) # the next 5 requests get "503 Slow Down"
    proxy.fail_after(10**6)  # after 1 MB more, reset everything until heal()
    proxy.heal()
    proxy.stop()
"""

import socket
import struct
import threading

_BUFFER = 256 * 1024


class FaultProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port`, with faults.

    Attributes:
        port: int, the port the proxy listens on.
        endpoint: str, `http://127.0.0.1:<port>`.
        resets: int, how many connections it has reset so far.
        stalls: int, how many connections it has stalled so far.
    """

    def __init__(self, target_host, target_port):
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._listener = None
        self._stopped = threading.Event()
        self._connections = set()
        self._faults = []  # [action, count left, bytes the request contains]
        self._budget = None  # bytes left before breaking; None = unlimited
        self._broken = False
        self.resets = 0
        self.stalls = 0
        self.replies = 0
        self.port = None

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    # -- control ------------------------------------------------------------

    def reset_next(self, n, match=None):
        """Resets the connection carrying each of the next `n` requests
        (only requests whose first bytes contain `match`, if given)."""
        with self._lock:
            self._faults.append(["reset", n, match])

    def stall_next(self, n, match=None):
        """Swallows each of the next `n` requests (whose first bytes contain
        `match`, if given) and never answers them."""
        with self._lock:
            self._faults.append(["stall", n, match])

    def reply_next(self, n, status=503, match=None):
        """Answers each of the next `n` requests (whose first bytes contain
        `match`, if given) with an empty HTTP `status` reply instead of
        forwarding it: a burst of 5xx errors or throttling."""
        with self._lock:
            self._faults.append([f"reply {status}", n, match])

    def fail_after(self, nbytes):
        """Forwards `nbytes` more client bytes, then resets every connection,
        old and new, until `heal()`."""
        with self._lock:
            self._budget = nbytes
            if nbytes <= 0:
                self._broken = True
        if nbytes <= 0:
            self._reset_all()

    def heal(self):
        """Clears every pending and ongoing fault."""
        with self._lock:
            self._faults.clear()
            self._budget = None
            self._broken = False

    # -- lifecycle ----------------------------------------------------------

    def start(self):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(
            target=self._accept_loop, name="fault-proxy", daemon=True
        ).start()
        return self

    def stop(self):
        self._stopped.set()
        try:
            self._listener.close()
        except OSError:
            pass
        self._reset_all()

    # -- internals ----------------------------------------------------------

    def _accept_loop(self):
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._connections.add(pair)
            threading.Thread(
                target=self._pump_up, args=(pair,), daemon=True
            ).start()
            threading.Thread(
                target=self._pump_down, args=(pair,), daemon=True
            ).start()

    def _decide(self, pair, data):
        """What to do with `data` arriving from the client."""
        with self._lock:
            if self._broken:
                return "reset"
            if not pair.in_request:
                # First bytes of a new request on this connection.
                for fault in self._faults:
                    action, left, match = fault
                    if left and (match is None or match in data):
                        fault[1] -= 1
                        return action
            if self._budget is not None:
                self._budget -= len(data)
                if self._budget < 0:
                    self._broken = True
                    return "reset"
            return "forward"

    def _pump_up(self, pair):
        reset = False
        try:
            while True:
                data = pair.client.recv(_BUFFER)
                if not data:
                    break
                if pair.stalled:
                    continue  # swallow until the client gives up
                action = self._decide(pair, data)
                if action == "reset":
                    with self._lock:
                        self.resets += 1
                    reset = True
                    break
                if action.startswith("reply"):
                    status = int(action.split()[1])
                    with self._lock:
                        self.replies += 1
                    pair.stalled = True  # swallow the rest of the request
                    pair.client.sendall(
                        f"HTTP/1.1 {status} Slow Down\r\nContent-Length: 0"
                        f"\r\nConnection: close\r\n\r\n".encode())
                    continue
                if action == "stall":
                    with self._lock:
                        self.stalls += 1
                    pair.stalled = True
                    continue
                pair.in_request = True
                pair.upstream.sendall(data)
        except OSError:
            pass
        self._close(pair, reset)

    def _pump_down(self, pair):
        reset = False
        try:
            while True:
                data = pair.upstream.recv(_BUFFER)
                if not data:
                    break
                with self._lock:
                    reset = self._broken
                if reset:
                    break
                # A reply means the request is over: the next client bytes
                # start a new one (close enough for HTTP/1.1 without
                # pipelining, which no SDK here uses).
                pair.in_request = False
                pair.client.sendall(data)
        except OSError:
            pass
        self._close(pair, reset)

    def _close(self, pair, reset=False):
        with self._lock:
            self._connections.discard(pair)
        if reset:
            _reset(pair.client)
        else:
            try:
                pair.client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            pair.client.close()
        try:
            pair.upstream.close()
        except OSError:
            pass

    def _reset_all(self):
        with self._lock:
            pairs = list(self._connections)
        for pair in pairs:
            self._close(pair, reset=True)


class _Pair:
    def __init__(self, client, upstream):
        self.client = client
        self.upstream = upstream
        self.in_request = False
        self.stalled = False


def _reset(sock):
    """Closes `sock` with a TCP RST rather than a clean FIN."""
    try:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
