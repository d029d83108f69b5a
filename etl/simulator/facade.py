"""The :class:`Simulator` facade: construction, lifecycle and what tests and demos control.

The state it controls lives in :class:`~etl.simulator.api.GreenApi`, which the server threads
answer from; every change here takes the same lock as they do.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Final

from etl.simulator import forms
from etl.simulator.api import GreenApi, RequestLog
from etl.simulator.chats import ChangeRates
from etl.simulator.faults import Fault, FaultTable
from etl.simulator.instance import Instance, Scenario
from etl.simulator.server import Server

#: Seconds the simulated clock advances per :meth:`Simulator.step`.
STEP_SECONDS: Final = 60
#: The first lists' disappearing-message settings predate this (or the start time if earlier).
_TIMESTAMP_ANCHOR: Final = 1_700_000_000


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


class Simulator:
    """A loopback Green-API server simulating ``instances`` WhatsApp (or Telegram, MAX)
    instances.

    ``platform``: the messenger every instance serves (``set_platform`` per instance);
    ``lid_switch_at_step``: from that step on every WhatsApp instance is in LID mode
    (``set_lid_mode`` per instance, at any time); ``check_quota``: the checkWhatsapp
    requests each instance may make (a plan's monthly quota), then 466.
    """

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
        platform: str = "whatsapp",
        lid_switch_at_step: int | None = None,
        check_quota: int | None = None,
    ) -> None:
        if instances < 0 or chats < 0:
            raise ValueError("instances and chats must be >= 0")
        if token is not None and not token:
            raise ValueError("token must be non-empty")
        if tick_seconds is not None and tick_seconds <= 0:
            raise ValueError("tick_seconds must be > 0")
        if platform not in forms.PLATFORMS:
            raise ValueError(f"platform must be one of {forms.PLATFORMS}")
        self._seed = seed
        self._host = host
        self._port = port
        self._tick_seconds = tick_seconds
        # Simulated seconds per step: 60 by default; with a real tick, the tick itself
        # (rounded up), so the simulated clock keeps pace with the wall clock.
        if step_seconds is None:
            step_seconds = max(1, math.ceil(tick_seconds)) if tick_seconds else STEP_SECONDS
        start = int(time.time()) if start_time is None else int(start_time)
        scenario = Scenario(
            seed=seed,
            initial_chats=chats,
            rates=replace(rates) if rates is not None else ChangeRates(),
            start_time=start,
            step_seconds=step_seconds,
            anchor=min(start, _TIMESTAMP_ANCHOR),
            platform=platform,
            lid_switch_step=lid_switch_at_step,
            check_quota=check_quota,
        )
        self._instances: dict[int, Instance] = {}
        for id_instance in range(first_id, first_id + instances):
            inst_token = token if token is not None else self._derive_token(id_instance)
            self._instances[id_instance] = Instance(id_instance, inst_token, scenario)
        self._api = GreenApi(scenario, self._instances)
        self._lock = self._api.lock  # the one lock over all state, shared with the server
        self._server: Server | None = None
        self._threads: list[threading.Thread] = []
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
        server = Server((self._host, port), self._api)
        self._bound_port = int(server.server_address[1])
        stopping = self._api.stopping = threading.Event()
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
                args=(self._tick_seconds, stopping),
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
        self._api.stopping.set()
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
            return self._api.scenario.time_at(self._api.steps)

    @property
    def rates(self) -> ChangeRates:
        """A copy of the change rates (fixed at construction)."""
        return replace(self._api.scenario.rates)

    @property
    def requests(self) -> list[RequestLog]:
        """Received requests, oldest first (the most recent 100,000)."""
        with self._lock:
            return list(self._api.log)

    def token_for(self, id_instance: int) -> str:
        """The token an instance accepts."""
        return self._get(id_instance).token

    # --- state -----------------------------------------------------------------------------

    def _get(self, id_instance: int) -> Instance:
        try:
            return self._instances[id_instance]
        except KeyError:
            raise KeyError(f"instance {id_instance} is not simulated") from None

    def step(self, n: int = 1) -> None:
        """Evolve every instance ``n`` times and advance the simulated clock by 60 s per step.

        Deterministic from the seed; applied lazily to an instance when it is next read.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._api.steps += n

    def chats(self, id_instance: int) -> list[dict[str, object]]:
        """A deep copy of an instance's current payload, in activity order, as served (in
        LID mode, with lids; on Telegram or MAX, as their elements)."""
        with self._lock:
            return self._get(id_instance).copy_chats(self._api.steps)

    def set_chats(self, id_instance: int, chats: Sequence[object]) -> None:
        """Replace an instance's chat list exactly (served as given, even malformed)."""
        with self._lock:
            self._get(id_instance).replace_chats(self._api.steps, chats)

    def set_fault(self, id_instance: int, fault: Fault | None) -> None:
        """Inject a fault for one instance id (any id, served or not); None clears."""
        with self._lock:
            self._api.faults.set(id_instance, fault)

    def set_lid_mode(self, id_instance: int, on: bool = True) -> None:
        """Switch an instance to LID mode (or back): from its next answer, every person
        chat that was ``…@c.us`` is listed as ``…@lid``; groups keep their ids."""
        with self._lock:
            self._get(id_instance).lid_mode = on

    def lid_of(self, phone_id: str) -> str:
        """The lid the simulator gives the person behind ``phone_id`` (``…@c.us``)."""
        return forms.lid_of(phone_id, self._seed)

    def set_platform(self, id_instance: int, platform: str) -> None:
        """Serve an instance's chats as ``whatsapp``, ``telegram`` or ``max`` elements."""
        if platform not in forms.PLATFORMS:
            raise ValueError(f"platform must be one of {forms.PLATFORMS}")
        with self._lock:
            self._get(id_instance).platform = platform

    def set_state(self, id_instance: int, state: str, *, text: bytes | None = None) -> None:
        """Put an instance in a getStateInstance state (``authorized``, ``notAuthorized``,
        ``starting``, ``blocked``, ``sleepMode``, ``yellowCard``, ...). Unless authorized,
        getChats answers 400 with ``text`` (default: Green-API's ambiguous
        ``instance is starting or not authorized``)."""
        with self._lock:
            inst = self._get(id_instance)
            inst.state = state
            if text is not None:
                inst.state_text = text

    def set_check_quota(self, id_instance: int, total: int | None, used: int = 0) -> None:
        """The checkWhatsapp quota of an instance (None: unlimited), and how much is used."""
        with self._lock:
            inst = self._get(id_instance)
            inst.check_quota, inst.check_used = total, used

    def set_method_fault(self, id_instance: int, method: str, fault: Fault | None) -> None:
        """A fault for ``getStateInstance`` or ``checkWhatsapp`` requests of one id."""
        with self._lock:
            self._api.method_faults.setdefault(method, FaultTable()).set(id_instance, fault)

    def method_count(self, method: str, id_instance: int | None = None) -> int:
        """Requests of ``method`` (``getStateInstance``, ``checkWhatsapp``) received."""
        with self._lock:
            counts = self._api.method_counts
            if id_instance is None:
                return sum(n for (m, _), n in counts.items() if m == method)
            return counts[(method, id_instance)]

    def request_count(self, id_instance: int | None = None) -> int:
        """getChats requests received (all ids if None), including faulted and 401/403."""
        with self._lock:
            if id_instance is None:
                return sum(self._api.counts.values())
            return self._api.counts.get(id_instance, 0)

    def on_answer(self, hook: Callable[[RequestLog], None] | None) -> None:
        """Call ``hook`` with each request's log entry once its answer is on the wire (from
        the server's threads; None removes every hook). Tests use it to act at that
        instant, say to stop the process that asked."""
        with self._lock:
            self._api.answered[:] = [] if hook is None else [*self._api.answered, hook]

    def reset_counts(self) -> None:
        """Clear the request counters and the request log."""
        with self._lock:
            self._api.counts.clear()
            self._api.method_counts.clear()
            self._api.log.clear()

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
            if inst.platform != "whatsapp":
                lines.append(f"platform = {_toml_str(inst.platform)}")
        return "\n".join(lines) + "\n"

    # --- for the tests and benchmarks that reach in ----------------------------------------

    def _payload(self, inst: Instance, count: int | None) -> tuple[bytes, int]:
        """Serialised chats (cached until the state changes) and how many were included."""
        return self._api.payload(inst, count)

    def _huge_body(self, id_instance: int, huge_count: int) -> bytes:
        """The body a ``huge`` fault sends for this id and count."""
        return self._api.huge_body(id_instance, huge_count)
