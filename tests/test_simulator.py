"""Tests for the Green-API simulator: real HTTP on loopback, no mocks."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from etl.simulator import ChangeRates, Fault, Simulator

START = 1_750_000_000
FIELDS = {"archive", "id", "ephemeralExpiration", "ephemeralSettingTimestamp", "name", "type"}
ID_RE = re.compile(
    r"^(79\d{9}@c\.us|[1-9]\d{14}@lid|79\d{9}-\d{10}@g\.us|120363\d{12}@g\.us)$",
)
TIMEOUT = 5.0


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(instances=3, chats=50, seed=7, start_time=START) as simulator:
        yield simulator


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def chats_url(sim: Simulator, id_instance: int, token: str | None = None) -> str:
    token = sim.token_for(id_instance) if token is None else token
    return f"{sim.url}/waInstance{id_instance}/getChats/{token}"


def first(sim: Simulator) -> int:
    return sim.instance_ids[0]


# --- normal answers -----------------------------------------------------------------------


def test_payload_shape(sim: Simulator, http: requests.Session) -> None:
    iid = first(sim)
    r = http.get(chats_url(sim, iid), timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert int(r.headers["Content-Length"]) == len(r.content)
    assert r.raw.version == 11
    assert "close" not in r.headers.get("Connection", "").lower()
    data = r.json()
    assert isinstance(data, list)
    assert len(data) == 50
    assert data == sim.chats(iid)
    for chat in data:
        assert set(chat) == FIELDS
        assert isinstance(chat["archive"], bool)
        assert ID_RE.match(chat["id"]), chat["id"]
        assert chat["type"] == ("group" if chat["id"].endswith("@g.us") else "user")
        assert isinstance(chat["name"], str)
        assert chat["ephemeralExpiration"] in (0, 86400, 604800, 7776000)
        stamp = chat["ephemeralSettingTimestamp"]
        assert isinstance(stamp, int)
        if chat["ephemeralExpiration"]:
            assert 0 < stamp < START
        else:
            assert stamp == 0
    assert len({chat["id"] for chat in data}) == len(data)


def test_generated_mix() -> None:
    sim = Simulator(instances=20, chats=500, seed=3, start_time=START)
    chats = [chat for iid in sim.instance_ids for chat in sim.chats(iid)]
    n = len(chats)
    users = sum(str(chat["id"]).endswith("@c.us") for chat in chats) / n
    lids = sum(str(chat["id"]).endswith("@lid") for chat in chats) / n
    groups = sum(chat["type"] == "group" for chat in chats) / n
    ephemeral = sum(chat["ephemeralExpiration"] != 0 for chat in chats) / n
    assert 0.70 < users < 0.80
    assert 0.07 < lids < 0.13
    assert 0.11 < groups < 0.19
    assert 0.15 < ephemeral < 0.25
    assert any(chat["archive"] for chat in chats)
    assert any(chat["name"] == "" for chat in chats)
    names = "".join(str(chat["name"]) for chat in chats)
    assert re.search("[\u0590-\u06ff]", names)  # RTL (Hebrew / Arabic)
    assert re.search("[\U0001f300-\U0001faff]", names)  # emoji


def test_ids_and_tokens() -> None:
    sim = Simulator(instances=3, chats=1, seed=42, first_id=7103000010)
    assert sim.instance_ids == [7103000010, 7103000011, 7103000012]
    for iid in sim.instance_ids:
        expected = hashlib.sha256(f"chatsync-sim:42:{iid}".encode()).hexdigest()[:50]
        assert sim.token_for(iid) == expected
    shared = Simulator(instances=2, chats=1, token="secret-token")
    assert {shared.token_for(iid) for iid in shared.instance_ids} == {"secret-token"}
    with shared, requests.Session() as http:
        for iid in shared.instance_ids:
            r = http.get(chats_url(shared, iid, "secret-token"), timeout=TIMEOUT)
            assert r.status_code == 200
    with pytest.raises(KeyError):
        sim.token_for(1)


def test_determinism_and_steps_over_http(http: requests.Session) -> None:
    rates = ChangeRates(new=0.05, rename=0.05, archive=0.05, ephemeral=0.05, removal=0.02)
    a = Simulator(instances=2, chats=80, seed=11, rates=rates, start_time=START)
    b = Simulator(instances=2, chats=80, seed=11, rates=rates, start_time=START)
    c = Simulator(instances=2, chats=80, seed=12, rates=rates, start_time=START)
    with a, b, c:
        iid = first(a)

        def body(s: Simulator) -> bytes:
            return http.get(chats_url(s, iid), timeout=TIMEOUT).content

        assert body(a) == body(b)
        assert body(a) != body(c)
        # b's instance is read before stepping, a's only afterwards: same result (lazy == eager)
        a.step(3)
        b.step(1)
        body(b)
        b.step(2)
        assert body(a) == body(b)
        assert a.chats(iid + 1) == b.chats(iid + 1)
        assert a.now == b.now == START + 180


def test_count_query(sim: Simulator, http: requests.Session) -> None:
    iid = first(sim)
    full = sim.chats(iid)
    r = http.get(chats_url(sim, iid) + "?count=5", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.json() == full[:5]
    r = http.get(chats_url(sim, iid) + "?count=5000", timeout=TIMEOUT)
    assert r.json() == full
    for bad in ("abc", "", "0", "-1"):
        r = http.get(chats_url(sim, iid) + f"?count={bad}", timeout=TIMEOUT)
        assert r.status_code == 400
        assert r.json() == {"message": "bad request data"}
    assert [entry.count for entry in sim.requests] == [5, 5000, None, None, 0, -1]
    assert sim.requests[0].served == 5


def test_wrong_token_401(sim: Simulator, http: requests.Session) -> None:
    r = http.get(chats_url(sim, first(sim), "0" * 50), timeout=TIMEOUT)
    assert r.status_code == 401
    assert r.text == "Unauthorized"
    # a token of another instance is wrong too
    r = http.get(chats_url(sim, first(sim), sim.token_for(sim.instance_ids[1])), timeout=TIMEOUT)
    assert r.status_code == 401


def test_unknown_instance_403(sim: Simulator, http: requests.Session) -> None:
    r = http.get(chats_url(sim, 1234567, "a" * 50), timeout=TIMEOUT)
    assert r.status_code == 403
    assert r.text in ("", "Forbidden")


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("GET", "/"),
        ("GET", "/waInstance{iid}/getSettings/{token}"),
        ("GET", "/waInstance{iid}/checkWhatsapp/{token}"),
        ("POST", "/waInstance{iid}/getStateInstance/{token}"),
        ("GET", "/waInstance{iid}/getChats"),
        ("GET", "/waInstance{iid}/getChats/{token}/extra"),
        ("POST", "/waInstance{iid}/getChats/{token}"),
        ("DELETE", "/waInstance{iid}/getChats/{token}"),
        ("HEAD", "/waInstance{iid}/getChats/{token}"),
    ],
)
def test_other_paths_and_methods_404(
    sim: Simulator, http: requests.Session, method: str, suffix: str
) -> None:
    iid = first(sim)
    path = suffix.format(iid=iid, token=sim.token_for(iid))
    r = http.request(method, sim.url + path, json={"x": 1}, timeout=TIMEOUT)
    assert r.status_code == 404
    assert sim.request_count() == 0
    # the connection stays usable
    assert http.get(chats_url(sim, iid), timeout=TIMEOUT).status_code == 200


def test_malformed_payload_served_as_given(sim: Simulator, http: requests.Session) -> None:
    iid = first(sim)
    payload: list[object] = [
        {"id": 79001234567, "name": None},
        "junk",
        None,
        {"id": "x@newsletter", "name": "a\u0000b", "type": "channel", "extra": [1, 2]},
    ]
    sim.set_chats(iid, payload)
    assert http.get(chats_url(sim, iid), timeout=TIMEOUT).json() == payload
    assert sim.chats(iid) == payload
    sim.step(5)  # stepping over malformed elements must not crash
    http.get(chats_url(sim, iid), timeout=TIMEOUT).json()


def test_set_chats_exact_and_copy(sim: Simulator) -> None:
    iid = first(sim)
    chats: list[dict[str, object]] = [
        {
            "archive": False,
            "id": "79001234567@c.us",
            "ephemeralExpiration": 0,
            "ephemeralSettingTimestamp": 0,
            "name": "Jane",
            "type": "user",
        }
    ]
    sim.set_chats(iid, chats)
    chats[0]["name"] = "changed after set"
    got = sim.chats(iid)
    assert got[0]["name"] == "Jane"
    got[0]["name"] = "changed copy"
    assert sim.chats(iid)[0]["name"] == "Jane"


# --- faults -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "body"),
    [
        (Fault(status=400, body=b"instance in starting process try later"), 400, None),
        (Fault(status=400), 400, b"bad request data"),
        (Fault(status=401), 401, b"Unauthorized"),
        (Fault(status=429, retry_after="2"), 429, b"Too Many Requests"),
        (Fault(status=499), 499, None),
        (Fault(status=500), 500, b"Internal Server Error"),
        (Fault(status=502), 502, b"Bad Gateway"),
    ],
)
def test_fault_status_and_body(
    sim: Simulator, http: requests.Session, fault: Fault, status: int, body: bytes | None
) -> None:
    iid = first(sim)
    sim.set_fault(iid, fault)
    for _ in range(2):  # times=None: until cleared
        r = http.get(chats_url(sim, iid), timeout=TIMEOUT)
        assert r.status_code == status
        expected = body if body is not None else fault.body
        assert r.content if expected is None else r.content == expected
        assert r.headers.get("Retry-After") == fault.retry_after
    sim.set_fault(iid, None)
    assert http.get(chats_url(sim, iid), timeout=TIMEOUT).status_code == 200
    assert sim.request_count(iid) == 3


def test_fault_466_default_body(sim: Simulator, http: requests.Session) -> None:
    iid = first(sim)
    sim.set_fault(iid, Fault(status=466))
    r = http.get(chats_url(sim, iid), timeout=TIMEOUT)
    assert r.status_code == 466
    data = r.json()
    # the shape of Green-API's "466 error example body" page
    assert set(data["invokeStatus"]) == {"method", "used", "total", "status", "description"}
    assert data["invokeStatus"]["status"] == "QUOTE_EXCEEDED"
    assert data["correspondentsStatus"]["status"] == "CORRESPONDENTS_QUOTE_EXCEEDED"
    assert "@c.us" in data["correspondentsStatus"]["description"]  # it lists chat ids


def test_fault_before_token_check(sim: Simulator, http: requests.Session) -> None:
    sim.set_fault(999, Fault(status=500))  # even for an unknown instance
    r = http.get(chats_url(sim, 999, "t"), timeout=TIMEOUT)
    assert r.status_code == 500
    iid = first(sim)
    sim.set_fault(iid, Fault(status=503))
    assert http.get(chats_url(sim, iid, "wrong"), timeout=TIMEOUT).status_code == 503


def test_fault_delay_triggers_read_timeout(sim: Simulator, http: requests.Session) -> None:
    iid = first(sim)
    sim.set_fault(iid, Fault(status=500, delay=2.0, times=1))  # the stop ends the wait
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        http.get(chats_url(sim, iid), timeout=(2, 0.1))
    # the 0.1 s read timeout fired, long before the delayed answer (a margin for load)
    assert time.monotonic() - started < 1.0
    r = http.get(chats_url(sim, iid), timeout=TIMEOUT)
    assert r.status_code == 200


def test_pure_delay_then_normal_answer(sim: Simulator, http: requests.Session) -> None:
    iid = first(sim)
    sim.set_fault(iid, Fault(delay=0.2, times=1))
    started = time.monotonic()
    r = http.get(chats_url(sim, iid), timeout=TIMEOUT)
    assert time.monotonic() - started >= 0.2
    assert r.status_code == 200
    assert r.json() == sim.chats(iid)


def test_fault_reset(sim: Simulator, http: requests.Session) -> None:
    iid = first(sim)
    sim.set_fault(iid, Fault(mode="reset", times=1))
    with pytest.raises(
        (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)
    ):
        http.get(chats_url(sim, iid), timeout=TIMEOUT)
    assert http.get(chats_url(sim, iid), timeout=TIMEOUT).status_code == 200


def test_fault_truncate(sim: Simulator, http: requests.Session) -> None:
    iid = first(sim)
    full = http.get(chats_url(sim, iid), timeout=TIMEOUT).content
    sim.set_fault(iid, Fault(mode="truncate", times=1))
    r = http.get(chats_url(sim, iid), timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert 0 < len(r.content) < len(full)
    assert full.startswith(r.content)
    with pytest.raises(ValueError):
        r.json()
    assert http.get(chats_url(sim, iid), timeout=TIMEOUT).content == full


def test_fault_html(sim: Simulator, http: requests.Session) -> None:
    iid = first(sim)
    sim.set_fault(iid, Fault(mode="html"))
    r = http.get(chats_url(sim, iid), timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/html")
    assert "<html" in r.text
    with pytest.raises(ValueError):
        r.json()
    sim.set_fault(iid, Fault(mode="html", status=502))
    r = http.get(chats_url(sim, iid), timeout=TIMEOUT)
    assert r.status_code == 502
    assert "502 Bad Gateway" in r.text


def test_fault_object_empty_huge(sim: Simulator, http: requests.Session) -> None:
    iid = first(sim)
    sim.set_fault(iid, Fault(mode="object"))
    assert http.get(chats_url(sim, iid), timeout=TIMEOUT).json() == {"error": "x"}
    sim.set_fault(iid, Fault(mode="empty"))
    r = http.get(chats_url(sim, iid), timeout=TIMEOUT)
    assert (r.status_code, r.json()) == (200, [])
    sim.set_fault(iid, Fault(mode="huge", huge_count=3000))
    data = http.get(chats_url(sim, iid), timeout=TIMEOUT).json()
    assert len(data) == 3000
    assert len({chat["id"] for chat in data}) == 3000
    assert all(set(chat) == FIELDS for chat in data)
    assert [entry.served for entry in sim.requests] == [None, 0, 3000]


def test_fault_times_clears_itself(sim: Simulator, http: requests.Session) -> None:
    iid = first(sim)
    sim.set_fault(iid, Fault(status=502, times=2))
    statuses = [http.get(chats_url(sim, iid), timeout=TIMEOUT).status_code for _ in range(4)]
    assert statuses == [502, 502, 200, 200]
    other = sim.instance_ids[1]
    assert http.get(chats_url(sim, other), timeout=TIMEOUT).status_code == 200


def test_fault_validation() -> None:
    with pytest.raises(ValueError):
        Fault(mode="bogus")
    with pytest.raises(ValueError):
        Fault(status=42)


# --- accounting, logging, config -----------------------------------------------------------


def test_request_counting(sim: Simulator, http: requests.Session) -> None:
    a, b, _ = sim.instance_ids
    http.get(chats_url(sim, a), timeout=TIMEOUT)
    http.get(chats_url(sim, a, "wrong"), timeout=TIMEOUT)
    http.get(chats_url(sim, b), timeout=TIMEOUT)
    http.get(chats_url(sim, 555, "x"), timeout=TIMEOUT)
    http.get(sim.url + "/nothing", timeout=TIMEOUT)
    sim.set_fault(b, Fault(status=500, times=1))
    http.get(chats_url(sim, b), timeout=TIMEOUT)
    assert sim.request_count(a) == 2
    assert sim.request_count(b) == 2
    assert sim.request_count(555) == 1
    assert sim.request_count() == 5
    assert [(e.id_instance, e.status) for e in sim.requests] == [
        (a, 200),
        (a, 401),
        (b, 200),
        (555, 403),
        (None, 404),
        (b, 500),
    ]
    times = [e.at for e in sim.requests]
    assert times == sorted(times)
    sim.reset_counts()
    assert sim.request_count() == 0
    assert sim.requests == []


def test_token_never_logged(
    sim: Simulator, http: requests.Session, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="etl.simulator")
    iid = first(sim)
    token = sim.token_for(iid)
    http.get(chats_url(sim, iid), timeout=TIMEOUT)
    http.get(chats_url(sim, iid) + "?count=3", timeout=TIMEOUT)
    http.get(chats_url(sim, iid, token + "x"), timeout=TIMEOUT)
    http.get(f"{sim.url}/waInstance{iid}/getStateInstance/{token}", timeout=TIMEOUT)
    http.post(chats_url(sim, iid), timeout=TIMEOUT)
    sim.set_fault(iid, Fault(status=429, times=1))
    http.get(chats_url(sim, iid), timeout=TIMEOUT)
    assert caplog.records, "the simulator should log requests at DEBUG"
    assert token not in caplog.text
    paths = [entry.path_redacted for entry in sim.requests]
    assert len(paths) == 6
    assert all(token not in path and "***" in path for path in paths)
    assert paths[1] == f"/waInstance{iid}/getChats/***?count=3"


def test_config_toml(sim: Simulator) -> None:
    config = tomllib.loads(sim.config_toml(interval_seconds=90, database_url='sqlite:///x "y".db'))
    assert config["database_url"] == 'sqlite:///x "y".db'
    assert config["defaults"] == {"api_url": sim.url, "interval_seconds": 90}
    assert [i["id_instance"] for i in config["instances"]] == sim.instance_ids
    assert [i["api_token"] for i in config["instances"]] == [
        sim.token_for(iid) for iid in sim.instance_ids
    ]
    assert [i["label"] for i in config["instances"]] == [
        "Simulated 1",
        "Simulated 2",
        "Simulated 3",
    ]
    assert "database_url" not in tomllib.loads(sim.config_toml())
    assert sim.url == f"http://127.0.0.1:{sim.url.rsplit(':', 1)[1]}"


# --- evolution ------------------------------------------------------------------------------


def test_step_evolution_with_high_rates() -> None:
    rates = ChangeRates(new=0.05, rename=0.05, archive=0.05, ephemeral=0.05, removal=0.03)
    sim = Simulator(instances=1, chats=200, seed=5, rates=rates, start_time=START)
    iid = first(sim)
    before = {chat["id"]: chat for chat in sim.chats(iid)}
    order_before = list(before)
    sim.step()
    assert [chat["id"] for chat in sim.chats(iid)] != order_before  # activity order shuffles
    sim.step(19)
    assert sim.now == START + 20 * 60
    after = {chat["id"]: chat for chat in sim.chats(iid)}
    assert len(after) == len(sim.chats(iid))  # ids stay unique
    assert set(after) - set(before), "new chats"
    assert set(before) - set(after), "removed chats"
    common = set(before) & set(after)
    assert any(before[i]["name"] != after[i]["name"] for i in common), "renames"
    assert any(before[i]["archive"] != after[i]["archive"] for i in common), "archive flips"
    changed = [
        after[i]
        for i in common
        if before[i]["ephemeralExpiration"] != after[i]["ephemeralExpiration"]
    ]
    assert changed, "ephemeral changes"
    for chat in changed:
        stamp = chat["ephemeralSettingTimestamp"]
        assert isinstance(stamp, int)
        assert START < stamp <= sim.now
        assert (stamp - START) % 60 == 0
    turned_off = [chat for chat in changed if chat["ephemeralExpiration"] == 0]
    assert turned_off and all(chat["ephemeralSettingTimestamp"] for chat in turned_off)
    for chat in after.values():
        assert set(chat) == FIELDS
        assert ID_RE.match(str(chat["id"]))


def test_zero_rates_keep_content() -> None:
    rates = ChangeRates(new=0, rename=0, archive=0, ephemeral=0, removal=0)
    sim = Simulator(instances=1, chats=100, seed=1, rates=rates, start_time=START)
    iid = first(sim)
    before = sorted(sim.chats(iid), key=lambda chat: str(chat["id"]))
    sim.step(10)
    assert sorted(sim.chats(iid), key=lambda chat: str(chat["id"])) == before


def test_step_while_serving(sim: Simulator) -> None:
    iid = first(sim)
    stop = threading.Event()

    def stepper() -> None:
        while not stop.wait(0.005):
            sim.step()

    def fetch(_: int) -> int:
        with requests.Session() as http:
            for _ in range(10):
                r = http.get(chats_url(sim, iid), timeout=TIMEOUT)
                assert r.status_code == 200
                assert isinstance(r.json(), list)
        return 10

    thread = threading.Thread(target=stepper)
    thread.start()
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            assert sum(pool.map(fetch, range(6))) == 60
    finally:
        stop.set()
        thread.join()
    assert sim.request_count(iid) == 60


def test_tick_seconds_steps_in_background() -> None:
    with Simulator(
        instances=1, chats=5, tick_seconds=0.02, start_time=START, step_seconds=60
    ) as sim:
        deadline = time.monotonic() + 3
        while sim.now < START + 3 * 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sim.now >= START + 3 * 60
    frozen = sim.now
    time.sleep(0.1)
    assert sim.now == frozen


def test_real_ticks_keep_the_simulated_clock_near_wall_time() -> None:
    t0 = time.monotonic()
    with Simulator(instances=1, chats=5, tick_seconds=1, start_time=START) as sim:
        sim.step(5)
        now = sim.now
    # one simulated second per one-second tick: 5 for the steps, plus one for each
    # background tick there was time for (none unless the machine was slow)
    assert START + 5 <= now <= START + 5 + (time.monotonic() - t0)


def test_stop_is_idempotent_and_restart_keeps_port(http: requests.Session) -> None:
    sim = Simulator(instances=1, chats=3)
    with pytest.raises(RuntimeError):
        _ = sim.url
    sim.start()
    url = sim.url
    iid = first(sim)
    assert http.get(chats_url(sim, iid), timeout=TIMEOUT).status_code == 200
    sim.stop()
    sim.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        http.get(chats_url(sim, iid), timeout=TIMEOUT)
    with sim:
        assert sim.url == url
        assert http.get(chats_url(sim, iid), timeout=TIMEOUT).status_code == 200


# --- the real Green-API's other behaviours (docs/green-api.md#the-simulator) ---------------


def method_url(sim: Simulator, method: str, iid: int) -> str:
    return f"{sim.url}/waInstance{iid}/{method}/{sim.token_for(iid)}"


def test_lid_mode_lists_person_chats_by_their_lid_and_groups_as_they_are(
    http: requests.Session,
) -> None:
    still = ChangeRates(new=0, rename=0, archive=0, ephemeral=0, removal=0)
    with Simulator(instances=1, chats=40, seed=2, lid_switch_at_step=2, rates=still) as sim:
        iid = first(sim)

        def listed() -> dict[str, dict[str, object]]:  # by id: activity reorders the list
            return {c["id"]: c for c in http.get(chats_url(sim, iid), timeout=TIMEOUT).json()}

        before = listed()
        sim.step()
        assert listed() == before
        sim.step()  # the switch
        after = listed()
    assert len(after) == len(before)
    for cid, old in before.items():
        if cid.endswith("@c.us"):
            lid = sim.lid_of(cid)
            assert after[lid] == dict(old, id=lid) and len(lid) == len("1" * 15 + "@lid")
        else:
            assert after[cid] == old  # groups, and chats that were lids already
    assert any(c.endswith("@g.us") for c in after) and not any(c.endswith("@c.us") for c in after)


def test_set_lid_mode_switches_one_instance_and_back(
    sim: Simulator, http: requests.Session
) -> None:
    a, b = sim.instance_ids[:2]  # no step in between: the lists do not move
    before = {i: http.get(chats_url(sim, i), timeout=TIMEOUT).json() for i in (a, b)}
    sim.set_lid_mode(a)
    assert http.get(chats_url(sim, b), timeout=TIMEOUT).json() == before[b]
    lids = [c["id"] for c in http.get(chats_url(sim, a), timeout=TIMEOUT).json()]
    assert not any(i.endswith("@c.us") for i in lids)
    sim.set_lid_mode(a, False)
    assert http.get(chats_url(sim, a), timeout=TIMEOUT).json() == before[a]


def test_check_whatsapp_answers_the_lid_within_its_rate_limit_and_quota(
    sim: Simulator, http: requests.Session
) -> None:
    iid = first(sim)
    url = method_url(sim, "checkWhatsapp", iid)
    r = http.post(url, json={"phoneNumber": 79001234567}, timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.json() == {"existsWhatsapp": True, "chatId": sim.lid_of("79001234567@c.us")}
    # the newer request field, chatId, gives the same answer
    same = http.post(url, json={"chatId": "79001234567@c.us"}, timeout=TIMEOUT).json()
    assert same == r.json()
    assert http.post(url, json={"phoneNumber": "x"}, timeout=TIMEOUT).status_code == 400
    # at most 10 a second per instance, as Green-API's rate limiter documents
    time.sleep(1.05)
    statuses = [
        http.post(url, json={"phoneNumber": 79000000000 + n}, timeout=TIMEOUT).status_code
        for n in range(12)
    ]
    assert statuses.count(200) == 10 and statuses[-1] == 429
    # a plan's quota: then 466 with the documented body
    time.sleep(1.05)
    sim.set_check_quota(iid, 3, used=2)
    assert http.post(url, json={"phoneNumber": 79000000001}, timeout=TIMEOUT).status_code == 200
    over = http.post(url, json={"phoneNumber": 79000000002}, timeout=TIMEOUT)
    assert over.status_code == 466
    status = over.json()["invokeStatus"]
    assert (status["method"], status["used"], status["total"], status["status"]) == (
        "checkwhatsapp",
        3,
        3,
        "QUOTE_EXCEEDED",
    )
    assert sim.method_count("checkWhatsapp", iid) == 17 and sim.request_count(iid) == 0


def test_get_state_instance_plays_each_state(sim: Simulator, http: requests.Session) -> None:
    iid = first(sim)
    url = method_url(sim, "getStateInstance", iid)
    assert http.get(url, timeout=TIMEOUT).json() == {"stateInstance": "authorized"}
    for state in ("starting", "notAuthorized", "blocked", "sleepMode", "yellowCard"):
        sim.set_state(iid, state)
        assert http.get(url, timeout=TIMEOUT).json() == {"stateInstance": state}
        answer = http.get(chats_url(sim, iid), timeout=TIMEOUT)
        assert (answer.status_code, answer.text) == (400, "instance is starting or not authorized")
    sim.set_state(iid, "starting", text=b"instance in starting process try later")
    assert http.get(chats_url(sim, iid), timeout=TIMEOUT).text.startswith("instance in starting")
    sim.set_state(iid, "authorized")
    assert http.get(chats_url(sim, iid), timeout=TIMEOUT).status_code == 200
    bad_token = f"{sim.url}/waInstance{iid}/getStateInstance/{'0' * 50}"
    assert http.get(bad_token, timeout=TIMEOUT).status_code == 401


@pytest.mark.parametrize("platform", ["telegram", "max"])
def test_telegram_and_max_answers_have_their_docs_shape(
    http: requests.Session, platform: str
) -> None:
    with Simulator(instances=1, chats=30, seed=4, platform=platform) as sim:
        body = http.get(chats_url(sim, first(sim)), timeout=TIMEOUT).json()
        assert f'platform = "{platform}"' in sim.config_toml()
    keys = {"chatId", "name", "type", "phoneNumber", "username"}
    assert all(
        set(c) == (keys if platform == "telegram" else {"chatId", "phoneNumber"}) for c in body
    )
    assert all("id" not in c and isinstance(c["chatId"], str) for c in body)
    groups = [c for c in body if c["chatId"].startswith("-")]
    assert groups and all(c["phoneNumber"] == 0 for c in groups)
    if platform == "telegram":
        assert {c["type"] for c in groups} <= {"group", "supergroup"}
