"""A Green-API ``getChats`` simulator: a real HTTP server on loopback.

Used by the demo, the tests and the benchmarks. It serves
``GET /waInstance{id}/getChats/{token}[?count=N]`` for a set of simulated instances whose
chat lists evolve deterministically (from a seed) each time :meth:`Simulator.step` is called,
and it can inject faults (error statuses, delays, connection resets, truncated or odd bodies).

Only the standard library is required; ``orjson`` is used for serialisation when importable.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import logging
import math
import random
import re
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, cast
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["ChangeRates", "Fault", "RequestLog", "Simulator"]

_log = logging.getLogger(__name__)

#: Allowed values of ``ephemeralExpiration`` (seconds; 0 = off).
EPHEMERAL_VALUES: Final = (0, 86400, 604800, 7776000)
_NONZERO_EPHEMERAL: Final = (86400, 604800, 7776000)
FAULT_MODES: Final = frozenset({"normal", "reset", "truncate", "html", "object", "empty", "huge"})
#: Seconds the simulated clock advances per :meth:`Simulator.step`.
STEP_SECONDS: Final = 60
_TIMESTAMP_ANCHOR: Final = 1_700_000_000
_ACTIVITY_RATE: Final = 0.05
_MAX_LOG: Final = 100_000
_MAX_DISCARD_BODY: Final = 1 << 20

_PATH_RE: Final = re.compile(r"^/waInstance(\d{1,19})/getChats/([^/]+)$")
_REDACT_RE: Final = re.compile(r"(/waInstance[^/\s\"]*/[^/\s\"]*/)[^\s?#\"]*")

_USER_NAMES: Final = (
    "John Doe",
    "Jane Doe",
    "Маша 🌸",
    "Иван Петров",
    "Анна-Мария",
    "Саша (работа)",
    "Папа",
    "Mom ❤️",
    "محمد علي",
    "فاطمة الزهراء",
    "שרה כהן",
    "דוד לוי",
    "Li Wei 李伟",
    "Nguyễn Văn An",
    "Zoë O'Brien",
    "Dr. Smith",
    "Carlos 🇪🇸",
    "Курьер Доставка",
    "Support",
    "Olga",
    "Dmitry K.",
    "👨‍👩‍👧 Family",
    "Ahmed",
    "Priya Sharma",
    "",
    "+7 900 123-45-67",
)
_GROUP_NAMES: Final = (
    "Team 🚀 Alpha",
    "Семья",
    "Project X",
    "Dev chat",
    "Соседи 🏠",
    "משפחה",
    "أصدقاء العمل",
    "Book club 📚",
    "Футбол по средам ⚽",
    "Parents 5B",
    "",
    "Release notes / announcements — " + "очень длинное название группы " * 3,
)
_NAME_SUFFIXES: Final = ("", "", "", " 2", " (work)", " 🔥", " ✨", " ✓")


def _load_fast_dumps() -> Callable[[object], bytes] | None:
    try:
        module = importlib.import_module("orjson")
    except ImportError:
        return None
    dumps: Callable[[object], bytes] = module.dumps
    return dumps


_FAST_DUMPS: Final = _load_fast_dumps()


def _dumps(obj: object) -> bytes:
    """Serialise to compact UTF-8 JSON (orjson when available; falls back to json)."""
    if _FAST_DUMPS is not None:
        try:
            return _FAST_DUMPS(obj)
        except Exception:  # e.g. ints beyond 64 bits in a malformed payload
            pass
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: fall back to \u escapes
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _redact(text: str) -> str:
    """Replace the token segment of any Green-API style path with ``***``."""
    return _REDACT_RE.sub(r"\1***", text)


def _toml_str(value: str) -> str:
    """A TOML basic string literal."""
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _reason(status: int) -> str:
    special = {466: "Quota Exceeded", 499: "Client Closed Request"}
    if status in special:
        return special[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _default_body(status: int) -> tuple[bytes, str]:
    """Default (body, content type) for an error status without an explicit body."""
    if status == 400:
        return b"bad request data", "text/plain; charset=utf-8"
    if status == 466:
        payload = {
            "invokeStatus": {
                "status": "QUOTE_ALLOWED_EXCEEDED",
                "description": "Monthly quota has been exceeded",
            },
            "correspondentsStatus": {
                "status": "CORRESPONDENTS_QUOTE_EXCEEDED",
                "description": "Subscribe to remove the correspondents quota",
            },
        }
        return _dumps(payload), "application/json"
    return _reason(status).encode(), "text/plain; charset=utf-8"


def _sniff_content_type(body: bytes) -> str:
    head = body.lstrip()[:1]
    if head in (b"[", b"{"):
        return "application/json"
    if head == b"<":
        return "text/html; charset=utf-8"
    return "text/plain; charset=utf-8"


def _html_page(status: int) -> bytes:
    if status == 200:
        title, text = "Login required", "Please sign in to continue to the network."
    else:
        title = text = f"{status} {_reason(status)}"
    return (
        f"<!DOCTYPE html>\n<html><head><title>{title}</title></head>"
        f"<body><center><h1>{text}</h1></center><hr><center>nginx</center></body></html>\n"
    ).encode()


def _randround(rng: random.Random, expected: float) -> int:
    """An integer whose expected value is ``expected`` (>= 0)."""
    if expected <= 0:
        return 0
    whole = int(expected)
    return whole + (1 if rng.random() < expected - whole else 0)


def _name_variants(pool: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name + suffix if name else "" for name in pool for suffix in _NAME_SUFFIXES)


_USER_VARIANTS: Final = _name_variants(_USER_NAMES)
_GROUP_VARIANTS: Final = _name_variants(_GROUP_NAMES)
_EXPIRATION_PICK: Final = (86400, 604800, 7776000, 604800)


def _make_chats(rng: random.Random, anchor: int, taken: set[str], n: int) -> list[Any]:
    """``n`` plausible chats with ids not in ``taken`` (they are added to it).

    ~75 % people (``79…@c.us``), ~10 % ``@lid``, ~15 % groups (old and new id styles); ~20 %
    with disappearing messages set before ``anchor``; ~6 % archived. Kept tight for speed.
    """
    out: list[Any] = []
    append = out.append
    getbits = rng.getrandbits
    users, groups = _USER_VARIANTS, _GROUP_VARIANTS
    n_users, n_groups = len(users), len(groups)
    while len(out) < n:
        bits = getbits(32)
        kind = bits & 0xFF
        if kind < 192:
            chat_id = f"79{100_000_000 + getbits(30) % 900_000_000}@c.us"
            chat_type = "user"
            name = users[(bits >> 22) % n_users]
        elif kind < 218:
            chat_id = f"{100_000_000_000_000 + getbits(50) % 900_000_000_000_000}@lid"
            chat_type = "user"
            name = users[(bits >> 22) % n_users]
        elif kind < 237:
            phone = 100_000_000 + getbits(30) % 900_000_000
            chat_id = f"79{phone}-{1_400_000_000 + getbits(28)}@g.us"
            chat_type = "group"
            name = groups[(bits >> 22) % n_groups]
        else:
            chat_id = f"120363{100_000_000_000 + getbits(40) % 900_000_000_000}@g.us"
            chat_type = "group"
            name = groups[(bits >> 22) % n_groups]
        if chat_id in taken:
            continue
        taken.add(chat_id)
        if (bits >> 8) & 0xFF < 51:
            expiration = _EXPIRATION_PICK[(bits >> 16) & 3]
            stamp = anchor - 3600 - getbits(25)  # up to ~13 months before the anchor
        else:
            expiration = stamp = 0
        append(
            {
                "archive": (bits >> 18) & 0xF == 0,
                "id": chat_id,
                "ephemeralExpiration": expiration,
                "ephemeralSettingTimestamp": stamp,
                "name": name,
                "type": chat_type,
            }
        )
    return out


@dataclass
class ChangeRates:
    """Per :meth:`Simulator.step`, the expected fraction of an instance's chats affected."""

    new: float = 0.01
    rename: float = 0.01
    archive: float = 0.01
    ephemeral: float = 0.01
    removal: float = 0.005


