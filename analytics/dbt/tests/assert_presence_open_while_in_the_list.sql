-- A chat has an open presence period exactly while it is in the list (removed_at is null),
-- and its first period starts at its first sighting.
with per_chat as (
    select
        chat_key,
        count(*) filter (where is_current) as open_periods,
        min(valid_from) as first_from
    from {{ ref('stg_chatsync__chat_presence') }}
    group by chat_key
)
select c.chat_key, c.is_present, p.open_periods, c.first_seen_at, p.first_from
from {{ ref('stg_chatsync__chats') }} c
left join per_chat p on p.chat_key = c.chat_key
where p.chat_key is null
   or p.open_periods <> case when c.is_present then 1 else 0 end
   or p.first_from <> c.first_seen_at
