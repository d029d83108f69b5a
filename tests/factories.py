"""Small builders for getChats payloads and database reads used across tests."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text

SEED_EXAMPLE: list[dict[str, Any]] = [
    {
        "archive": False,
        "id": "79876543210@c.us",
        "ephemeralExpiration": 86400,
        "ephemeralSettingTimestamp": 1777870423,
        "name": "John Doe",
        "type": "user",
    },
    {
        "archive": False,
        "id": "79001234567@c.us",
        "ephemeralExpiration": 0,
        "ephemeralSettingTimestamp": 0,
        "name": "Jane Doe",
        "type": "user",
    },
    {
        "archive": False,
        "id": "79001234567-1479621234@g.us",
        "ephemeralExpiration": 0,
        "ephemeralSettingTimestamp": 0,
        "name": "My Group",
        "type": "group",
    },
]


def chat(
    chat_id: str,
    *,
    name: str = "Someone",
    kind: str = "user",
    archive: bool = False,
    expiration: int = 0,
    stamp: int = 0,
) -> dict[str, Any]:
    return {
        "archive": archive,
        "id": chat_id,
        "ephemeralExpiration": expiration,
        "ephemeralSettingTimestamp": stamp,
        "name": name,
        "type": kind,
    }


def chats_list(n: int, *, prefix: str = "7900") -> list[dict[str, Any]]:
    return [chat(f"{prefix}{i:07d}@c.us", name=f"Chat {i}") for i in range(n)]


def rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params))


def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def table_counts(engine: Engine) -> dict[str, int]:
    return {
        t: scalar(engine, f"SELECT COUNT(*) FROM {t}")
        for t in ("chats", "chat_ephemeral_history", "sync_runs", "instances")
    }


def chat_row(engine: Engine, instance_id: int, chat_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT * FROM chats WHERE instance_id = :i AND chat_id = :c"),
            {"i": instance_id, "c": chat_id},
        ).one()


def history(engine: Engine, instance_id: int, chat_id: str) -> list[Any]:
    return rows(
        engine,
        "SELECT * FROM chat_ephemeral_history WHERE instance_id = :i AND chat_id = :c "
        "ORDER BY valid_from",
        i=instance_id,
        c=chat_id,
    )


def check_history_invariants(engine: Engine) -> None:
    """One open row per WhatsApp chat (Telegram and MAX chats have no history); closed rows
    chain exactly; open row equals the chat's setting."""
    all_rows = rows(
        engine,
        "SELECT instance_id, chat_id, ephemeral_expiration, ephemeral_setting_at, "
        "valid_from, valid_to FROM chat_ephemeral_history "
        "ORDER BY instance_id, chat_id, valid_from",
    )
    chats = {
        (r.instance_id, r.chat_id): r
        for r in rows(
            engine,
            "SELECT c.instance_id, c.chat_id, c.ephemeral_expiration, c.ephemeral_setting_at "
            "FROM chats c JOIN instances i ON i.id_instance = c.instance_id "
            "WHERE i.platform = 'whatsapp'",
        )
    }
    by_chat: dict[tuple[int, str], list[Any]] = {}
    for r in all_rows:
        by_chat.setdefault((r.instance_id, r.chat_id), []).append(r)
    assert set(by_chat) == set(chats), "every WhatsApp chat has history, and only they do"
    for key, hist in by_chat.items():
        open_rows = [r for r in hist if r.valid_to is None]
        assert len(open_rows) == 1, f"{key}: {len(open_rows)} open rows"
        assert hist[-1].valid_to is None, f"{key}: the open row is not the latest"
        for prev, nxt in zip(hist, hist[1:], strict=False):
            assert prev.valid_to == nxt.valid_from, f"{key}: gap or overlap"
            assert prev.valid_from < prev.valid_to, f"{key}: interval goes backwards"
        current = chats[key]
        assert hist[-1].ephemeral_expiration == current.ephemeral_expiration
        assert hist[-1].ephemeral_setting_at == current.ephemeral_setting_at
    check_presence_invariants(engine)


def check_presence_invariants(engine: Engine) -> None:
    """Every chat has presence periods: the first from its first sighting, in order, never
    overlapping; an open one exactly while it is not removed, else the last ends at its
    removal."""
    periods: dict[tuple[int, str], list[Any]] = {}
    for r in rows(
        engine,
        "SELECT instance_id, chat_id, valid_from, valid_to FROM chat_presence "
        "ORDER BY instance_id, chat_id, valid_from, id",
    ):
        periods.setdefault((r.instance_id, r.chat_id), []).append(r)
    chats = {
        (r.instance_id, r.chat_id): r
        for r in rows(engine, "SELECT instance_id, chat_id, first_seen_at, removed_at FROM chats")
    }
    assert set(periods) == set(chats), "every chat has presence, and only chats do"
    for key, chat in chats.items():
        got = periods[key]
        assert got[0].valid_from == chat.first_seen_at, f"{key}: first period"
        for prev, nxt in zip(got, got[1:], strict=False):
            assert prev.valid_to is not None, f"{key}: an open period before another"
            assert prev.valid_to <= nxt.valid_from, f"{key}: periods overlap"
        for p in got:
            assert p.valid_to is None or p.valid_to >= p.valid_from, f"{key}: backwards"
        assert (got[-1].valid_to is None) == (chat.removed_at is None), f"{key}: open period"
        if chat.removed_at is not None:
            assert got[-1].valid_to == chat.removed_at, f"{key}: ends at its removal"
