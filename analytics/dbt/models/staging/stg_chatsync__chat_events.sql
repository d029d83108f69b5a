-- What happened to each chat, one row per change.
select
    id as event_id,
    cast(instance_id as text) || ':' || chat_id as chat_key,
    instance_id,
    chat_id,
    event_type,
    old_value,
    new_value,
    occurred_at,
    sync_run_id,
    change_seq
from {{ source('chatsync', 'chat_events') }}