@dataclass
class Fault:
    """What to do instead of a normal answer for one instance.

    ``mode``: ``normal`` (answer ``status`` with ``body`` or a default body; a plain
    ``Fault(delay=...)`` only delays the normal answer), ``reset`` (headers + part of the body,
    then a TCP reset), ``truncate`` (the first half of the JSON body, with a Content-Length that
    matches what is sent, then close), ``html``, ``object`` (``{"error": "x"}``), ``empty``
    (``[]``) or ``huge`` (``huge_count`` generated chats). Every mode answers with ``status``.
    """

    status: int = 200
    body: bytes | None = None
    delay: float = 0.0
    retry_after: str | None = None
    mode: str = "normal"
    times: int | None = None
    huge_count: int = 100_000
    content_type: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; expected one of {FAULT_MODES}")
        if not 100 <= self.status <= 599:
            raise ValueError(f"HTTP status out of range: {self.status}")
        if self.delay < 0:
            raise ValueError("delay must be >= 0")
        if self.times is not None and self.times < 0:
            raise ValueError("times must be >= 0 or None")
        if self.huge_count < 0:
            raise ValueError("huge_count must be >= 0")

    @property
    def is_pure_delay(self) -> bool:
        """True when the fault only delays an otherwise normal answer."""
        return self.mode == "normal" and self.status == 200 and self.body is None


