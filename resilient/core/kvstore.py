"""A small key-value store that only holders of a key can talk to: the supervisors' coordination store and
the ranks' rendezvous store (resilient.rank.rendezvous).

Why not torch's TCPStore: it answers any client (one that writes a non-number where the supervisor
calls `add` closes the supervisor's connection), cannot bound keys or bytes, and a client call to a
frozen or cut-off server blocks forever (no receive timeout), so a silent node 0 would hang every
other node. Here:

- The server (a thread of the process that hosts it) listens on one named address only.
  A connection must prove the key (HMAC challenge both ways; keys are derived from the run's secret for one
  purpose, resilient.core.secret) within `AUTH_WINDOW_S`, or it is closed; the server confirms the proof
  (a client counts itself connected only then, and retries otherwise); after that every frame carries a
  MAC under a per-connection key with a sequence number (no injection, no replay). A client without the
  secret can open a bounded number of connections and send bytes that are dropped: it can read, write or
  delete nothing.
- Keys and bytes are bounded (`StoreLimits`); a write past a bound is refused with a reason that
  the writer logs (only key holders write, so hitting it is a bug, not an attack).
- Every client call has a deadline (`op_timeout_s`): a server that does not answer in time is
  unavailable (StoreUnavailable), which is how a frozen or cut-off coordinator is noticed in seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_BACKLOG = 4096  # every supervisor of a 1024-node job connects at once
_MAGIC = b"RSTORE1\n"
_NONCE = 16
_MAC = 16
_MAX_FRAME = 64 << 20
AUTH_WINDOW_S = 2.0
"""A connection that has not proven the secret within this long is closed."""
_MAX_PENDING = 64
"""Unauthenticated connections held at once; more are closed at accept."""
_MAX_PENDING_PER_PEER = 16
"""Unauthenticated connections held at once from one address: one host cannot take every pending place."""

_RETRY_FIRST_S, _RETRY_MAX_S = 0.05, 1.0
"""A client's pause before its first retry to connect, doubling up to the most (each with +-50% jitter)."""

# Operations (one byte) and reply status.
_SET, _MGET, _CHECK, _CAS, _DEL, _DELPREFIX, _COUNT, _PING = b"S", b"G", b"C", b"X", b"K", b"D", b"N", b"P"
_OK, _REFUSED = b"\x00", b"\x01"


class StoreUnavailable(OSError):
    """The server did not answer within the deadline, closed the connection, or failed authentication."""


class StoreRefused(Exception):
    """The server refused a write (a bound on keys or bytes); the message says which."""


@dataclass(frozen=True)
class StoreLimits:
    max_keys: int = 100_000
    max_bytes: int = 512 << 20
    """Keys plus values held."""
    max_clients: int = 8192
    """Authenticated connections at once."""


