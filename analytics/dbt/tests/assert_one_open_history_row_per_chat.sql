-- Every WhatsApp chat has exactly one open (current) ephemeral history row; Telegram and
-- MAX chats have no disappearing-messages setting and no history rows at all.
select
    c.chat_key,
    c.platform,
    count(h.history_id) as history_rows,
    count(h.history_id) filter (where h.is_current) as open_rows
from {{ ref('stg_chatsync__chats') }} c
left join {{ ref('stg_chatsync__ephemeral_history') }} h on h.chat_key = c.chat_key
group by c.chat_key, c.platform
having (c.platform = 'whatsapp' and count(h.history_id) filter (where h.is_current) <> 1)
    or (c.platform <> 'whatsapp' and count(h.history_id) <> 0)
