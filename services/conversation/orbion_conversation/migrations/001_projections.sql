-- Read models of the conversation service (schema "conversation"; search_path is set to it).
-- Projections can be dropped and rebuilt from the event store (`orbion rebuild conversation`);
-- pending_replies is a work queue, not a projection, and is never rebuilt.

-- Every message, in and out. Inbound rows are keyed by the provider message id (a webhook
-- retried days later finds its row); outbound replies by their reply key until sent.
CREATE TABLE IF NOT EXISTS conversation_messages (
    message_key          text        PRIMARY KEY,
    phone                text        NOT NULL,
    direction            text        NOT NULL CHECK (direction IN ('in', 'out')),
    kind                 text        NOT NULL,
    text                 text        NOT NULL DEFAULT '',
    status               text        NOT NULL,
    status_at            timestamptz,
    error                text        NOT NULL DEFAULT '',
    created_at           timestamptz NOT NULL,
    -- event-store position of the event that created the row: orders same-second messages
    position             bigint      NOT NULL,
    provider_message_id  text        UNIQUE,
    reply_key            text        NOT NULL DEFAULT ''
);
-- The plan's history index: newest messages of one contact, without a sort.
CREATE INDEX IF NOT EXISTS conversation_messages_phone_created
    ON conversation_messages (phone, created_at DESC, position DESC);

-- Extra provider ids of a reply sent in several parts, so their statuses find the reply.
CREATE TABLE IF NOT EXISTS conversation_message_parts (
    provider_message_id  text PRIMARY KEY,
    message_key          text NOT NULL
);

-- A status that arrived before its message (WhatsApp does not order webhooks); applied when
-- the message is projected.
CREATE TABLE IF NOT EXISTS conversation_early_statuses (
    provider_message_id  text        PRIMARY KEY,
    status               text        NOT NULL,
    status_at            timestamptz NOT NULL,
    error                text        NOT NULL DEFAULT ''
);

-- One row per contact: counters, activity times (the 24 h window is computed from
-- last_inbound_at), who must not get replies, and the stream version the row reflects
-- (the cache version of the contact's history).
CREATE TABLE IF NOT EXISTS conversation_contacts (
    phone             text        PRIMARY KEY,
    profile_name      text        NOT NULL DEFAULT '',
    message_count     integer     NOT NULL DEFAULT 0,
    inbound_count     integer     NOT NULL DEFAULT 0,
    outbound_count    integer     NOT NULL DEFAULT 0,
    first_message_at  timestamptz,
    last_inbound_at   timestamptz,
    last_outbound_at  timestamptz,
    last_activity_at  timestamptz,
    opted_out         boolean     NOT NULL DEFAULT false,
    blocked           boolean     NOT NULL DEFAULT false,
    handed_off        boolean     NOT NULL DEFAULT false,
    version           integer     NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS conversation_contacts_activity
    ON conversation_contacts (last_activity_at DESC, phone DESC);

-- Replies waiting for their quiet period: one row per contact, written in the inbound
-- message's transaction and deleted in the one that appends ReplyRequested, so a crash in
-- between neither loses nor doubles the reply.
CREATE TABLE IF NOT EXISTS pending_replies (
    phone           text        PRIMARY KEY,
    inbound_ids     text[]      NOT NULL,
    due_at          timestamptz NOT NULL,
    correlation_id  text        NOT NULL DEFAULT '',
    causation_id    text        NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS pending_replies_due ON pending_replies (due_at);
