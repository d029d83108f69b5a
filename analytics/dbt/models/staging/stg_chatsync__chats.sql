-- One row per chat ever seen; chat_key identifies it across the models. chat_id is the
-- id the chat was first stored under (its identity), current_chat_id the id the API uses
-- now (the same until the id changes, e.g. @c.us to @lid), platform its instance's
-- messenger (whatsapp, telegram, max).
select
    cast(c.instance_id as text) || ':' || c.chat_id as chat_key,
    c.instance_id,
    c.chat_id,
    coalesce(c.current_chat_id, c.chat_id) as current_chat_id,
    i.platform,
    c.chat_type,
    c.name,
    c.archived,
    c.ephemeral_expiration,
    c.ephemeral_setting_at,
    c.first_seen_at,
    c.updated_at,
    c.removed_at,
    c.removed_at is null as is_present,
    c.change_seq
from {{ source('chatsync', 'chats') }} c
join {{ source('chatsync', 'instances') }} i on i.id_instance = c.instance_id
