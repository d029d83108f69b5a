"""One simulated instance: its token, its random stream and its chat list, caught up lazily.

An instance's list is generated on first use and then evolved one step at a time up to the
simulator's step counter, so reading it early or late gives the same list for the same step.
It is served in the form of the instance's account (``etl.simulator.forms``): WhatsApp ids,
in LID mode or not, or Telegram and MAX elements. The account's state (getStateInstance)
and its checkWhatsapp quota live here too.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from etl.simulator import forms
from etl.simulator.chats import ChangeRates, evolve, make_chats
from etl.simulator.encoding import dumps


@dataclass(frozen=True)
class Scenario:
    """What every instance's list is generated and evolved from; fixed at construction."""

    seed: int
    #: Chats per instance before the first step.
    initial_chats: int
    rates: ChangeRates
    #: Simulated unix time at step 0.
    start_time: int
    #: Simulated seconds per step.
    step_seconds: int
    #: The first lists' disappearing-message settings predate this unix time.
    anchor: int
    #: The messenger every instance serves, unless set per instance.
    platform: str = "whatsapp"
    #: From this step on, every WhatsApp instance is in LID mode (None: never).
    lid_switch_step: int | None = None
    #: checkWhatsapp requests each instance may make (a plan's monthly quota; None: any).
    check_quota: int | None = None

    def time_at(self, steps: int) -> int:
        """The simulated clock (unix seconds) after ``steps`` steps."""
        return self.start_time + self.step_seconds * steps


class Instance:
    """State of one simulated instance. Not thread-safe: the simulator's lock guards it."""

    __slots__ = (
        "id_instance",
        "token",
        "scenario",
        "rng",
        "chats",
        "steps_applied",
        "body",
        "body_form",
        "ids",
        "flat",
        "gone",
        "platform",
        "lid_mode",
        "state",
        "state_text",
        "check_quota",
        "check_used",
        "check_times",
    )

    def __init__(self, id_instance: int, token: str, scenario: Scenario) -> None:
        self.id_instance = id_instance
        self.token = token
        self.scenario = scenario
        self.rng = random.Random(f"chatsync-sim:{scenario.seed}:{id_instance}")
        self.chats: list[Any] | None = None
        self.steps_applied = 0
        self.body: bytes | None = None  # the serialised full list, until it changes
        self.body_form: tuple[str, bool] | None = None  # the form ``body`` was served in
        self.ids: set[str] | None = None  # ids in chats (None: recompute before evolving)
        self.flat = True  # chats are flat dicts of scalars (false after set_chats)
        self.gone: list[Any] = []  # removed chats, some of which may come back
        self.platform = scenario.platform
        #: LID mode set for this instance (None: the scenario's switch step decides)
        self.lid_mode: bool | None = None
        #: getStateInstance's answer; getChats answers ``state_text`` (400) unless authorized
        self.state = "authorized"
        self.state_text = b"instance is starting or not authorized"
        self.check_quota = scenario.check_quota
        self.check_used = 0
        #: when the last checkWhatsapp requests arrived (monotonic), for its rate limit
        self.check_times: list[float] = []

    def materialize(self, steps: int) -> list[Any]:
        """The list as of step ``steps``: generated if need be, then caught up with it."""
        scenario = self.scenario
        if self.chats is None:
            taken: set[str] = set()
            self.chats = make_chats(self.rng, scenario.anchor, taken, scenario.initial_chats)
            self.ids = taken
            self.body = None
        while self.steps_applied < steps:
            self.steps_applied += 1
            self._evolve(scenario.time_at(self.steps_applied))
            self.body = None
        return self.chats

    def _evolve(self, now: int) -> None:
        chats = self.chats
        assert chats is not None
        if self.ids is None:
            self.ids = {
                c["id"] for c in chats if isinstance(c, dict) and isinstance(c.get("id"), str)
            }
        evolve(chats, self.ids, self.rng, self.scenario.rates, now, self.gone)

    def in_lid_mode(self, steps: int) -> bool:
        if self.lid_mode is not None:
            return self.lid_mode
        switch = self.scenario.lid_switch_step
        return switch is not None and steps >= switch

    def served(self, steps: int, chats: list[Any]) -> list[Any]:
        """``chats`` in the form this instance serves them as of step ``steps``."""
        return forms.view(
            chats,
            platform=self.platform,
            lid_mode=self.in_lid_mode(steps),
            seed=self.scenario.seed,
        )

    def payload(self, steps: int, count: int | None) -> tuple[bytes, int]:
        """The serialised list (the first ``count`` chats if given) and how many it holds.

        The full list's body is kept until the list (or the form it is served in) changes:
        between steps it is asked for again and again.
        """
        chats = self.materialize(steps)
        if count is not None and count < len(chats):
            return dumps(self.served(steps, chats[:count])), count
        form = (self.platform, self.in_lid_mode(steps))
        if self.body is None or self.body_form != form:
            self.body, self.body_form = dumps(self.served(steps, chats)), form
        return self.body, len(chats)

    def copy_chats(self, steps: int) -> list[dict[str, object]]:
        """A deep copy of the list as of step ``steps``, as it is served."""
        chats = self.served(steps, self.materialize(steps))
        if self.flat:
            return [dict(chat) for chat in chats]
        return copy.deepcopy(chats)

    def replace_chats(self, steps: int, chats: Sequence[object]) -> None:
        """Replace the list with a deep copy of ``chats`` (served as given, even malformed)."""
        self.materialize(steps)  # keep the rng sequence independent of when this is called
        self.chats = copy.deepcopy(list(chats))
        self.gone = []
        self.flat = False
        self.ids = None
        self.body = None
