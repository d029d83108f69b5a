-- A chat's presence periods never overlap and never run backwards; only the latest can be
-- open.
with ordered as (
    select
        chat_key,
        valid_from,
        valid_to,
        lead(valid_from) over (
            partition by chat_key order by valid_from, presence_id
        ) as next_from
    from {{ ref('stg_chatsync__chat_presence') }}
)
select *
from ordered
where (next_from is not null and (valid_to is null or valid_to > next_from))
   or (valid_to is not null and valid_to < valid_from)
