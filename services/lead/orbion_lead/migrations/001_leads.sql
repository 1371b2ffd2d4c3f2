-- The lead projection: one row per contact, rebuilt from the lead events at any time.
-- ``state`` is the whole domain.Lead as JSON (what the consumers load); the other columns
-- are copies of it that the API filters and sorts on.
CREATE TABLE IF NOT EXISTS leads (
    phone       text PRIMARY KEY,
    version     integer     NOT NULL,
    stage       text        NOT NULL,
    agent       text        NOT NULL,
    status      text        NOT NULL,
    score       integer     NOT NULL,
    qualified   boolean     NOT NULL,
    bot_score   integer     NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    state       jsonb       NOT NULL
);

-- GET /api/leads pages in (updated_at, phone) order; each filter has an index leading with it.
CREATE INDEX IF NOT EXISTS leads_updated_idx ON leads (updated_at, phone);
CREATE INDEX IF NOT EXISTS leads_stage_idx ON leads (stage, updated_at, phone);
CREATE INDEX IF NOT EXISTS leads_agent_idx ON leads (agent, updated_at, phone);
CREATE INDEX IF NOT EXISTS leads_score_idx ON leads (score, updated_at, phone);

-- Pending human-verification deadlines: a durable timer per contact, claimed by one replica
-- at a time (FOR UPDATE SKIP LOCKED), so a restart or a second replica never loses or doubles one.
CREATE TABLE IF NOT EXISTS verification_timers (
    phone   text PRIMARY KEY,
    due_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS verification_timers_due_idx ON verification_timers (due_at);
