"""The getChats decoder: whole-body failures, per-element rejections, normalisation."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl.errors import PayloadError, PlatformMismatch
from etl.payload import MAX_TIMESTAMP, ChatRecord, DecodedChats, decode_chats
from tests.factories import SEED_EXAMPLE, chat


def decode(items: list[Any]) -> DecodedChats:
    return decode_chats(orjson.dumps(items))


def only_rejection(item: Any) -> str:
    """Decode a one-element list that must be rejected; return the reason."""
    out = decode([item])
    assert out.chats == [] and out.received == 1
    assert len(out.rejected) == 1 and out.rejected[0].index == 0
    return out.rejected[0].reason


# -- the documented example ---------------------------------------------------------------


def test_seed_example_decodes_exactly() -> None:
    out = decode_chats(orjson.dumps(SEED_EXAMPLE))
    assert out.received == 3 and out.rejected == []
    assert out.chats == [
        ChatRecord(
            chat_id="79876543210@c.us",
            chat_type="user",
            name="John Doe",
            archived=False,
            ephemeral_expiration=86400,
            ephemeral_setting_at=datetime.fromtimestamp(1777870423, UTC),
            ephemeral_known=True,
        ),
        ChatRecord(
            chat_id="79001234567@c.us",
            chat_type="user",
            name="Jane Doe",
            archived=False,
            ephemeral_expiration=0,
            ephemeral_setting_at=None,  # 0 means "never set"
            ephemeral_known=True,
        ),
        ChatRecord(
            chat_id="79001234567-1479621234@g.us",
            chat_type="group",
            name="My Group",
            archived=False,
            ephemeral_expiration=0,
            ephemeral_setting_at=None,
            ephemeral_known=True,
        ),
    ]
    assert out.chats[0].ephemeral_setting_at is not None
    assert out.chats[0].ephemeral_setting_at.tzinfo is not None


def test_str_body_is_accepted_like_bytes() -> None:
    as_text = json.dumps(SEED_EXAMPLE, ensure_ascii=False)
    assert decode_chats(as_text) == decode_chats(as_text.encode())


# -- whole-body failures -----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"<html><body>Login</body></html>", id="html"),
        pytest.param(b"[{", id="truncated"),
        pytest.param(b'[{"id": "1@c.us"}] trailing', id="trailing-garbage"),
        pytest.param(b"\xff\xfe[]", id="invalid-utf8-bom"),
        pytest.param(b'["\xc3\x28"]', id="invalid-utf8-in-string"),
        pytest.param(b'[{"id": "\xed\xa0\x80@c.us"}]', id="utf8-encoded-surrogate"),
        pytest.param(b"[1e400]", id="infinite-number"),
        pytest.param(b"[" * 2000 + b"]" * 2000, id="too-deep"),
        pytest.param(b'{"error": "x"}', id="object"),
        pytest.param(b'"[]"', id="json-string"),
        pytest.param(b"42", id="json-number"),
        pytest.param(b"null", id="json-null"),
        pytest.param(b"true", id="json-bool"),
    ],
)
def test_unusable_body_is_payload_error(body: bytes) -> None:
    with pytest.raises(PayloadError) as info:
        decode_chats(body)
    err = info.value
    assert err.error_kind == "bad_payload"
    assert err.http_status == 200
    assert str(err)


def test_payload_error_names_the_json_type() -> None:
    with pytest.raises(PayloadError, match="JSON dict, not an array"):
        decode_chats(b'{"a": 1}')
    with pytest.raises(PayloadError, match="not valid JSON"):
        decode_chats(b"nope")


def test_empty_array_decodes_to_nothing() -> None:
    # Judging [] is the syncer's job (an anomaly); the decoder just reports it.
    assert decode_chats(b"[]") == DecodedChats(chats=[], rejected=[], received=0)


# -- per-element rejections --------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        pytest.param(None, "element is a NoneType, not an object", id="null"),
        pytest.param("79001234567@c.us", "element is a str, not an object", id="string"),
        pytest.param([1, 2], "element is a list, not an object", id="list"),
        pytest.param(7, "element is a int, not an object", id="number"),
        pytest.param({"name": "x"}, "id has type NoneType", id="no-id"),
        pytest.param({"id": None}, "id has type NoneType", id="null-id"),
        pytest.param({"id": ""}, "id is empty", id="empty-id"),
        pytest.param({"id": "  \t "}, "id is empty", id="blank-id"),
        pytest.param({"id": "\x00\x00"}, "id is empty", id="nul-only-id"),
        pytest.param({"id": True}, "id is a boolean", id="bool-id"),
        pytest.param({"id": 0}, "id is not a positive number", id="zero-id"),
        pytest.param({"id": -5}, "id is not a positive number", id="negative-id"),
        pytest.param({"id": 1.5}, "id has type float", id="float-id"),
        pytest.param({"id": {"a": 1}}, "id has type dict", id="object-id"),
        # ids that are obviously not a chat's
        pytest.param({"id": "null@c.us"}, "id 'null@c.us' is not a chat id", id="null-at-c-us"),
        pytest.param({"id": "undefined"}, "id 'undefined' is not a chat id", id="undefined"),
        pytest.param({"id": "@c.us"}, "id '@c.us' has nothing before the @", id="no-local-part"),
        pytest.param(
            {"id": "+79001234567@c.us"},
            "id '+79001234567@c.us': a @c.us id is a number",
            id="plus-in-phone",
        ),
        pytest.param({"id": "abc@lid"}, "id 'abc@lid': a @lid id is a number", id="letters-lid"),
        pytest.param(
            {"id": "1-2-3@g.us"},
            "id '1-2-3@g.us': a @g.us id is a number (or two, joined by -)",
            id="bad-group",
        ),
    ],
)
def test_element_rejections_with_reasons(item: Any, reason: str) -> None:
    assert only_rejection(item) == reason


def test_beyond_64_bit_numbers_reject_the_element_not_the_body() -> None:
    # orjson reads integers beyond 64 bits as floats: an id like that rejects its element,
    # a timestamp like that is not understood (the chat is kept, its setting unknown)
    body = (
        b'[{"id": "1@c.us", "ephemeralExpiration": 0, '
        b'"ephemeralSettingTimestamp": 100000000000000000000000000000},'
        b' {"id": "2@c.us"}, {"id": 100000000000000000000000000000}]'
    )
    out = decode_chats(body)
    assert [(c.chat_id, c.ephemeral_known) for c in out.chats] == [
        ("1@c.us", False),
        ("2@c.us", False),
    ]
    assert [(r.index, r.reason) for r in out.rejected] == [(2, "id has type float")]
    assert out.notes == {"ephemeralSettingTimestamp has type float": 1}


# -- tolerated forms: a chat never freezes because one field changed its form ------------

T = 1_777_870_423  # the seed example's timestamp


def one(item: dict[str, Any]) -> tuple[ChatRecord, dict[str, int]]:
    out = decode([item])
    assert out.rejected == [], out.rejected
    return out.chats[0], out.notes


@pytest.mark.parametrize(
    ("fields", "expiration", "setting_at"),
    [
        pytest.param({"ephemeralExpiration": "86400"}, 86400, None, id="digit-string"),
        pytest.param({"ephemeralExpiration": " 604800 "}, 604800, None, id="padded-string"),
        pytest.param({"ephemeralExpiration": 86400.0}, 86400, None, id="integral-float"),
        pytest.param(
            {"ephemeralExpiration": 86400, "ephemeralSettingTimestamp": str(T)},
            86400,
            datetime.fromtimestamp(T, UTC),
            id="timestamp-string",
        ),
        pytest.param(
            {"ephemeralExpiration": 86400, "ephemeralSettingTimestamp": T * 1000 + 250},
            86400,
            datetime.fromtimestamp(T, UTC).replace(microsecond=250_000),
            id="milliseconds",
        ),
        pytest.param(
            {"ephemeralExpiration": "86400", "ephemeralSettingTimestamp": str(T * 1000)},
            86400,
            datetime.fromtimestamp(T, UTC),
            id="milliseconds-as-string",
        ),
        pytest.param(
            {"ephemeralExpiration": 0, "ephemeralSettingTimestamp": "0"}, 0, None, id="zero-string"
        ),
    ],
)
def test_numbers_in_other_forms_are_read_as_numbers(
    fields: dict[str, Any], expiration: int, setting_at: datetime | None
) -> None:
    record, notes = one({"id": "1@c.us", **fields})
    assert (record.ephemeral_known, record.ephemeral_expiration) == (True, expiration)
    assert record.ephemeral_setting_at == setting_at
    assert notes == {}


@pytest.mark.parametrize(
    ("fields", "note"),
    [
        pytest.param({"ephemeralExpiration": True}, "ephemeralExpiration has type bool", id="bool"),
        pytest.param({"ephemeralExpiration": "24h"}, "ephemeralExpiration has type str", id="text"),
        pytest.param(
            {"ephemeralExpiration": 86400.5}, "ephemeralExpiration has type float", id="f"
        ),
        pytest.param({"ephemeralExpiration": -1}, "ephemeralExpiration is negative", id="neg"),
        pytest.param({"ephemeralExpiration": 2**31}, "ephemeralExpiration out of range", id="huge"),
        pytest.param(
            {"ephemeralExpiration": 0, "ephemeralSettingTimestamp": True},
            "ephemeralSettingTimestamp has type bool",
            id="bool-timestamp",
        ),
        pytest.param(
            {"ephemeralExpiration": 0, "ephemeralSettingTimestamp": -1},
            "ephemeralSettingTimestamp is negative",
            id="negative-timestamp",
        ),
        pytest.param(
            {"ephemeralExpiration": 0, "ephemeralSettingTimestamp": MAX_TIMESTAMP + 1},
            "ephemeralSettingTimestamp out of range",
            id="after-9999",
        ),
        pytest.param(
            {"ephemeralExpiration": 0, "ephemeralSettingTimestamp": 10**13},
            "ephemeralSettingTimestamp out of range",
            id="14-digits",
        ),
    ],
)
def test_an_ephemeral_field_not_understood_leaves_the_setting_unknown(
    fields: dict[str, Any], note: str
) -> None:
    """The chat is kept (its name and flag still update); its stored setting is kept, as
    when the API omits the fields, instead of the whole chat being rejected every tick."""
    record, notes = one({"id": "1@c.us", "name": "Still here", **fields})
    assert (record.name, record.ephemeral_known, record.ephemeral_expiration) == (
        "Still here",
        False,
        None,
    )
    assert notes == {note: 1}


@pytest.mark.parametrize(
    ("archive", "archived", "known", "notes"),
    [
        pytest.param(True, True, True, {}, id="true"),
        pytest.param("true", True, True, {}, id="string-true"),
        pytest.param("False", False, True, {}, id="string-false"),
        pytest.param(1, True, True, {}, id="one"),
        pytest.param(0, False, True, {}, id="zero"),
        pytest.param(None, False, False, {}, id="missing"),
        pytest.param("yes", False, False, {"archive has type str": 1}, id="yes"),
        pytest.param(2, False, False, {"archive has type int": 1}, id="two"),
    ],
)
def test_the_archive_flag_in_other_forms(
    archive: Any, archived: bool, known: bool, notes: dict[str, int]
) -> None:
    record, got = one({"id": "1@c.us", "archive": archive})
    assert (record.archived, record.archive_known, got) == (archived, known, notes)


def test_name_and_type_in_other_forms() -> None:
    out = decode(
        [
            {"id": "1@c.us", "name": 79001234567},
            {"id": "2@c.us", "name": ["a"]},
            {"id": "3@g.us", "type": 3},
            {"id": "4@c.us", "type": ""},
        ]
    )
    assert [(c.name, c.chat_type) for c in out.chats] == [
        ("79001234567", "user"),
        ("", "user"),
        ("", "group"),
        ("", "user"),
    ]
    assert out.notes == {"name has type list": 1, "type has type int": 1}


def test_timestamp_bounds_are_inclusive() -> None:
    out = decode(
        [
            {"id": "1@c.us", "ephemeralExpiration": 86400, "ephemeralSettingTimestamp": 1},
            {
                "id": "2@c.us",
                "ephemeralExpiration": 86400,
                "ephemeralSettingTimestamp": MAX_TIMESTAMP,
            },
            {"id": "3@c.us", "ephemeralExpiration": 2**31 - 1, "ephemeralSettingTimestamp": 0},
        ]
    )
    assert out.rejected == []
    assert out.chats[0].ephemeral_setting_at == datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert out.chats[1].ephemeral_setting_at == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert out.chats[2].ephemeral_expiration == 2**31 - 1
    assert out.chats[2].ephemeral_setting_at is None


def test_rejections_keep_the_rest_and_remember_readable_ids() -> None:
    out = decode(
        [
            chat("1@c.us"),
            {"id": "2@c.us", "name": [12]},
            "junk",
            {"id": None},
            chat("3@c.us"),
            {"id": "null@c.us", "archive": "no"},
        ]
    )
    assert [c.chat_id for c in out.chats] == ["1@c.us", "2@c.us", "3@c.us"]
    assert [(r.index, r.chat_id) for r in out.rejected] == [(2, None), (3, None), (5, None)]
    assert out.received == 6


# -- normalisation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("79001234567", "79001234567@c.us", id="bare-digit-string"),
        pytest.param(" 79001234567 ", "79001234567@c.us", id="padded-digit-string"),
        pytest.param(79001234567, "79001234567@c.us", id="json-integer"),
        pytest.param("7900\x001234567", "79001234567@c.us", id="nul-in-digits"),
        pytest.param("79001234567@c.us", "79001234567@c.us", id="person"),
        pytest.param("123456789012345@lid", "123456789012345@lid", id="lid"),
        pytest.param("120363043968066561@g.us", "120363043968066561@g.us", id="group"),
        pytest.param("120363@newsletter", "120363@newsletter", id="newsletter-kept"),
        pytest.param("status@broadcast", "status@broadcast", id="broadcast-kept"),
        pytest.param("١٢٣", "١٢٣", id="non-ascii-digits-opaque"),
        pytest.param("7900@c.us\x00", "7900@c.us", id="trailing-nul"),
    ],
)
def test_chat_id_normalisation(raw: Any, expected: str) -> None:
    out = decode([{"id": raw, "name": "x"}])
    assert out.rejected == []
    assert out.chats[0].chat_id == expected


def test_nul_is_stripped_from_name_and_type() -> None:
    out = decode([{"id": "1@c.us", "name": "Jo\x00hn\x00", "type": "us\x00er"}])
    assert (out.chats[0].name, out.chats[0].chat_type) == ("John", "user")


def test_unicode_names_are_kept_verbatim() -> None:
    names = ["Маша 🌸", "محمد علي", "שרה כהן", "👨‍👩‍👧 Family", "", "x" * 5000]
    out = decode([chat(f"{i}@c.us", name=n) for i, n in enumerate(names, start=1)])
    assert [c.name for c in out.chats] == names


def test_unknown_type_is_stored_as_given() -> None:
    out = decode([{"id": "1@newsletter", "type": "channel"}])
    assert out.chats[0].chat_type == "channel"


def test_duplicates_after_normalisation_first_wins() -> None:
    out = decode(
        [
            chat("79001234567@c.us", name="first"),
            chat("79001234567", name="bare"),
            {"id": 79001234567, "name": "int"},
            chat("7900123\x004567@c.us", name="nul"),
            chat("79001234568@c.us", name="other"),
        ]
    )
    assert [(c.chat_id, c.name) for c in out.chats] == [
        ("79001234567@c.us", "first"),
        ("79001234568@c.us", "other"),
    ]
    assert [(r.index, r.chat_id) for r in out.rejected] == [
        (1, "79001234567@c.us"),
        (2, "79001234567@c.us"),
        (3, "79001234567@c.us"),
    ]
    assert all(r.reason.startswith("duplicate id") for r in out.rejected)
    assert out.received == 5


def test_rejected_element_does_not_claim_its_id() -> None:
    # A bad first copy is rejected; the later valid copy of the same id is kept.
    out = decode([{"id": 1.5, "name": "bad"}, chat("1@c.us", name="good")])
    assert [(c.chat_id, c.name) for c in out.chats] == [("1@c.us", "good")]


def test_missing_optional_fields_get_defaults() -> None:
    out = decode([{"id": "79001234567"}, {"id": "79001234567-1479621234@g.us"}])
    person, group = out.chats
    assert person == ChatRecord(
        chat_id="79001234567@c.us",
        chat_type="user",
        name="",
        archived=False,
        ephemeral_expiration=None,
        ephemeral_setting_at=None,
        ephemeral_known=False,
        archive_known=False,
    )
    assert group.chat_type == "group"  # inferred from @g.us
    assert group.ephemeral_known is False


def test_null_optional_fields_are_like_missing() -> None:
    out = decode(
        [
            {
                "id": "1@g.us",
                "name": None,
                "type": None,
                "archive": None,
                "ephemeralExpiration": None,
                "ephemeralSettingTimestamp": None,
            }
        ]
    )
    c = out.chats[0]
    assert (c.name, c.chat_type, c.archived, c.ephemeral_known) == ("", "group", False, False)


def test_missing_ephemeral_fields_mean_unknown() -> None:
    out = decode(
        [
            {"id": "1@c.us", "ephemeralSettingTimestamp": 1700000000},  # no expiration
            {"id": "2@c.us", "ephemeralExpiration": 604800},  # no timestamp
            {"id": "3@c.us", "ephemeralExpiration": 0, "ephemeralSettingTimestamp": 0},
        ]
    )
    a, b, c = out.chats
    assert (a.ephemeral_known, a.ephemeral_expiration, a.ephemeral_setting_at) == (
        False,
        None,
        None,
    )
    assert (b.ephemeral_known, b.ephemeral_expiration, b.ephemeral_setting_at) == (
        True,
        604800,
        None,
    )
    assert (c.ephemeral_known, c.ephemeral_expiration, c.ephemeral_setting_at) == (True, 0, None)


def test_archived_and_explicit_type_are_kept() -> None:
    out = decode([chat("1@g.us", kind="user", archive=True)])
    assert (out.chats[0].chat_type, out.chats[0].archived) == ("user", True)


def test_unknown_extra_fields_are_ignored() -> None:
    out = decode([{**chat("1@c.us"), "unreadCount": 3, "lastMessage": {"x": 1}}])
    assert out.rejected == [] and out.chats[0].chat_id == "1@c.us"


# -- properties --------------------------------------------------------------------------

# characters that matter to the decoder (digits, id suffixes, NUL, blanks, RTL, emoji), plus any
text_chars = st.sampled_from(list("0123456789@.cusgl-_ \t\x00\u200f🌸מЖ")) | st.characters(
    codec="utf-8"
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(text_chars, max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(text_chars, max_size=6), children, max_size=4)
    ),
    max_leaves=10,
)
chat_keys = st.sampled_from(
    ["id", "name", "type", "archive", "ephemeralExpiration", "ephemeralSettingTimestamp", "x"]
)
# mostly-plausible chats, so that the accept path (and duplicates) is exercised too
chat_like = st.dictionaries(chat_keys, json_values, max_size=6) | st.fixed_dictionaries(
    {"id": st.sampled_from(["5", "5@c.us", " 5", 5, "6@g.us", "5\x00"]) | json_scalars},
    optional={
        "name": st.text(text_chars, max_size=8)
        | json_scalars
        # what splits a body at the wrong place when it is inside a string
        | st.sampled_from(["a},{b", "}, {", "x}\n,\n{", '},{"id":"5@c.us"}', "}", "{"]),
        "archive": st.booleans() | json_scalars,
        "ephemeralExpiration": st.sampled_from([0, 86400, -1, 2**31]) | json_scalars,
        "ephemeralSettingTimestamp": st.integers(-5, 2**40) | json_scalars,
    },
)


def _check(out: DecodedChats, n: int) -> None:
    assert isinstance(out, DecodedChats)
    assert out.received == n
    assert len(out.chats) + len(out.rejected) == n
    ids = [c.chat_id for c in out.chats]
    assert len(ids) == len(set(ids))
    for c in out.chats:
        assert c.chat_id and "\x00" not in c.chat_id and "\x00" not in c.name
        assert "\x00" not in c.chat_type
        assert c.ephemeral_known == (c.ephemeral_expiration is not None)


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_payload_error(body: bytes) -> None:
    try:
        out = decode_chats(body)
    except PayloadError as exc:
        assert exc.error_kind == "bad_payload"
        return
    assert isinstance(out, DecodedChats)
    assert len(out.chats) + len(out.rejected) == out.received


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(json_values | chat_like, max_size=6))
def test_any_json_list_decodes_every_element(items: list[Any]) -> None:
    body = json.dumps(items, ensure_ascii=False).encode("utf-8")
    _check(decode_chats(body), len(items))


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(json_values | chat_like, max_size=5), st.integers(0, 40))
def test_any_json_list_with_noise_never_raises_other_errors(items: list[Any], cut: int) -> None:
    body = json.dumps(items).encode()
    for candidate in (body, body[:cut], body + b"x", body.replace(b",", b"", 1)):
        try:
            out = decode_chats(candidate)
        except PayloadError:
            # the split-by-elements path never accepts what a full parse refuses
            with pytest.raises(PayloadError):
                decode_chats(candidate, track=True)
            continue
        assert len(out.chats) + len(out.rejected) == out.received
        tracked = decode_chats(candidate, track=True)
        assert (tracked.chats, tracked.rejected) == (out.chats, out.rejected)


# -- skipping elements identical to the last list applied -----------------------------------


def _by_id(out: DecodedChats) -> dict[str, ChatRecord]:
    return {c.chat_id: c for c in out.chats}


DUMPS: dict[str, Any] = {
    "spaced": lambda v: json.dumps(v, ensure_ascii=False).encode(),
    "compact": lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode(),
    "indented": lambda v: json.dumps(v, indent=2).encode(),
}


def _assert_fast_equals_full(
    before: list[Any], after: list[Any], style: str = "spaced"
) -> DecodedChats:
    """Decoding ``after`` against ``before``'s raw hashes means the same as decoding it in
    full: same counts and rejections, same ids, the skipped ones as they were before."""
    dumps = DUMPS[style]
    prev = decode_chats(dumps(before), track=True)
    assert prev.raw_hashes is not None
    prev_full = decode_chats(dumps(before))
    assert (prev.chats, prev.rejected, prev.received) == (
        prev_full.chats,
        prev_full.rejected,
        prev_full.received,
    )
    body = dumps(after)
    full = decode_chats(body)
    fast = decode_chats(body, known=prev.raw_hashes)
    assert fast.received == full.received
    assert fast.rejected == full.rejected
    assert fast.ids == {c.chat_id for c in full.chats}
    assert len(fast.chats) + len(fast.unchanged) + len(fast.rejected) == fast.received
    whole = _by_id(full)
    for c in fast.chats:
        assert whole[c.chat_id] == c
    for cid in fast.unchanged:
        assert whole[cid] == _by_id(prev)[cid]
    return fast


def test_identical_elements_are_skipped_and_changed_ones_decoded() -> None:
    a = chat("1@c.us", name="A", expiration=86400, stamp=1_700_000_000)
    b = chat("2@c.us", name="B")
    fast = _assert_fast_equals_full([a, b], [dict(a), dict(b, name="B2"), chat("3@c.us")])
    assert fast.unchanged == ["1@c.us"]
    assert [c.chat_id for c in fast.chats] == ["2@c.us", "3@c.us"]


@pytest.mark.parametrize(
    ("key", "before", "after"),
    [
        pytest.param("archive", True, 1, id="true-then-1"),
        pytest.param("archive", False, 0, id="false-then-0"),
        pytest.param("ephemeralExpiration", 86400, 86400.0, id="int-then-float"),
        pytest.param("ephemeralExpiration", 1, True, id="1-then-true"),
        pytest.param("name", "x", ["x"], id="then-a-list"),
    ],
)
def test_a_value_of_another_type_is_never_taken_as_unchanged(
    key: str, before: Any, after: Any
) -> None:
    """``1 == True == 1.0`` and they hash alike in Python; the raw hash includes the types."""
    old = chat("1@c.us") | {key: before}
    fast = _assert_fast_equals_full([old], [old | {key: after}])
    assert fast.unchanged == []


def test_duplicates_raw_ids_needing_normalisation_and_nested_values() -> None:
    a = chat("1@c.us")
    digits = chat("79001234567")  # normalised to 79001234567@c.us
    nested = chat("3@c.us") | {"extra": {"a": 1}}
    before = [a, digits, nested]
    fast = _assert_fast_equals_full(before, [a, dict(a), digits, nested])
    assert fast.unchanged == ["1@c.us", "79001234567@c.us", "3@c.us"]
    assert [r.reason for r in fast.rejected] == ["duplicate id '1@c.us'"]
    assert fast.chats == []


@pytest.mark.parametrize("style", sorted(DUMPS))
@pytest.mark.parametrize(
    "name", ["a},{b", "}, {", '},{"id":"9@c.us","name":"x"}', "plain"], ids=repr
)
def test_a_name_that_looks_like_an_element_boundary_decodes_as_in_full(
    name: str, style: str
) -> None:
    a, b = chat("1@c.us", name=name), chat("2@c.us", name="B")
    fast = _assert_fast_equals_full(
        [a, b], [a, dict(b, name="B2"), chat("4@c.us", name=name)], style
    )
    assert {c.chat_id for c in fast.chats} | set(fast.unchanged) == {"1@c.us", "2@c.us", "4@c.us"}
    assert [c.name for c in fast.chats if c.chat_id == "4@c.us"] == [name]


def test_elements_split_from_the_raw_body_are_skipped_without_parsing() -> None:
    """The split is by bytes: an unchanged element is found by the hash of its text."""
    chats = [chat(f"{i}@c.us", name=f"n{i}") for i in range(50)]
    prev = decode_chats(DUMPS["compact"](chats), track=True)
    assert prev.raw_hashes is not None and len(prev.raw_hashes) == 50
    chats[7]["name"] = "changed"
    fast = decode_chats(DUMPS["compact"](chats), known=prev.raw_hashes)
    assert [c.chat_id for c in fast.chats] == ["7@c.us"]
    assert len(fast.unchanged) == 49 and fast.received == 50


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.data())
def test_decoding_against_the_last_list_means_the_same_as_decoding_in_full(
    data: st.DataObject,
) -> None:
    before = data.draw(st.lists(chat_like | json_values, max_size=6), label="before")
    reuse = st.sampled_from(before) if before else chat_like
    after = data.draw(st.lists(reuse | chat_like, max_size=8), label="after")
    _assert_fast_equals_full(before, after, data.draw(st.sampled_from(sorted(DUMPS))))


@pytest.mark.parametrize("style", sorted(DUMPS))
def test_a_duplicate_id_first_wins_whether_unchanged_or_not(style: str) -> None:
    """Skipped and parsed elements with one chat id: the first in the list wins, as in a
    full decode (the skip finds unchanged elements in bulk, then checks the order)."""
    a = chat("1@c.us", name="A")
    b = chat("2@c.us", name="B")
    changed_a = dict(a, name="A2")
    for after in (
        [changed_a, b, a],  # the changed one first: it wins, the unchanged one is rejected
        [a, b, changed_a],  # the unchanged one first
        [a, b, a],  # the same bytes twice
        [b, dict(a, id="+1@c.us"), a],  # a rejected element naming an unchanged chat
    ):
        fast = _assert_fast_equals_full([a, b], after, style)
        assert fast.received == 3


# -- Telegram and MAX instances on the same path ------------------------------------------

#: the example of green-api.com/en/telegram/docs/api/service/GetChats
TELEGRAM_EXAMPLE = [
    {
        "chatId": "-10000000000000",
        "name": "GREEN-API Super Group",
        "type": "supergroup",
        "phoneNumber": 0,
        "username": "@green_api_supergroup",
    },
    {
        "chatId": "10000000",
        "name": "Vasilisa the Wise",
        "type": "user",
        "phoneNumber": 79876543210,
        "username": "@vasilisa",
    },
    {"chatId": "-5098765432", "name": "GREEN-API Group", "type": "group", "phoneNumber": 0},
]
#: the example of green-api.com/v3/docs/api/service/GetChats/ (MAX)
MAX_EXAMPLE = [
    {"chatId": "-10000000000000", "phoneNumber": 0},
    {"chatId": "10000000", "phoneNumber": 79876543210},
    {"chatId": 10000001, "phoneNumber": 79998887766},
]


def test_a_telegram_list_is_read_as_its_docs_describe() -> None:
    out = decode_chats(orjson.dumps(TELEGRAM_EXAMPLE), platform="telegram")
    assert out.rejected == [] and out.notes == {}
    assert [(c.chat_id, c.chat_type, c.name) for c in out.chats] == [
        ("-10000000000000", "supergroup", "GREEN-API Super Group"),
        ("10000000", "user", "Vasilisa the Wise"),
        ("-5098765432", "group", "GREEN-API Group"),
    ]
    # no @c.us rewriting, no archive flag, no ephemeral setting
    assert all(not c.ephemeral_known and not c.archive_known for c in out.chats)


def test_a_max_list_has_ids_only() -> None:
    out = decode_chats(orjson.dumps(MAX_EXAMPLE), platform="max", track=True)
    assert out.rejected == []
    assert [(c.chat_id, c.chat_type, c.name) for c in out.chats] == [
        ("-10000000000000", "group", ""),
        ("10000000", "user", ""),
        ("10000001", "user", ""),
    ]


@pytest.mark.parametrize(
    ("body", "platform", "looks"),
    [
        pytest.param(TELEGRAM_EXAMPLE, "whatsapp", "telegram", id="telegram-to-whatsapp"),
        pytest.param(MAX_EXAMPLE, "whatsapp", "max", id="max-to-whatsapp"),
        pytest.param(SEED_EXAMPLE, "telegram", "whatsapp", id="whatsapp-to-telegram"),
        pytest.param(SEED_EXAMPLE, "max", "whatsapp", id="whatsapp-to-max"),
        pytest.param(MAX_EXAMPLE, "telegram", "max", id="max-to-telegram"),
        pytest.param(TELEGRAM_EXAMPLE, "max", "telegram", id="telegram-to-max"),
    ],
)
@pytest.mark.parametrize("track", [False, True])
def test_another_messengers_list_fails_naming_the_one_it_looks_like(
    body: list[Any], platform: str, looks: str, track: bool
) -> None:
    with pytest.raises(PlatformMismatch) as caught:
        decode_chats(orjson.dumps(body), platform=platform, track=track)
    exc = caught.value
    assert (exc.error_kind, exc.looks, exc.platform) == ("wrong_platform", looks, platform)
    assert f"set platform = '{looks}'" in exc.message
    assert {"telegram": "Telegram", "max": "MAX", "whatsapp": "WhatsApp"}[looks] in exc.message


def test_a_list_of_unreadable_elements_is_not_a_platform_mismatch() -> None:
    out = decode([{"x": 1}, {"id": None}])
    assert out.chats == [] and len(out.rejected) == 2


@pytest.mark.parametrize("name", ["},{", 'a "},{" b', "plain"])
def test_the_same_body_again_decodes_to_the_same_chats_even_when_it_could_not_be_split(
    name: str,
) -> None:
    """A body whose elements cannot be cut apart on their own (a name holding ``},{``) is
    parsed whole, without element hashes; the same body again must not be answered from
    those (none) as an empty list: it once made an unchanged list an empty-response
    anomaly until the list changed."""
    body = json.dumps(
        [chat("1@c.us", name=name), chat("2@c.us"), chat("3@c.us")], separators=(",", ":")
    ).encode()
    first = decode_chats(body, track=True)
    assert [c.chat_id for c in first.chats] == ["1@c.us", "2@c.us", "3@c.us"]
    again = decode_chats(body, known=first.raw_hashes, known_body=first.body_hash, track=True)
    assert sorted([c.chat_id for c in again.chats] + again.unchanged) == [
        "1@c.us",
        "2@c.us",
        "3@c.us",
    ]
    assert again.received == 3
