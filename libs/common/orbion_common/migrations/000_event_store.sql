-- The event store of one service, created in that service's schema (search_path is set to it).
-- Append-only: rows are never updated or deleted.
CREATE TABLE IF NOT EXISTS events (
    position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id       text        NOT NULL UNIQUE,
    stream_id      text        NOT NULL,
    version        integer     NOT NULL,
    type           text        NOT NULL,
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    -- The writing transaction: readers that follow the log only read below the oldest running
    -- transaction, so an event that commits late is never skipped (see EventStore.read_after).
    tx_id          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    body           jsonb       NOT NULL,
    -- W3C trace context of the transaction that appended the event, so the relay publishes it
    -- inside the same trace and one message stays one trace across services.
    trace_context  jsonb,
    UNIQUE (stream_id, version)
);
CREATE INDEX IF NOT EXISTS events_tx_position ON events (tx_id, position);

-- How far each follower (relay, projection) has read, written in the follower's own transaction.
CREATE TABLE IF NOT EXISTS checkpoints (
    name       text        PRIMARY KEY,
    tx_id      xid8        NOT NULL DEFAULT '0',
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Events a consumer has already handled: inserted in the handler's transaction, so a redelivery
-- after a crash finds the mark (or finds nothing, and nothing was committed either).
CREATE TABLE IF NOT EXISTS processed (
    consumer     text        NOT NULL,
    event_id     text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
