-- llm-proxy tables (search_path = llm_proxy). The event store tables come from orbion_common.

-- One row per reply (idempotency key = reply_key): the generated text, then its send progress.
-- A redelivered ReplyRequested finds its row and neither calls the LLM nor sends again.
CREATE TABLE IF NOT EXISTS replies (
    reply_key            text        PRIMARY KEY,
    seq                  bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,  -- send order per contact
    phone                text        NOT NULL,
    kind                 text        NOT NULL DEFAULT 'reply',             -- reply | verification
    text                 text        NOT NULL,
    parts                text[]      NOT NULL,
    reply_to_message_id  text        NOT NULL DEFAULT '',
    source               text        NOT NULL DEFAULT '',
    correlation_id       text        NOT NULL DEFAULT '',
    causation_id         text        NOT NULL DEFAULT '',
    -- pending: to send; sending: a part's HTTP call may be in flight (see docs/llm-proxy.md);
    -- sent: every part accepted; failed: SendFailed recorded, never retried.
    state                text        NOT NULL DEFAULT 'pending'
                         CHECK (state IN ('pending', 'sending', 'sent', 'failed')),
    parts_sent           integer     NOT NULL DEFAULT 0,
    provider_message_ids text[]      NOT NULL DEFAULT '{}',
    via                  text        NOT NULL DEFAULT '',
    attempts             integer     NOT NULL DEFAULT 0,
    next_attempt_at      timestamptz NOT NULL DEFAULT now(),
    last_error           text        NOT NULL DEFAULT '',
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
-- The sender reads the oldest unsent reply of each contact.
CREATE INDEX IF NOT EXISTS replies_unsent ON replies (phone, seq) WHERE state IN ('pending', 'sending');

-- The local outbox: where replies go when no WhatsApp provider is configured.
CREATE TABLE IF NOT EXISTS outbox (
    provider_message_id  text        PRIMARY KEY,
    reply_key            text        NOT NULL,
    part                 integer     NOT NULL,
    phone                text        NOT NULL,
    text                 text        NOT NULL,
    reply_to_message_id  text        NOT NULL DEFAULT '',
    created_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (reply_key, part)
);
CREATE INDEX IF NOT EXISTS outbox_phone_created ON outbox (phone, created_at DESC);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox (created_at DESC);

-- Leads waiting to be written to Google Sheets: one row per phone, the latest version wins.
CREATE TABLE IF NOT EXISTS sheet_exports (
    phone          text        PRIMARY KEY,
    lead_version   integer     NOT NULL,
    snapshot       jsonb       NOT NULL,
    correlation_id text        NOT NULL DEFAULT '',
    causation_id   text        NOT NULL DEFAULT '',
    queued_at      timestamptz NOT NULL DEFAULT now(),
    attempts       integer     NOT NULL DEFAULT 0
);
-- The highest version already written per phone (an older LeadChanged never overwrites a newer row).
CREATE TABLE IF NOT EXISTS sheet_exported (
    phone        text        PRIMARY KEY,
    lead_version integer     NOT NULL,
    exported_at  timestamptz NOT NULL DEFAULT now()
);
