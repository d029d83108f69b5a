-- When each chat was in its instance's list; the gaps between a chat's rows are absences.
select
    id as presence_id,
    cast(instance_id as text) || ':' || chat_id as chat_key,
    instance_id,
    chat_id,
    valid_from,
    valid_to,
    valid_to is null as is_current,
    sync_run_id,
    change_seq
from {{ source('chatsync', 'chat_presence') }}
