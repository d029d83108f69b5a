"""Chat identity across id changes (``etl.sync.identity``): the pure rules, no database.

The syncer's use of them, through the simulator and both databases, is in
tests/test_green_api.py.
"""

from __future__ import annotations

from typing import Any

import orjson

from etl.payload import DecodedChats, decode_chats
from etl.sync.fingerprints import chat_fingerprint
from etl.sync.identity import Answer, Identity, find_switch, judge_switch, translate
from etl.sync.plan import IdChange
from tests.factories import chat


def decoded(*ids: str, **kw: Any) -> DecodedChats:
    return decode_chats(orjson.dumps([chat(i, **kw) for i in ids]))


P1, P2, P3 = "79000000001@c.us", "79000000002@c.us", "79000000003@c.us"
L1, L2, L3 = "100000000000001@lid", "100000000000002@lid", "100000000000003@lid"
G = "120363000000000001@g.us"


def test_without_aliases_the_list_is_used_as_it_is() -> None:
    d = decoded(P1, L1)
    assert translate(d, Identity(), {P1}) == (d, [])


def test_an_alias_maps_to_its_chat_and_a_new_id_in_use_is_a_change() -> None:
    ident = Identity(aliases={L1: P1})
    out, changes = translate(decoded(L1, G), ident, {P1, G})
    assert [c.chat_id for c in out.chats] == [P1, G]
    assert changes == [IdChange(P1, P1, L1)]
    # once L1 is the id in use, seeing it again is no change
    ident.record(changes, {})
    assert ident.current == {P1: L1}
    assert translate(decoded(L1), ident, {P1})[1] == []
    # and the chat's own id again is a change back
    out, changes = translate(decoded(P1), ident, {P1})
    assert ([c.chat_id for c in out.chats], changes) == ([P1], [IdChange(P1, L1, P1)])
    ident.record(changes, {})
    assert ident.current == {}


def test_ids_skipped_as_unchanged_map_without_a_change() -> None:
    ident = Identity(aliases={L1: P1}, current={P1: L1})
    first = decode_chats(orjson.dumps([chat(L1), chat(L2)]), track=True)
    assert first.raw_hashes is not None
    again = decode_chats(orjson.dumps([chat(L1), chat(L2)]), known=first.raw_hashes)
    assert again.unchanged == [L1, L2]
    out, changes = translate(again, ident, {P1, L2})
    assert (out.unchanged, changes) == ([P1, L2], [])


def test_two_ids_of_one_chat_side_by_side_are_two_chats() -> None:
    """A link joins a vanished chat to one that appeared, never two chats of one list."""
    ident = Identity(aliases={L1: P1})
    out, changes = translate(decoded(L1, P1), ident, {P1})
    assert [c.chat_id for c in out.chats] == [L1, P1] and changes == []


def test_a_rejected_element_names_its_chat_by_the_chats_id() -> None:
    out, _ = translate(decoded(L1, L1), Identity(aliases={L1: P1}), {P1})
    assert [c.chat_id for c in out.chats] == [P1]
    assert [r.chat_id for r in out.rejected] == [P1]  # the duplicate protects P1


def switch_of(listed: list[str], present: set[str], answers: dict[str, Answer], **kw: Any) -> Any:
    ident = kw.pop("identity", Identity())
    d, changes = translate(decoded(*listed), ident, present)
    fingerprints = kw.pop("fingerprints", dict.fromkeys(present, 0))
    return find_switch(
        d,
        present=present,
        in_table=fingerprints,
        identity=ident,
        answers=answers,
        threshold=0.5,
        changes=changes,
    )


def test_a_switch_to_lids_asks_the_phone_ids_then_links_them() -> None:
    present = {P1, P2, P3, G}
    listed = [L1, L2, L3, G]
    s = switch_of(listed, present, {})
    assert sorted(s.to_ask) == [P1, P2, P3] and s.links == []
    assert s.moving["@c.us"] == (3, 3) and s.switch_like(0.5)
    answers = {P1: Answer(True, L1), P2: Answer(True, L2), P3: Answer(True, L3)}
    s = switch_of(listed, present, answers)
    assert s.to_ask == [] and sorted(s.links) == [(P1, P1, L1), (P2, P2, L2), (P3, P3, L3)]
    out, changes = s.apply(translate(decoded(*listed), Identity(), present)[0])
    assert sorted(c.chat_id for c in out.chats) == sorted([P1, P2, P3, G])
    assert len(changes) == 3


def test_a_genuine_removal_in_a_switch_stays_a_removal() -> None:
    present = {P1, P2, P3}
    answers = {P1: Answer(True, L1), P2: Answer(True, L2), P3: Answer(True, L3)}
    s = switch_of([L1, L2], present, answers)  # P3's chat is gone for good
    assert sorted(s.links) == [(P1, P1, L1), (P2, P2, L2)]
    assert s.to_ask == [] and s.aliases == {L3: P3}  # kept for the day it comes back
    s = switch_of([L1, L2], present, {**answers, P3: Answer(False)})
    assert s.aliases == {} and s.to_ask == []


