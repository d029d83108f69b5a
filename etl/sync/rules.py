"""When an ephemeral period starts: the one rule behind every ``valid_from``.

docs/schema.md states it for analysts; ``choose_valid_from`` is the rule, and
``first_valid_from_sql`` is the same rule for a chat's first period (no previous one), as
SQL for the PostgreSQL first load, which derives the first history rows in the database.
"""

from __future__ import annotations

from datetime import datetime, timedelta

#: how far in the future an API timestamp may be and still be trusted (clock skew)
MAX_CLOCK_SKEW = timedelta(minutes=5)
_EPSILON = timedelta(microseconds=1)


def choose_valid_from(
    setting_at: datetime | None, previous_from: datetime | None, observed_at: datetime
) -> datetime:
    """When a new ephemeral period starts.

    The API's timestamp when it is set and plausible (after the previous period's start,
    at most ``MAX_CLOCK_SKEW`` ahead of us), else the time we observed the change; never
    at or before the previous period's start, so intervals cannot overlap.
    """
    if (
        setting_at is not None
        and setting_at <= observed_at + MAX_CLOCK_SKEW
        and (previous_from is None or setting_at > previous_from)
    ):
        return setting_at
    if previous_from is not None and observed_at <= previous_from:
        return previous_from + _EPSILON
    return observed_at


def first_valid_from_sql(setting_at: str, trusted_until: str, observed_at: str) -> str:
    """``choose_valid_from(setting_at, None, observed_at)`` as a SQL expression.

    With no previous period the rule is "the API's timestamp unless it is unset or more
    than the skew ahead": ``trusted_until`` is ``observed_at + MAX_CLOCK_SKEW``. A NULL
    timestamp fails the comparison, so it falls to ``observed_at`` as in Python.
    """
    return f"CASE WHEN {setting_at} <= {trusted_until} THEN {setting_at} ELSE {observed_at} END"
