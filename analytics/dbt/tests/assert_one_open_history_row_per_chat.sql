-- Every chat has exactly one open (current) ephemeral history row.
select c.chat_key, count(h.history_id) filter (where h.is_current) as open_rows
from {{ ref('stg_chatsync__chats') }} c
left join {{ ref('stg_chatsync__ephemeral_history') }} h on h.chat_key = c.chat_key
group by c.chat_key
having count(h.history_id) filter (where h.is_current) <> 1
