-- The other ids a chat is known by: alias_key names one chat (chat_key) of its instance.
select
    cast(instance_id as text) || ':' || alias_id as alias_key,
    cast(instance_id as text) || ':' || chat_id as chat_key,
    instance_id,
    alias_id,
    chat_id,
    source,
    linked_at,
    change_seq
from {{ source('chatsync', 'chat_aliases') }}