@dataclass(frozen=True)
class RequestLog:
    """One request the simulator received (the token never appears in it).

    ``count`` is the ``?count=`` query value (None if absent or not an integer); ``served`` is
    the number of chats in a JSON-array answer (None for other answers).
    """

    id_instance: int | None
    path_redacted: str
    status: int
    count: int | None
    at: float
    served: int | None = None


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    mode: str = "normal"  # normal | reset | truncate


@dataclass
class _ActiveFault:
    fault: Fault
    remaining: int | None


class _Instance:
    """State of one simulated instance (chats are generated lazily)."""

    __slots__ = ("id_instance", "token", "rng", "chats", "steps_applied", "body", "ids", "flat")

    def __init__(self, id_instance: int, token: str, seed: int) -> None:
        self.id_instance = id_instance
        self.token = token
        self.rng = random.Random(f"chatsync-sim:{seed}:{id_instance}")
        self.chats: list[Any] | None = None
        self.steps_applied = 0
        self.body: bytes | None = None
        self.ids: set[str] | None = None
        self.flat = True  # chats are flat dicts of scalars (false after set_chats)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], sim: Simulator) -> None:
        self.sim = sim
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        _log.debug("simulator: connection %s ended: %s", client_address, type(exc).__name__)

    def close_connections(self) -> None:
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "chatsync-sim"
    sys_version = ""

    def _srv(self) -> _Server:
        return cast(_Server, self.server)

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        srv = self._srv()
        with srv.connections_lock:
            srv.connections.add(self.connection)

    def finish(self) -> None:
        srv = self._srv()
        with srv.connections_lock:
            srv.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("simulator %s: %s", self.client_address[0], _redact(format % args))

    def _discard_body(self) -> None:
        """Read and drop a request body so the keep-alive connection stays in sync."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if 0 < length <= _MAX_DISCARD_BODY:
            self.rfile.read(length)
        elif length or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True

    def do_GET(self) -> None:
        self._discard_body()
        reply = self._srv().sim._handle_get(self.path)
        self._write(reply, head=False)

    def _not_found(self) -> None:
        self._discard_body()
        reply = self._srv().sim._handle_other(self.path)
        self._write(reply, head=self.command == "HEAD")

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_found

    def _write(self, reply: _Reply, *, head: bool) -> None:
        body = reply.body
        declared = len(body)
        close = self.close_connection
        if reply.mode == "truncate":
            body = body[: len(body) // 2]
            declared = len(body)
            close = True
        elif reply.mode == "reset":
            body = body[: len(body) // 2]
            close = True
        lines = [
            f"HTTP/1.1 {reply.status} {_reason(reply.status)}",
            f"Server: {self.server_version}",
            f"Date: {self.date_time_string()}",
            f"Content-Type: {reply.content_type}",
            f"Content-Length: {declared}",
        ]
        lines.extend(f"{name}: {value}" for name, value in reply.headers)
        if close and reply.mode != "reset":  # a reset should look like a normal answer
            lines.append("Connection: close")
        head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.close_connection = close
        self.log_request(reply.status, declared)
        try:
            if reply.mode == "reset":
                self.wfile.write(head_bytes + body)
                time.sleep(0.02)  # let the client start reading the body
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()  # really closed (RST) once rfile closes in finish()
            else:
                self.wfile.write(head_bytes if head else head_bytes + body)
        except OSError:
            self.close_connection = True


class Simulator:
    """A loopback Green-API server simulating ``instances`` WhatsApp instances."""

    def __init__(
        self,
        *,
        instances: int = 5,
        chats: int = 200,
        seed: int = 0,
        token: str | None = None,
        first_id: int = 1101000001,
        rates: ChangeRates | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        tick_seconds: float | None = None,
        start_time: int | None = None,
        step_seconds: int | None = None,
    ) -> None:
        if instances < 0 or chats < 0:
            raise ValueError("instances and chats must be >= 0")
        if token is not None and not token:
            raise ValueError("token must be non-empty")
        if tick_seconds is not None and tick_seconds <= 0:
            raise ValueError("tick_seconds must be > 0")
        self._seed = seed
        self._initial_chats = chats
        self._rates = replace(rates) if rates is not None else ChangeRates()
        self._host = host
        self._port = port
        self._tick_seconds = tick_seconds
        # Simulated seconds per step: 60 by default; with a real tick, the tick itself
        # (rounded up), so the simulated clock keeps pace with the wall clock.
        if step_seconds is None:
            step_seconds = max(1, math.ceil(tick_seconds)) if tick_seconds else STEP_SECONDS
        self._step_seconds = step_seconds
        self._start_time = int(time.time()) if start_time is None else int(start_time)
        self._anchor = min(self._start_time, _TIMESTAMP_ANCHOR)
        self._steps = 0
        self._lock = threading.RLock()
        self._instances: dict[int, _Instance] = {}
        for id_instance in range(first_id, first_id + instances):
            inst_token = token if token is not None else self._derive_token(id_instance)
            self._instances[id_instance] = _Instance(id_instance, inst_token, seed)
        self._faults: dict[int, _ActiveFault] = {}
        self._counts: dict[int, int] = {}
        self._log: deque[RequestLog] = deque(maxlen=_MAX_LOG)
        self._huge_cache: dict[tuple[int, int], bytes] = {}
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._bound_port: int | None = None

    def _derive_token(self, id_instance: int) -> str:
        return hashlib.sha256(f"chatsync-sim:{self._seed}:{id_instance}".encode()).hexdigest()[:50]

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> Simulator:
        """Serve in daemon background threads; returns self. A stopped simulator restarts
        on the same port."""
        if self._server is not None:
            return self
        port = self._port or self._bound_port or 0
        server = _Server((self._host, port), self)
        self._bound_port = int(server.server_address[1])
        self._stopping = threading.Event()
        self._server = server
        serve = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"chatsync-sim-{self._bound_port}",
            daemon=True,
        )
        self._threads = [serve]
        if self._tick_seconds is not None:
            ticker = threading.Thread(
                target=self._tick_loop,
                args=(self._tick_seconds, self._stopping),
                name=f"chatsync-sim-tick-{self._bound_port}",
                daemon=True,
            )
            self._threads.append(ticker)
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Shut down the server and threads, close sockets; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _tick_loop(self, interval: float, stopping: threading.Event) -> None:
        while not stopping.wait(interval):
            self.step()

    # --- properties ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT`` (valid after :meth:`start`)."""
        if self._bound_port is None:
            raise RuntimeError("simulator not started")
        return f"http://{self._host}:{self._bound_port}"

    @property
    def instance_ids(self) -> list[int]:
        """Ids of the served instances."""
        return list(self._instances)

    @property
    def now(self) -> int:
        """The simulated clock (unix seconds): start time + 60 s per step."""
        with self._lock:
            return self._start_time + self._step_seconds * self._steps

    @property
    def rates(self) -> ChangeRates:
        """A copy of the change rates (fixed at construction)."""
        return replace(self._rates)

    @property
    def requests(self) -> list[RequestLog]:
        """Received requests, oldest first (the most recent 100,000)."""
        with self._lock:
            return list(self._log)

    def token_for(self, id_instance: int) -> str:
        """The token an instance accepts."""
        return self._get(id_instance).token

    # --- state -----------------------------------------------------------------------------

    def _get(self, id_instance: int) -> _Instance:
        try:
            return self._instances[id_instance]
        except KeyError:
            raise KeyError(f"instance {id_instance} is not simulated") from None

    def _materialize(self, inst: _Instance) -> list[Any]:
        """Generate (lazily) and catch up with pending steps. Caller holds the lock."""
        if inst.chats is None:
            taken: set[str] = set()
            inst.chats = _make_chats(inst.rng, self._anchor, taken, self._initial_chats)
            inst.ids = taken
            inst.body = None
        while inst.steps_applied < self._steps:
            inst.steps_applied += 1
            self._evolve(inst, self._start_time + self._step_seconds * inst.steps_applied)
            inst.body = None
        return inst.chats

    def _evolve(self, inst: _Instance, now: int) -> None:
        chats = inst.chats
        assert chats is not None
        rng = inst.rng
        rates = self._rates
        n = len(chats)
        if inst.ids is None:
            inst.ids = {
                c["id"] for c in chats if isinstance(c, dict) and isinstance(c.get("id"), str)
            }
        ids = inst.ids

        def to_front(index: int) -> None:
            chats.insert(0, chats.pop(index))

        for _ in range(_randround(rng, rates.removal * n)):
            if chats:
                gone = chats.pop(rng.randrange(len(chats)))
                gone_id = gone.get("id") if isinstance(gone, dict) else None
                if isinstance(gone_id, str):
                    ids.discard(gone_id)
        for _ in range(_randround(rng, rates.rename * n)):
            if not chats:
                break
            index = rng.randrange(len(chats))
            chat = chats[index]
            if isinstance(chat, dict):
                pool = _GROUP_NAMES if chat.get("type") == "group" else _USER_NAMES
                new_name = rng.choice(pool) + rng.choice(_NAME_SUFFIXES)
                if new_name == chat.get("name"):
                    new_name += " ✓"
                chat["name"] = new_name
                to_front(index)
        for _ in range(_randround(rng, rates.archive * n)):
            if not chats:
                break
            chat = chats[rng.randrange(len(chats))]
            if isinstance(chat, dict):
                chat["archive"] = not chat.get("archive")
        for _ in range(_randround(rng, rates.ephemeral * n)):
            if not chats:
                break
            index = rng.randrange(len(chats))
            chat = chats[index]
            if isinstance(chat, dict):
                current = chat.get("ephemeralExpiration")
                choices = [v for v in EPHEMERAL_VALUES if v != current]
                chat["ephemeralExpiration"] = rng.choice(choices)
                chat["ephemeralSettingTimestamp"] = now
                to_front(index)
        for _ in range(_randround(rng, _ACTIVITY_RATE * n)):
            if chats:
                to_front(rng.randrange(len(chats)))
        chats[:0] = _make_chats(rng, now, ids, _randround(rng, rates.new * n))

    def step(self, n: int = 1) -> None:
        """Evolve every instance ``n`` times and advance the simulated clock by 60 s per step.

        Deterministic from the seed; applied lazily to an instance when it is next read.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._steps += n

    def chats(self, id_instance: int) -> list[dict[str, object]]:
        """A deep copy of an instance's current payload, in activity order."""
        with self._lock:
            inst = self._get(id_instance)
            chats = self._materialize(inst)
            if inst.flat:
                return [dict(chat) for chat in chats]
            return copy.deepcopy(chats)

    def set_chats(self, id_instance: int, chats: Sequence[object]) -> None:
        """Replace an instance's chat list exactly (served as given, even malformed)."""
        with self._lock:
            inst = self._get(id_instance)
            self._materialize(inst)  # keep the rng sequence independent of when this is called
            inst.chats = copy.deepcopy(list(chats))
            inst.flat = False
            inst.ids = None
            inst.body = None

    def set_fault(self, id_instance: int, fault: Fault | None) -> None:
        """Inject a fault for one instance id (any id, served or not); None clears."""
        with self._lock:
            if fault is None or fault.times == 0:
                self._faults.pop(id_instance, None)
            else:
                self._faults[id_instance] = _ActiveFault(replace(fault), fault.times)

    def request_count(self, id_instance: int | None = None) -> int:
        """getChats requests received (all ids if None), including faulted and 401/403."""
        with self._lock:
            if id_instance is None:
                return sum(self._counts.values())
            return self._counts.get(id_instance, 0)

    def reset_counts(self) -> None:
        """Clear the request counters and the request log."""
        with self._lock:
            self._counts.clear()
            self._log.clear()

    def config_toml(self, *, interval_seconds: int = 60, database_url: str | None = None) -> str:
        """A ready-to-use chatsync TOML config pointing at this simulator."""
        lines = [f"# chatsync config for the Green-API simulator at {self.url} (loopback only)"]
        if database_url is not None:
            lines.append(f"database_url = {_toml_str(database_url)}")
        lines += [
            "",
            "[defaults]",
            f"api_url = {_toml_str(self.url)}",
            f"interval_seconds = {int(interval_seconds)}",
        ]
        for number, (id_instance, inst) in enumerate(self._instances.items(), start=1):
            lines += [
                "",
                "[[instances]]",
                f"id_instance = {id_instance}",
                f"api_token = {_toml_str(inst.token)}  # inline token (loopback simulator only)",
                f"label = {_toml_str(f'Simulated {number}')}",
            ]
        return "\n".join(lines) + "\n"

    # --- HTTP handling (called from server threads) ----------------------------------------

    def _record(
        self,
        id_instance: int | None,
        path: str,
        status: int,
        count: int | None,
        served: int | None = None,
    ) -> None:
        entry = RequestLog(id_instance, _redact(path), status, count, time.monotonic(), served)
        with self._lock:
            self._log.append(entry)

    def _handle_other(self, path: str) -> _Reply:
        self._record(None, path, 404, None)
        return _Reply(404, b"Not Found", "text/plain; charset=utf-8")

    def _handle_get(self, raw_path: str) -> _Reply:
        parts = urlsplit(raw_path)
        match = _PATH_RE.match(parts.path)
        if match is None:
            return self._handle_other(raw_path)
        id_instance = int(match.group(1))
        token = unquote(match.group(2))
        count_values = parse_qs(parts.query, keep_blank_values=True).get("count")
        count: int | None = None
        bad_count = False
        if count_values is not None:
            try:
                count = int(count_values[0])
            except ValueError:
                bad_count = True
            else:
                bad_count = count <= 0
        with self._lock:
            self._counts[id_instance] = self._counts.get(id_instance, 0) + 1
            fault = self._take_fault(id_instance)
        if fault is not None:
            if fault.delay > 0 and self._stopping.wait(fault.delay):
                return self._record_reply(
                    id_instance, raw_path, count, _Reply(503, b"", "text/plain")
                )
            if not fault.is_pure_delay:
                reply = self._fault_reply(fault, id_instance)
                served = None
                if fault.mode == "empty":
                    served = 0
                elif fault.mode == "huge":
                    served = fault.huge_count
                return self._record_reply(id_instance, raw_path, count, reply, served)
        inst = self._instances.get(id_instance)
        if inst is None:
            reply = _Reply(403, b"Forbidden", "text/plain; charset=utf-8")
            return self._record_reply(id_instance, raw_path, count, reply)
        if token != inst.token:
            reply = _Reply(401, b"Unauthorized", "text/plain; charset=utf-8")
            return self._record_reply(id_instance, raw_path, count, reply)
        if bad_count:
            reply = _Reply(400, b'{"message":"bad request data"}', "application/json")
            return self._record_reply(id_instance, raw_path, count, reply)
        body, served = self._payload(inst, count)
        reply = _Reply(200, body, "application/json")
        return self._record_reply(id_instance, raw_path, count, reply, served)

    def _record_reply(
        self,
        id_instance: int,
        path: str,
        count: int | None,
        reply: _Reply,
        served: int | None = None,
    ) -> _Reply:
        self._record(id_instance, path, reply.status, count, served)
        return reply

    def _take_fault(self, id_instance: int) -> Fault | None:
        """The fault for this request, consuming one of its ``times``. Caller holds the lock."""
        active = self._faults.get(id_instance)
        if active is None:
            return None
        if active.remaining is not None:
            active.remaining -= 1
            if active.remaining <= 0:
                del self._faults[id_instance]
        return active.fault

    def _payload(self, inst: _Instance, count: int | None) -> tuple[bytes, int]:
        """Serialised chats (cached until the state changes) and how many were included."""
        with self._lock:
            chats = self._materialize(inst)
            if count is not None and count < len(chats):
                return _dumps(chats[:count]), count
            if inst.body is None:
                inst.body = _dumps(chats)
            return inst.body, len(chats)

    def _huge_body(self, id_instance: int, huge_count: int) -> bytes:
        key = (id_instance, huge_count)
        with self._lock:
            cached = self._huge_cache.get(key)
        if cached is not None:
            return cached
        rng = random.Random(f"chatsync-sim-huge:{self._seed}:{id_instance}")
        taken: set[str] = set()
        body = _dumps(_make_chats(rng, self._anchor, taken, huge_count))
        with self._lock:
            if len(self._huge_cache) >= 4:
                self._huge_cache.clear()
            self._huge_cache[key] = body
        return body

    def _fault_reply(self, fault: Fault, id_instance: int) -> _Reply:
        headers = [("Retry-After", fault.retry_after)] if fault.retry_after is not None else []
        status = fault.status
        mode = fault.mode
        if fault.body is not None:
            body = fault.body
            content_type = fault.content_type or _sniff_content_type(body)
        elif mode in ("reset", "truncate"):
            inst = self._instances.get(id_instance)
            body = self._payload(inst, None)[0] if inst is not None else b"[]"
            content_type = "application/json"
        elif mode == "html":
            body, content_type = _html_page(status), "text/html; charset=utf-8"
        elif mode == "object":
            body, content_type = b'{"error":"x"}', "application/json"
        elif mode == "empty":
            body, content_type = b"[]", "application/json"
        elif mode == "huge":
            body, content_type = self._huge_body(id_instance, fault.huge_count), "application/json"
        else:
            body, content_type = _default_body(status)
        if fault.content_type is not None:
            content_type = fault.content_type
        wire_mode = mode if mode in ("reset", "truncate") else "normal"
        return _Reply(status, body, content_type, headers, wire_mode)