def bound_listener(addr: str, port: int) -> socket.socket:
    """A listening TCP socket on `addr`:`port` only (port 0: the kernel picks)."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


# -- framing -----------------------------------------------------------------------------------------


def _pack(*fields: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def _unpack(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        if i + 4 > len(data):
            raise ValueError("truncated field")
        (n,) = struct.unpack_from(">I", data, i)
        i += 4
        if i + n > len(data):
            raise ValueError("truncated field")
        out.append(bytes(data[i : i + n]))
        i += n
    return out


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _proof(key: bytes, role: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(key, role + a + b, hashlib.sha256).digest()


class _Session:
    """The MACs of one authenticated connection: a key of its own, a sequence number per direction."""

    def __init__(self, key: bytes, client_nonce: bytes, server_nonce: bytes, *, server: bool) -> None:
        self._key = hmac.new(key, b"session" + client_nonce + server_nonce, hashlib.sha256).digest()
        self._send_dir, self._recv_dir = (b"s", b"c") if server else (b"c", b"s")
        self._send_seq = self._recv_seq = 0

    def seal(self, payload: bytes) -> bytes:
        mac = hmac.new(self._key, self._send_dir + struct.pack(">Q", self._send_seq) + payload, hashlib.sha256)
        self._send_seq += 1
        return _frame(mac.digest()[:_MAC] + payload)

    def open(self, body: bytes) -> bytes | None:
        """The payload of a received frame body, or None when its MAC does not check."""
        payload = body[_MAC:]
        mac = hmac.new(self._key, self._recv_dir + struct.pack(">Q", self._recv_seq) + payload, hashlib.sha256)
        if len(body) < _MAC or not hmac.compare_digest(mac.digest()[:_MAC], body[:_MAC]):
            return None
        self._recv_seq += 1
        return payload


# -- the server ------------------------------------------------------------------------------------


def _peer_host(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


class _Conn:
    def __init__(self, sock: socket.socket, now: float, peer: str) -> None:
        self.sock, self.peer = sock, peer
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.accepted = now
        self.server_nonce = os.urandom(_NONCE)
        self.client_nonce: bytes | None = None
        self.session: _Session | None = None


class StoreServer:
    """The key-value server on one bound listener; `serve_forever` runs on its own daemon thread."""

    def __init__(
        self,
        listener: socket.socket,
        key: bytes,
        limits: StoreLimits = StoreLimits(),
        on_limit: Callable[[str], None] | None = None,
    ) -> None:
        self.listener, self._key, self.limits = listener, key, limits
        self._on_limit = on_limit or (lambda why: print(f"resilient: coordination store: {why}", file=sys.stderr))
        self._limit_said: set[str] = set()
        self.data: dict[bytes, bytes] = {}
        self.bytes_held = 0
        self.rejected = 0
        """Connections closed for failing or not finishing authentication, or for a bad frame."""
        self._conns: dict[int, _Conn] = {}
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        self.listener.setblocking(False)
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._serve, name="coordination-store", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._sel.close()
        self.listener.close()

    # -- the loop --

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, mask in self._sel.select(0.25):
                if key.data is None:
                    self._accept()
                    continue
                conn = key.data
                if mask & selectors.EVENT_READ:
                    self._read(conn)
                if mask & selectors.EVENT_WRITE and conn.sock.fileno() >= 0:
                    self._flush(conn)
            self._expire_pending(time.monotonic())

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:  # EMFILE and the like: say so, keep serving the connected
            self._limit(f"cannot accept a connection: {err}")
            return
        peer = _peer_host(sock)
        waiting = [c for c in self._conns.values() if c.session is None]
        from_peer = sum(1 for c in waiting if c.peer == peer)
        if (
            len(waiting) >= _MAX_PENDING
            or from_peer >= _MAX_PENDING_PER_PEER
            or len(self._conns) - len(waiting) >= self.limits.max_clients
        ):
            self.rejected += 1
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock, time.monotonic(), peer)
        self._conns[sock.fileno()] = conn
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _expire_pending(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.session is None and now - c.accepted > AUTH_WINDOW_S]:
            self.rejected += 1
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        conn.rbuf += chunk
        try:
            self._process(conn)
        except ValueError:  # a malformed frame or a failed proof: the connection is not ours
            self.rejected += 1
            self._drop(conn)
            return
        self._flush(conn)

    def _process(self, conn: _Conn) -> None:
        if conn.client_nonce is None:  # hello: magic + client nonce
            if len(conn.rbuf) < len(_MAGIC) + _NONCE:
                return
            if bytes(conn.rbuf[: len(_MAGIC)]) != _MAGIC:
                raise ValueError("not a store client")
            conn.client_nonce = bytes(conn.rbuf[len(_MAGIC) : len(_MAGIC) + _NONCE])
            del conn.rbuf[: len(_MAGIC) + _NONCE]
            conn.wbuf += conn.server_nonce + _proof(self._key, b"server", conn.client_nonce, conn.server_nonce)
        if conn.session is None:  # the client's proof
            if len(conn.rbuf) < 32:
                return
            want = _proof(self._key, b"client", conn.server_nonce, conn.client_nonce)
            if not hmac.compare_digest(bytes(conn.rbuf[:32]), want):
                raise ValueError("bad proof")
            del conn.rbuf[:32]
            authed = sum(1 for c in self._conns.values() if c.session is not None)
            if authed >= self.limits.max_clients:
                self._limit(f"{authed} supervisors connected: connection limit reached")
                raise ValueError("too many clients")
            conn.session = _Session(self._key, conn.client_nonce, conn.server_nonce, server=True)
            conn.wbuf += _OK  # the client counts itself connected only now (a handshake may expire unfinished)
        while len(conn.rbuf) >= 4:
            (n,) = struct.unpack_from(">I", conn.rbuf)
            if n > _MAX_FRAME:
                raise ValueError("frame too large")
            if len(conn.rbuf) < 4 + n:
                return
            body = bytes(conn.rbuf[4 : 4 + n])
            del conn.rbuf[: 4 + n]
            payload = conn.session.open(body)
            if payload is None or not payload:
                raise ValueError("bad MAC")
            conn.wbuf += conn.session.seal(self._handle(payload[:1], _unpack(payload[1:])))

    def _flush(self, conn: _Conn) -> None:
        if conn.wbuf:
            try:
                sent = conn.sock.send(conn.wbuf)
                del conn.wbuf[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._drop(conn)
                return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.wbuf else 0)
        try:
            self._sel.modify(conn.sock, events, conn)
        except (KeyError, ValueError):
            pass

    # -- operations --

    def _limit(self, why: str) -> None:
        if why not in self._limit_said:
            self._limit_said.add(why)
            self._on_limit(why)

    def _put(self, key: bytes, value: bytes) -> str | None:
        """Store `value` at `key` unless a bound forbids it (the reason)."""
        old = self.data.get(key)
        grow = len(value) - (len(old) if old is not None else -len(key))
        if old is None and len(self.data) >= self.limits.max_keys:
            why = f"key limit of {self.limits.max_keys} reached; refused {key[:80]!r}"
            self._limit(f"key limit of {self.limits.max_keys} reached")
            return why
        if self.bytes_held + grow > self.limits.max_bytes:
            why = f"byte limit of {self.limits.max_bytes} reached; refused {len(value)} bytes at {key[:80]!r}"
            self._limit(f"byte limit of {self.limits.max_bytes} reached")
            return why
        self.data[key] = value
        self.bytes_held += grow
        return None

    def _handle(self, op: bytes, args: list[bytes]) -> bytes:
        if op == _SET and len(args) == 2:
            why = self._put(args[0], args[1])
            return _REFUSED + _pack(why.encode()) if why else _OK
        if op == _MGET:
            return _OK + _pack(*[b"\x01" + self.data[k] if k in self.data else b"\x00" for k in args])
        if op == _CHECK:
            return _OK + (b"\x01" if all(k in self.data for k in args) else b"\x00")
        if op == _CAS and len(args) == 3:
            key, expected, new = args
            held = self.data.get(key)
            if (held is None and expected == b"") or held == expected:
                why = self._put(key, new)
                if why:
                    return _REFUSED + _pack(why.encode())
                held = new
            return _OK + _pack(held or b"")
        if op == _DEL and len(args) == 1:
            held = self.data.pop(args[0], None)
            if held is not None:
                self.bytes_held -= len(args[0]) + len(held)
            return _OK + (b"\x01" if held is not None else b"\x00")
        if op == _DELPREFIX and len(args) == 1:
            gone = [k for k in self.data if k.startswith(args[0])]
            for k in gone:
                self.bytes_held -= len(k) + len(self.data.pop(k))
            return _OK + _pack(str(len(gone)).encode())
        if op == _COUNT:
            return _OK + _pack(str(len(self.data)).encode())
        if op == _PING:
            return _OK
        raise ValueError(f"unknown operation {op!r}")


# -- the client ------------------------------------------------------------------------------------


class StoreClient:
    """One authenticated connection; every call has a deadline. Safe to share between threads (calls are
    serialized); a thread that must not wait behind another (the lease) opens its own."""

    def __init__(self, addr: str, port: int, key: bytes, *, connect_timeout_s: float, op_timeout_s: float) -> None:
        self.addr, self.port, self.op_timeout_s = addr, port, op_timeout_s
        self._key = key
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._session: _Session | None = None
        self._connect(time.monotonic() + connect_timeout_s)

    def _connect(self, deadline: float) -> None:
        """Connect and prove the secret, retrying until `deadline`. Retries back off exponentially with
        jitter: a server holding its most pending handshakes closes the rest at accept, and a whole
        allocation's supervisors retrying in lockstep would keep it full."""
        last: Exception | None = None
        pause = _RETRY_FIRST_S
        while True:
            left = deadline - time.monotonic()
            try:
                sock = socket.create_connection((self.addr, self.port), timeout=max(0.05, min(left, self.op_timeout_s)))
                try:
                    self._handshake(sock)
                except BaseException:
                    sock.close()
                    raise
                return
            except (OSError, ValueError) as err:
                last = err
            wait = pause * random.uniform(0.5, 1.5)
            if time.monotonic() + wait > deadline:
                raise StoreUnavailable(f"cannot reach the coordination store at {self.addr}:{self.port}: {last}")
            time.sleep(wait)
            pause = min(2 * pause, _RETRY_MAX_S)

    def _handshake(self, sock: socket.socket) -> None:
        sock.settimeout(self.op_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        nonce = os.urandom(_NONCE)
        sock.sendall(_MAGIC + nonce)
        reply = _recv_exactly(sock, _NONCE + 32)
        server_nonce, proof = reply[:_NONCE], reply[_NONCE:]
        if not hmac.compare_digest(proof, _proof(self._key, b"server", nonce, server_nonce)):
            raise StoreUnavailable(f"{self.addr}:{self.port} is not this job's coordination store (bad proof)")
        sock.sendall(_proof(self._key, b"client", server_nonce, nonce))
        # An overloaded server may close a handshake it did not finish within AUTH_WINDOW_S: its accept is
        # what makes this connection usable, and a connection closed here is retried within the deadline.
        if _recv_exactly(sock, 1) != _OK:
            raise StoreUnavailable(f"{self.addr}:{self.port}: the store did not accept the proof")
        self._sock, self._session = sock, _Session(self._key, nonce, server_nonce, server=False)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _call(self, op: bytes, *args: bytes) -> list[bytes]:
        with self._lock:
            if self._sock is None or self._session is None:
                raise StoreUnavailable(f"connection to {self.addr}:{self.port} closed")
            try:
                self._sock.sendall(self._session.seal(op + _pack(*args)))
                (n,) = struct.unpack(">I", _recv_exactly(self._sock, 4))
                if n > _MAX_FRAME:
                    raise StoreUnavailable("reply too large")
                payload = self._session.open(_recv_exactly(self._sock, n))
            except (OSError, struct.error) as err:
                self._sock.close()
                self._sock = None
                if isinstance(err, StoreUnavailable):
                    raise
                what = "no answer" if isinstance(err, TimeoutError) else str(err)
                raise StoreUnavailable(
                    f"coordination store at {self.addr}:{self.port}: {what} (deadline {self.op_timeout_s:g}s)"
                ) from None
            if payload is None:
                self._sock.close()
                self._sock = None
                raise StoreUnavailable(f"coordination store at {self.addr}:{self.port}: a reply failed its MAC")
        status, rest = payload[:1], payload[1:]
        if status == _REFUSED:
            raise StoreRefused(_unpack(rest)[0].decode(errors="replace"))
        return _unpack(rest) if op not in (_CHECK, _DEL) else [rest]

    def set(self, key: str, value: bytes) -> None:
        self._call(_SET, key.encode(), value)

    def multi_get(self, keys: Sequence[str]) -> list[bytes | None]:
        """Each key's value, None where absent, in one round trip."""
        got = self._call(_MGET, *(k.encode() for k in keys))
        return [g[1:] if g[:1] == b"\x01" else None for g in got]

    def check(self, keys: Sequence[str]) -> bool:
        return self._call(_CHECK, *(k.encode() for k in keys))[0] == b"\x01"

    def compare_set(self, key: str, expected: bytes, new: bytes) -> bytes:
        """Set `key` to `new` if it holds `expected` (b"": absent); returns what it holds afterwards."""
        return self._call(_CAS, key.encode(), expected, new)[0]

    def delete(self, key: str) -> bool:
        return self._call(_DEL, key.encode())[0] == b"\x01"

    def delete_prefix(self, prefix: str) -> int:
        return int(self._call(_DELPREFIX, prefix.encode())[0])

    def count(self) -> int:
        return int(self._call(_COUNT)[0])

    def ping(self) -> None:
        self._call(_PING)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise StoreUnavailable("connection closed by the store")
        buf += chunk
    return bytes(buf)


def host_store(
    addr: str, port: int, key: bytes, limits: StoreLimits = StoreLimits(), on_limit: Callable[[str], None] | None = None
) -> StoreServer:
    """The store's server listening on `addr`:`port` only (port 0: any free port)."""
    return StoreServer(bound_listener(addr, port), key, limits, on_limit)