def test_a_lid_that_is_a_stored_chat_of_its_own_is_never_an_alias() -> None:
    """A person with a chat under each id (L3 stored apart from P3): P3 vanishes, and
    checkWhatsapp says its lid is L3. L3 stays a chat of its own; no alias names it."""
    present = {P1, P2, P3, L3}
    answers = {P1: Answer(True, L1), P2: Answer(True, L2), P3: Answer(True, L3)}
    s = switch_of([L1, L2], present, answers)
    assert sorted(s.links) == [(P1, P1, L1), (P2, P2, L2)]
    assert s.aliases == {}  # P3 went; L3 (gone too) is not P3's alias


def test_a_chat_whose_lid_is_known_is_not_asked_again() -> None:
    ident = Identity(aliases={L3: P3})
    s = switch_of([L1], {P1, P3}, {P1: Answer(True, L1)}, identity=ident)
    assert s.to_ask == [] and s.links == [(P1, P1, L1)]


def test_a_switch_back_to_phone_ids_links_by_the_lid_of_the_new_phone_id() -> None:
    ident = Identity(aliases={L1: P1, L2: P2}, current={P1: L1, P2: L2})
    present = {P1, P2, L3}  # L3's chat was first seen as a lid
    listed = [P1, P2, P3]
    s = switch_of(listed, present, {}, identity=ident)
    # P1 and P2 are the chats' own ids: they map without asking; P3 is new, L3 gone
    assert s.to_ask == [P3]
    s = switch_of(listed, present, {P3: Answer(True, L3)}, identity=ident)
    assert s.links == [(L3, L3, P3)] and s.to_ask == []


def test_outside_a_switch_only_a_look_alike_is_asked_and_nothing_is_held() -> None:
    """One chat of 20 gone and one lid new: a removal beside a new chat, unless the new
    chat looks exactly like the gone one (a chat whose id flipped on its own): then it is
    worth a lookup. Neither holds the tick."""
    phones = [f"7900000{i:04d}@c.us" for i in range(20)]
    stored = {p: chat_fingerprint(decoded(p, name=f"n{p}").chats[0]) for p in phones}
    listed = [chat(p, name=f"n{p}") for p in phones[1:]]
    unlike = listed + [chat(L1, name="someone else")]
    d = decode_chats(orjson.dumps(unlike))
    s = find_switch(
        d, present=set(phones), in_table=stored, identity=Identity(), answers={}, threshold=0.5
    )
    assert s.to_ask == [] and not s.switch_like(0.5)
    alike = listed + [chat(L1, name=f"n{phones[0]}")]
    d = decode_chats(orjson.dumps(alike))
    s = find_switch(
        d, present=set(phones), in_table=stored, identity=Identity(), answers={}, threshold=0.5
    )
    assert s.to_ask == [phones[0]] and not s.switch_like(0.5)
    assert judge_switch(s, threshold=0.5, failure=None) is None
    assert judge_switch(s, threshold=0.5, failure="checkWhatsapp: HTTP 466") is None
    big = switch_of([L1, L2, L3], {P1, P2, P3}, {})
    assert judge_switch(big, threshold=0.5, failure=None) is not None  # asked next ticks
    reason = judge_switch(big, threshold=0.5, failure="checkWhatsapp: HTTP 466")
    assert reason is not None and "etl ids accept" in reason and "3 could not be" in reason


def test_stored_links_count_towards_the_share_of_a_switch() -> None:
    ident = Identity(aliases={L1: P1, L2: P2})
    s = switch_of([L1, L2, L3], {P1, P2, P3}, {}, identity=ident)
    assert s.to_ask == [P3] and s.moving["@c.us"] == (3, 3)


def test_lists_without_person_chats_have_no_switch() -> None:
    s = switch_of([G], {"1-2@g.us"}, {})
    assert (s.to_ask, s.links, s.switch_like(0.5)) == ([], [], False)


def test_churn_that_empties_a_small_form_is_not_a_switch() -> None:
    """After an outage, ordinary churn removed 3 of the 4 lid chats while many phone chats
    appeared: 3 of 4 lids is more than the threshold of that form, but not of the person
    chats, so the tick is what it looks like (removals and new chats), not a held switch.
    Seen in a 5 s database outage under a busy simulator."""
    phones = [f"7900000{i:04d}@c.us" for i in range(20)]
    lids = [f"10000000000000{i}@lid" for i in range(4)]
    new_phones = [f"7911111{i:04d}@c.us" for i in range(10)]
    present = set(phones) | set(lids)
    s = switch_of([*phones, lids[0], *new_phones], present, {})
    assert s.moving["@lid"] == (3, 24) and not s.switch_like(0.5)
    assert judge_switch(s, threshold=0.5, failure=None) is None
    # the same share of the whole instance's people is a switch
    s = switch_of(
        [*phones[:6], lids[0], *[f"2000000000000{i:02d}@lid" for i in range(14)]], present, {}
    )
    assert s.switch_like(0.5) and judge_switch(s, threshold=0.5, failure=None) is not None
