"""The seam between the client and its transport (``etl.transport``).

The client's logic (the request it asks for, retries, error mapping, redaction) is
checked against a fake transport, without sockets; the requests transport's body limit,
which the client turns into ``bad_payload``, against a throwaway loopback server.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytest

from etl.client import GreenApiClient
from etl.config import Instance
from etl.errors import ApiError, PayloadError
from etl.transport import (
    BodyTooLarge,
    Request,
    RequestsTransport,
    Response,
    TransportError,
    TransportTimeout,
)
from tests.conftest import CANARY, instance_at
from tests.test_client import json_array, throwaway_server

API = "https://api.example.test"


def instance(**overrides: Any) -> Instance:
    api_url = overrides.pop("api_url", API)
    return instance_at(api_url, 1101000001, CANARY, **{"label": "fake", **overrides})


class FakeTransport:
    """Answers with the given replies in turn (an exception is raised) and records what
    was sent."""

    def __init__(self, *replies: Response | Exception) -> None:
        self.replies = list(replies)
        self.sent: list[Request] = []
        self.closed = False

    def send(self, request: Request) -> Response:
        self.sent.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self) -> None:
        self.closed = True


def reply(status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> Response:
    return Response(status=status, headers=headers or {}, body=body)


def client(transport: FakeTransport) -> GreenApiClient:
    return GreenApiClient(backoff_initial=0.01, backoff_max=0.05, transport=transport)


def test_the_client_asks_its_transport_for_the_getchats_request() -> None:
    fake = FakeTransport(reply(200, b"[]"))
    inst = instance(count=7)
    t0 = time.monotonic()
    result = client(fake).get_chats(inst, budget_seconds=5.0)
    assert (result.body, result.http_status, result.attempts) == (b"[]", 200, 1)
    [sent] = fake.sent
    assert sent.url == f"{API}/waInstance1101000001/getChats/{CANARY}"
    assert (sent.base, sent.params, sent.timeout) == (API, {"count": "7"}, (1.0, 2.0))
    assert t0 + 5.0 <= sent.deadline <= time.monotonic() + 5.0


def test_timeouts_are_cut_to_what_is_left_of_the_budget() -> None:
    fake = FakeTransport(reply(200, b"[]"))
    client(fake).get_chats(instance(), budget_seconds=0.5)
    [sent] = fake.sent
    assert sent.params is None
    assert all(0 < t <= 0.5 for t in sent.timeout)


def test_statuses_are_retried_or_not_as_the_client_decides() -> None:
    fake = FakeTransport(reply(503), reply(429, headers={"Retry-After": "0"}), reply(200, b"[]"))
    assert client(fake).get_chats(instance()).attempts == 3
    fake = FakeTransport(reply(400, b"instance account not authorized"))
    with pytest.raises(ApiError) as info:
        client(fake).get_chats(instance())
    assert (info.value.error_kind, info.value.http_status, info.value.attempts) == (
        "not_authorized",
        400,
        1,
    )


@pytest.mark.parametrize(
    ("error", "kind", "text"),
    [
        (
            TransportTimeout("ReadTimeout", f"read timed out: /getChats/{CANARY}"),
            "timeout",
            "timed out (ReadTimeout)",
        ),
        (
            TransportError("ConnectionError", f"refused: /waInstance1/getChats/{CANARY}"),
            "connection",
            "ConnectionError: refused: /waInstance1/getChats/***",
        ),
    ],
)
def test_transport_failures_become_redacted_api_errors(
    error: TransportError, kind: str, text: str
) -> None:
    fake = FakeTransport(error, error)
    with pytest.raises(ApiError) as info:
        client(fake).get_chats(instance(max_attempts=2))
    assert (info.value.error_kind, info.value.attempts, info.value.retryable) == (kind, 2, True)
    assert text in str(info.value)
    assert CANARY not in str(info.value)
    assert CANARY not in str(error) and CANARY not in repr(error)  # only ``detail`` holds it


def test_a_body_over_the_limit_is_bad_payload_and_not_retried() -> None:
    with throwaway_server(json_array) as srv:
        transport = RequestsTransport(max_body_bytes=8)
        with pytest.raises(BodyTooLarge) as too_large:
            transport.send(Request(srv.url, "/x", None, (1.0, 1.0), time.monotonic() + 5))
        assert (too_large.value.status, too_large.value.limit) == (200, 8)
        limited = GreenApiClient(transport=transport)
        with pytest.raises(PayloadError) as info:
            limited.get_chats(instance(api_url=srv.url))
        limited.close()
    assert (info.value.error_kind, info.value.http_status, info.value.attempts) == (
        "bad_payload",
        200,
        1,
    )
    assert "body larger than 8 bytes" in str(info.value)
    assert len(srv.seen) == 2


def test_close_closes_the_transport() -> None:
    fake = FakeTransport()
    client(fake).close()
    assert fake.closed
