"""A Green-API ``getChats`` simulator: a real HTTP server on loopback.

Used by the demo, the tests and the benchmarks. It serves
``GET /waInstance{id}/getChats/{token}[?count=N]`` for a set of simulated instances whose
chat lists evolve deterministically (from a seed) each time :meth:`Simulator.step` is called,
and it can inject faults (error statuses, delays, connection resets, truncated or odd bodies).

Only the standard library is required; ``orjson`` is used for serialisation when importable.

Modules, one concern each:

* :mod:`~etl.simulator.facade`: :class:`Simulator`, construction, lifecycle and control.
* :mod:`~etl.simulator.api`: the service's state and the answer to each request (routing,
  faults, token and parameter checks, the request log).
* :mod:`~etl.simulator.server`: the HTTP/1.1 server, and how a reply goes on the wire.
* :mod:`~etl.simulator.instance`: one instance's list, generated and caught up lazily.
* :mod:`~etl.simulator.chats`: generated chats, and how a list changes at each step.
* :mod:`~etl.simulator.faults`: :class:`Fault` and the answers it gives.
* :mod:`~etl.simulator.replies`: replies, reason phrases and default error bodies.
* :mod:`~etl.simulator.encoding`: JSON serialisation of bodies.
"""

from __future__ import annotations

from etl.simulator.api import RequestLog
from etl.simulator.chats import EPHEMERAL_VALUES as EPHEMERAL_VALUES
from etl.simulator.chats import ChangeRates
from etl.simulator.facade import STEP_SECONDS as STEP_SECONDS
from etl.simulator.facade import Simulator
from etl.simulator.faults import FAULT_MODES as FAULT_MODES
from etl.simulator.faults import Fault

__all__ = ["ChangeRates", "Fault", "RequestLog", "Simulator"]
