-- One row per chat ever seen; chat_key identifies it across the models.
select
    cast(instance_id as text) || ':' || chat_id as chat_key,
    instance_id,
    chat_id,
    chat_type,
    name,
    archived,
    ephemeral_expiration,
    ephemeral_setting_at,
    first_seen_at,
    updated_at,
    removed_at,
    removed_at is null as is_present,
    change_seq
from {{ source('chatsync', 'chats') }}
