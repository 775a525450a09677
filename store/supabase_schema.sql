-- The bot's tables in Supabase (Postgres), the same columns and keys as the
-- embedded SQLite store (store.py SCHEMA; SPEC section 2).
--
-- Apply once per project, before starting the bot with SUPABASE_URL and
-- SUPABASE_KEY: paste this file into the Supabase dashboard's SQL editor and
-- run it, or
--     psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f store/supabase_schema.sql
-- (the connection string is under Project Settings > Database). Every
-- statement is "if not exists": running it again changes nothing.
--
-- The bot writes with the service-role key, which bypasses row-level
-- security; RLS is enabled with no policies so the public anon key can
-- neither read nor write these tables.
--
-- Types follow what the store sends: unix seconds as bigint (candle open
-- time) or double precision (event times, updated_at), prices and volumes as
-- double precision, the snapshot as jsonb.

create table if not exists public.ohlcv_candles (
    pair text not null,
    interval_min integer not null,
    time bigint not null,
    open double precision not null,
    high double precision not null,
    low double precision not null,
    close double precision not null,
    volume double precision not null,
    trade_count integer not null default 0,
    primary key (pair, interval_min, time)
);

create table if not exists public.bot_state (
    key text primary key,
    data jsonb not null,
    updated_at double precision not null
);

create table if not exists public.regime_tier_transitions (
    id bigint generated always as identity primary key,
    ts double precision not null,
    pair text not null,
    from_tier integer not null,
    to_tier integer not null,
    from_direction text not null,
    to_direction text not null,
    reason text not null,
    regime text,
    raw_confidence double precision,
    effective_confidence double precision,
    bias_signal double precision,
    shadow integer not null default 0
);

-- One transition per pair and time, so a retried write cannot record it twice.
-- (A project set up before this rule: duplicates are dropped, the old index replaced.)
delete from public.regime_tier_transitions a
    using public.regime_tier_transitions b
    where a.pair = b.pair and a.ts = b.ts and a.id > b.id;
drop index if exists public.regime_tier_transitions_pair_ts;
create unique index if not exists regime_tier_transitions_pair_ts_key
    on public.regime_tier_transitions (pair, ts);

create table if not exists public.ai_regime_opinions (
    pair text not null,
    ts double precision not null,
    panelist text not null,
    model text,
    mechanical_tier integer not null,
    mechanical_direction text not null,
    ai_tier integer not null,
    ai_direction text not null,
    conviction integer not null,
    agreement text not null,
    rationale text not null,
    watch_for text not null,
    latency_sec double precision,
    price double precision,
    price_after double precision,
    hit integer,
    primary key (pair, ts)
);

create table if not exists public.fills (
    pair text not null,
    order_id text not null,
    ts double precision not null,
    exchange text not null,
    slot integer not null,
    leg text not null,
    role text not null,
    side text not null,
    price double precision not null,
    volume double precision not null,
    fee double precision not null,
    regime_at_entry text not null,
    tier_at_entry integer not null,
    cycle_net double precision,
    primary key (pair, order_id)
);

create index if not exists fills_pair_ts on public.fills (pair, ts);

-- One bot per pair (README "Persistence and restart"): the running bot holds a lease row
-- here, renewed every 30 s and valid for 90 s; a second bot on the project is refused
-- while it is valid, and a crashed holder's lease simply runs out.
create table if not exists public.bot_leases (
    pair text primary key,
    holder text not null,
    host text not null,
    store text not null,
    pid integer not null,
    port integer,
    acquired_at double precision not null,
    expires_at double precision not null
);

-- Row-level security on, no policies: only the service-role key gets through.
-- (Enabling it again is harmless.)
alter table public.ohlcv_candles enable row level security;
alter table public.bot_state enable row level security;
alter table public.regime_tier_transitions enable row level security;
alter table public.ai_regime_opinions enable row level security;
alter table public.fills enable row level security;
alter table public.bot_leases enable row level security;
