"""A chat keeps its identity when its id changes: WhatsApp's ``@c.us`` and ``@lid`` ids.

A chat is identified by the id it was first stored under (``chats.chat_id``); every table
keys on it, so history, events and the views go on across an id change. ``Identity`` holds
the other ids a chat is known by (``chat_aliases``) and the id the API uses for it now
(``chats.current_chat_id``). No I/O here; each tick:

1. ``translate``: every id of the list maps to its chat (a chat's own id first, else an
   alias), and a chat seen under another id than last time is an ``IdChange``.
2. ``find_switch``: stored chats missing from a complete list while chats of the other
   form appeared (a person's ``@c.us`` chat gone, new ``@lid`` chats, or the reverse) may
   be one chat under two ids. The link comes from Green-API's checkWhatsapp, asked by the
   phone-number id, which answers the person's lid (``Answer``). A link joins a chat that
   vanished with one that appeared in the same list: it never merges two chats that the
   list shows side by side.
3. ``Switch.verdict``: apply the tick, or hold it (an ``id_switch`` anomaly) while an id
   switch is not fully linked. A few chats gone and a few new ones with no link to be had
   are what they look like (removals and new chats); a switch of more than the
   mass-removal threshold of the person chats is held until linked, or accepted by the
   operator.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Set
from dataclasses import dataclass, field, replace
from itertools import repeat

from etl.payload import ChatRecord, DecodedChats
from etl.sync.fingerprints import chat_fingerprint
from etl.sync.plan import IdChange

PHONE, LID = "@c.us", "@lid"
#: the chat ids in the table: a set, or the snapshot's fingerprints
Container = Set[str] | Mapping[str, object]


@dataclass(slots=True)
class Identity:
    """The ids of one instance's chats besides their own: ``aliases`` (alias -> chat) and
    ``current`` (chat -> the id in use, when it is not the chat's own). Every id in
    ``current`` is also an alias."""

    aliases: dict[str, str] = field(default_factory=dict)
    current: dict[str, str] = field(default_factory=dict)

    def in_use(self, chat_id: str) -> str:
        return self.current.get(chat_id, chat_id)

    def after(
        self, changes: Collection[IdChange], aliases: Mapping[str, tuple[str, str]]
    ) -> Identity:
        """These ids as a tick leaves them (``aliases``: alias -> (chat, source)); itself
        when the tick changed none."""
        if not changes and not aliases:
            return self
        out = Identity(dict(self.aliases), dict(self.current))
        out.record(changes, {a: c for a, (c, _) in aliases.items()})
        return out

    def record(self, changes: Collection[IdChange], aliases: Mapping[str, str]) -> None:
        """After commit: the id changes and the aliases a tick wrote."""
        self.aliases.update(aliases)
        for c in changes:
            if c.new_id == c.chat_id:
                self.current.pop(c.chat_id, None)
            else:
                self.aliases[c.new_id] = c.chat_id
                self.current[c.chat_id] = c.new_id


@dataclass(frozen=True, slots=True)
class Answer:
    """What checkWhatsapp said of a phone-number id: whether it is on WhatsApp, its lid."""

    exists: bool
    lid: str | None = None


def _form(chat_id: str) -> str | None:
    if chat_id.endswith(PHONE):
        return PHONE
    if chat_id.endswith(LID):
        return LID
    return None


def translate(
    decoded: DecodedChats, identity: Identity, in_table: Container
) -> tuple[DecodedChats, list[IdChange]]:
    """The list with every id mapped to its chat, and the chats seen under another id than
    the one in use. Ids the elements skipped as unchanged (``decoded.unchanged``) were in
    the last list applied, under the same chat, so they only map."""
    if not identity.aliases:
        return decoded, []
    claims: dict[str, str] = {}  # chat -> the id of the list that names it
    for api_id in [c.chat_id for c in decoded.chats] + decoded.unchanged:
        chat = api_id if api_id in in_table else identity.aliases.get(api_id, api_id)
        other = claims.get(chat)
        if other is None or _prefer(api_id, other, chat, identity):
            claims[chat] = api_id
    unchanged = set(decoded.unchanged)
    changes = [
        IdChange(chat, identity.in_use(chat), api_id)
        for chat, api_id in claims.items()
        if api_id != identity.in_use(chat) and api_id not in unchanged
    ]
    chat_of = {api_id: chat for chat, api_id in claims.items() if api_id != chat}
    return (_mapped(decoded, chat_of) if chat_of else decoded), changes


def _prefer(api_id: str, other: str, chat: str, identity: Identity) -> bool:
    """Two ids of one list name one chat: the chat's own id wins, then the id in use."""
    for best in (chat, identity.in_use(chat)):
        if other == best:
            return False
        if api_id == best:
            return True
    return False


def _mapped(decoded: DecodedChats, chat_of: Mapping[str, str]) -> DecodedChats:
    """``decoded`` with the ids in ``chat_of`` replaced by their chat."""
    chats = [
        replace(c, chat_id=chat_of[c.chat_id]) if c.chat_id in chat_of else c for c in decoded.chats
    ]
    rejected = [
        replace(r, chat_id=chat_of.get(r.chat_id, r.chat_id)) if r.chat_id else r
        for r in decoded.rejected
    ]
    return DecodedChats(
        chats=chats,
        rejected=rejected,
        received=decoded.received,
        unchanged=[chat_of.get(i, i) for i in decoded.unchanged],
        raw_hashes=decoded.raw_hashes,
        notes=decoded.notes,
        body_hash=decoded.body_hash,
    )


# -- an id switch ------------------------------------------------------------------------


@dataclass(slots=True)
class Switch:
    """What an id switch of this tick needs, and what the answers so far settle.

    ``links``: (chat, old id, new id) joined by an answer; ``aliases``: alias -> chat, to
    store now (answers about chats that exist); ``late_aliases``: the same for chats this
    tick creates; ``to_ask``: phone-number ids whose answer is missing; ``moving``: per
    form, the chats of that form that vanished (linked or not), and the present person
    chats of both forms (the share that makes it a switch).
    """

    links: list[tuple[str, str, str]] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    late_aliases: dict[str, str] = field(default_factory=dict)
    to_ask: list[str] = field(default_factory=list)
    vanished: int = 0
    appeared: int = 0
    moving: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def unresolved(self) -> int:
        return len(self.to_ask)

    def switch_like(self, threshold: float) -> bool:
        """More than ``threshold`` of the present person chats changed from one form
        or vanished from it towards the other: an id switch, not a few removals beside a
        few new chats. The share is of all person chats, not of the one form: a switch
        moves the instance's people wholesale, while ordinary churn (chats removed, others
        new) can empty a form that holds a handful of chats."""
        return any(total and moved / total > threshold for moved, total in self.moving.values())

    def apply(self, decoded: DecodedChats) -> tuple[DecodedChats, list[IdChange]]:
        """``decoded`` with the linked new ids mapped to their chats, and their changes."""
        if not self.links:
            return decoded, []
        chat_of = {new: chat for chat, _old, new in self.links}
        return _mapped(decoded, chat_of), [IdChange(c, o, n) for c, o, n in self.links]


def find_switch(
    decoded: DecodedChats,
    *,
    present: Set[str],
    in_table: Container,
    identity: Identity,
    answers: Mapping[str, Answer],
    threshold: float,
    changes: Collection[IdChange] = (),
) -> Switch:
    """The id switch in a translated, complete list: chats of one form vanished while
    chats of the other appeared. ``changes``: the id changes ``translate`` found (stored
    links), which count towards the share of a switch; ``in_table``: the snapshot's
    fingerprints (or any container of the stored ids).

    In a switch (``Switch.switch_like``) every vanished chat is a candidate. Otherwise
    only a vanished chat that a new chat of the other form looks exactly like (the same
    stored attributes: a chat whose id flipped on its own) is worth a lookup; the rest are
    removals beside new chats, as they look.
    """
    out = Switch()
    sides = _sides(decoded, present, in_table, identity)
    if sides is None:
        return out
    gone, new = sides
    active = [f for f, other in ((PHONE, LID), (LID, PHONE)) if gone[f] and new[other]]
    out.vanished = sum(len(g) for g in gone.values())
    out.appeared = sum(len(n) for n in new.values())
    _measure(out, present, identity, changes, {f: len(gone[f]) for f in active})
    switch = out.switch_like(threshold)
    if PHONE in active:
        olds = _plausible(gone[PHONE], new[LID], in_table, switch)
        _phones_to_lids(out, olds, {c.chat_id for c in new[LID]}, identity, answers)
    if LID in active:
        news = _plausible_new(new[PHONE], gone[LID], in_table, switch)
        _lids_to_phones(out, gone[LID], news, identity, answers)
    # an id that is a stored chat's own is that chat: never an alias of another one (the
    # person had a chat under each id; a link never merges two stored chats)
    out.aliases = {a: c for a, c in out.aliases.items() if a not in in_table}
    out.late_aliases = {a: c for a, c in out.late_aliases.items() if a not in in_table}
    return out


def _sides(
    decoded: DecodedChats, present: Set[str], in_table: Container, identity: Identity
) -> tuple[dict[str | None, list[str]], dict[str | None, list[ChatRecord]]] | None:
    """The stored chats missing from the list and the new chats, by the form of the id
    in use (``@c.us``, ``@lid``, other); None when either side is empty."""
    # new chats first: a steady list has none (and its elements skipped as unchanged are
    # all stored chats), so most ticks stop here without a pass over the whole list
    new: dict[str | None, list[ChatRecord]] = {PHONE: [], LID: [], None: []}
    for c in decoded.chats:
        if c.chat_id not in in_table:
            new[_form(c.chat_id)].append(c)
    if not new[PHONE] and not new[LID]:
        return None
    seen = decoded.ids | {r.chat_id for r in decoded.rejected if r.chat_id}
    gone: dict[str | None, list[str]] = {PHONE: [], LID: [], None: []}
    for p in present - seen:  # a set difference: few chats go missing in a tick
        gone[_form(identity.in_use(p))].append(p)
    if not any(gone.values()):
        return None
    return gone, new


def _print(in_table: Container, chat_id: str) -> int | None:
    """The stored fingerprint of a chat, when ``in_table`` holds fingerprints."""
    value = in_table.get(chat_id) if isinstance(in_table, Mapping) else None
    return value if isinstance(value, int) else None


def _plausible(
    gone: list[str], new: list[ChatRecord], in_table: Container, switch: bool
) -> list[str]:
    """The vanished chats worth a lookup: all of them in a switch, else the ones a new
    chat looks exactly like."""
    if switch:
        return gone
    prints = {chat_fingerprint(c) for c in new}
    return [g for g in gone if _print(in_table, g) in prints]


def _plausible_new(
    new: list[ChatRecord], gone: list[str], in_table: Container, switch: bool
) -> list[str]:
    """The new chats worth a lookup: all of them in a switch, else the ones that look
    exactly like a vanished chat."""
    if switch:
        return [c.chat_id for c in new]
    prints = {_print(in_table, g) for g in gone} - {None}
    return [c.chat_id for c in new if chat_fingerprint(c) in prints]


def _phones_to_lids(
    out: Switch,
    gone: list[str],
    new_lids: set[str],
    identity: Identity,
    answers: Mapping[str, Answer],
) -> None:
    """Chats that were ``@c.us`` vanished and ``@lid`` chats appeared: ask each vanished
    phone-number id for its lid; a lid that appeared is that chat under its new id."""
    known_lid = {chat for alias, chat in identity.aliases.items() if alias.endswith(LID)}
    for chat in gone:
        if chat in known_lid:
            continue  # its lid is known and not in the list: it really went
        phone = identity.in_use(chat)
        answer = answers.get(phone)
        if answer is None:
            out.to_ask.append(phone)
        elif answer.lid is not None and answer.lid in new_lids:
            new_lids.discard(answer.lid)
            out.links.append((chat, phone, answer.lid))
        elif answer.lid is not None and answer.lid not in identity.aliases:
            out.aliases[answer.lid] = chat


def _lids_to_phones(
    out: Switch,
    gone: list[str],
    new_phones: list[str],
    identity: Identity,
    answers: Mapping[str, Answer],
) -> None:
    """Chats that were ``@lid`` vanished and ``@c.us`` chats appeared: ask each new
    phone-number id for its lid; the vanished chat with that lid is the same chat."""
    gone_set = set(gone)
    owner = {identity.in_use(chat): chat for chat in gone}
    owner.update(
        (alias, chat)
        for alias, chat in identity.aliases.items()
        if chat in gone_set and alias.endswith(LID)
    )
    for phone in new_phones:
        answer = answers.get(phone)
        if answer is None:
            out.to_ask.append(phone)
            continue
        chat = owner.pop(answer.lid, None) if answer.lid is not None else None
        if chat is not None:
            owner = {k: v for k, v in owner.items() if v != chat}
            out.links.append((chat, identity.in_use(chat), phone))
        elif answer.lid is not None and answer.lid not in identity.aliases:
            out.late_aliases[answer.lid] = phone


def _measure(
    out: Switch,
    present: Set[str],
    identity: Identity,
    changes: Collection[IdChange],
    gone: Mapping[str, int],
) -> None:
    """Per form: how many of its present chats changed form in this tick (by a stored
    link) or vanished (``gone``) as chats of the other appeared, and the present person
    chats of both forms."""
    persons = _persons(present, identity)
    moved = {PHONE: 0, LID: 0}
    for c in changes:
        form = _form(c.old_id)
        if form is not None and _form(c.new_id) not in (form, None):
            moved[form] += 1
    for form, n in gone.items():
        moved[form] += n
    out.moving = {form: (moved[form], persons) for form in (PHONE, LID)}


def _persons(present: Set[str], identity: Identity) -> int:
    """How many present chats are people (an ``@c.us`` or ``@lid`` id in use), counted
    by C-level ``str.endswith`` over the chats' own ids, then corrected for the few
    chats whose id in use is another one."""
    forms = (PHONE, LID)
    persons = sum(map(str.endswith, present, repeat(forms)))
    for chat, in_use in identity.current.items():
        if chat in present:
            persons += in_use.endswith(forms) - chat.endswith(forms)
    return persons


def judge_switch(switch: Switch, *, threshold: float, failure: str | None) -> str | None:
    """Why the tick must be held (the anomaly's message), or None to apply it.

    Only a switch is held, while some of its ids are unanswered: until the next ticks have
    asked them (``failure`` is None), or, when no link can be had (``failure`` says why),
    until the operator links or accepts them. Outside a switch, what could not be linked
    in this tick is what it looks like: removals, and new chats.
    """
    if not switch.to_ask or not switch.switch_like(threshold):
        return None
    head = (
        f"chat ids changed form: {switch.vanished} stored chats are missing while "
        f"{switch.appeared} new ones appeared; {len(switch.links)} linked by checkWhatsapp "
        "so far"
    )
    if failure is None:
        return f"{head}, {switch.unresolved} ids still to ask; held until linked"
    return (
        f"{head}, {switch.unresolved} could not be ({failure}); held: link the ids with "
        "`etl ids link` or accept the switch with `etl ids accept`"
    )
