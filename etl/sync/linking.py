"""Asking Green-API for the link between a chat's old and new id (checkWhatsapp).

Green-API's checkWhatsapp answers, for a phone number, the ``chatId`` it names the person
by: their lid (``…@lid``) where the account has one (docs/green-api.md). The syncer asks it
before the write transaction, for the phone-number ids an id switch needs
(``etl.sync.identity.find_switch``), at most ``link_requests_per_second`` per instance and
within the tick's time budget; what is not asked in one tick is asked in the next ones.
Answers are kept per instance in this process (and the links in ``chat_aliases``), so a
number is asked once.

Not linking: a retried kind of failure (a timeout, 429, a 5xx) stops this tick's asking
and the next tick goes on; three ticks in a row without one answer, or a failure that
retrying will not cure (466 quota, 4xx, a body without ``existsWhatsapp``), means that no
link can be had now: ``Asked.failure`` says why, and the tick is judged without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

from etl.client import CheckResult
from etl.config import Instance
from etl.errors import ApiError, ErrorKind, PayloadError
from etl.sync.identity import LID, Answer

log = logging.getLogger("etl.sync")

#: answers kept per instance at most (then forgotten all at once)
MAX_ANSWERS = 200_000
#: ticks in a row without one answer before linking counts as failed
MAX_STRIKES = 3
#: no request is started with less than this left of the tick's budget (seconds)
MIN_LEFT = 0.5


class CheckClient(Protocol):
    def check_whatsapp(
        self, instance: Instance, phone_id: str, *, deadline: float | None = None
    ) -> CheckResult: ...


@dataclass(slots=True)
class Asked:
    """The answers known for an instance, and why the ids still unanswered cannot be
    linked (None: asking goes on in the next ticks)."""

    answers: dict[str, Answer] = field(default_factory=dict)
    failure: str | None = None


class Linker:
    """checkWhatsapp lookups for every instance this process syncs. One thread at a time
    asks for an instance (``Syncer.sync``)."""

    def __init__(
        self,
        client: object,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        # a client without checkWhatsapp (a test double) cannot link: as if it were off
        self.client = cast(CheckClient, client) if hasattr(client, "check_whatsapp") else None
        self.monotonic = monotonic
        self.sleep = sleep
        self._answers: dict[int, dict[str, Answer]] = {}
        self._strikes: dict[int, int] = {}
        #: per instance, when its next request may go (the rate holds across ticks)
        self._next_at: dict[int, float] = {}

    def known(self, instance_id: int) -> dict[str, Answer]:
        return self._answers.setdefault(instance_id, {})

    def ask(self, instance: Instance, phone_ids: list[str], deadline: float) -> Asked:
        """Ask checkWhatsapp for the ``phone_ids`` not answered yet, until ``deadline``."""
        iid = instance.id_instance
        answers = self.known(iid)
        todo = [p for p in phone_ids if p not in answers]
        if not todo:
            return Asked(answers)
        rate = instance.link_requests_per_second
        if rate <= 0 or self.client is None:
            return Asked(answers, "linking by checkWhatsapp is off (link_requests_per_second = 0)")
        if len(answers) + len(todo) > MAX_ANSWERS:
            answers.clear()
        asked, failure = self._ask_all(instance, todo, answers, 1.0 / rate, deadline)
        strikes = 0 if asked else self._strikes.get(iid, 0) + 1
        self._strikes[iid] = strikes
        if failure is None and strikes >= MAX_STRIKES:
            failure = f"checkWhatsapp answered nothing in {strikes} ticks in a row"
        log.info(
            "instance %s: checkWhatsapp: %d of %d ids asked%s",
            iid,
            asked,
            len(todo),
            f" ({failure})" if failure else "",
        )
        return Asked(answers, failure)

    def _ask_all(
        self,
        instance: Instance,
        todo: list[str],
        answers: dict[str, Answer],
        gap: float,
        deadline: float,
    ) -> tuple[int, str | None]:
        """(how many were answered, why asking cannot go on). A 429 pauses the asking
        for a second (the rate limiter's window) and the id is asked again, once."""
        asked = 0
        iid = instance.id_instance
        retried = False
        queue = list(reversed(todo))
        while queue:
            wait = self._next_at.get(iid, 0.0) - self.monotonic()
            if deadline - self.monotonic() - max(wait, 0.0) < MIN_LEFT:
                break
            if wait > 0:
                self.sleep(wait)
            self._next_at[iid] = self.monotonic() + gap
            phone_id = queue.pop()
            try:
                answers[phone_id] = self._check(instance, phone_id, deadline)
            except ApiError as exc:
                if exc.error_kind == ErrorKind.RATE_LIMITED and not retried:
                    retried = True
                    queue.append(phone_id)
                    self._next_at[iid] = self.monotonic() + max(1.0, exc.retry_after or 0.0)
                    continue
                if exc.retryable:
                    break  # the next tick goes on
                return asked, exc.message
            except PayloadError as exc:
                return asked, exc.message
            asked += 1
        return asked, None

    def _check(self, instance: Instance, phone_id: str, deadline: float) -> Answer:
        client = self.client
        assert client is not None
        result = client.check_whatsapp(instance, phone_id, deadline=deadline)
        lid = result.chat_id if result.chat_id and result.chat_id.endswith(LID) else None
        return Answer(result.exists, lid)
