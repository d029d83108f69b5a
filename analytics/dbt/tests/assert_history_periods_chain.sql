-- A chat's setting periods never overlap and leave no gap: each closed row ends where the
-- next one starts, runs forwards, and the open row is the latest.
with ordered as (
    select
        chat_key,
        valid_from,
        valid_to,
        lead(valid_from) over (partition by chat_key order by valid_from) as next_from
    from {{ ref('stg_chatsync__ephemeral_history') }}
)
select *
from ordered
where (next_from is not null and (valid_to is null or valid_to <> next_from))
   or (valid_to is not null and valid_to <= valid_from)
   or (next_from is null and valid_to is not null)
