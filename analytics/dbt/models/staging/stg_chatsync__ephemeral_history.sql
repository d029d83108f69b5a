-- The SCD2 history of each chat's disappearing-messages setting.
select
    id as history_id,
    cast(instance_id as text) || ':' || chat_id as chat_key,
    instance_id,
    chat_id,
    ephemeral_expiration,
    case ephemeral_expiration
        when 0 then 'off'
        when 86400 then '24 hours'
        when 604800 then '7 days'
        when 7776000 then '90 days'
        else cast(ephemeral_expiration as text) || ' seconds'
    end as ephemeral_setting,
    ephemeral_setting_at,
    valid_from,
    valid_to,
    valid_to is null as is_current,
    sync_run_id,
    change_seq
from {{ source('chatsync', 'chat_ephemeral_history') }}
