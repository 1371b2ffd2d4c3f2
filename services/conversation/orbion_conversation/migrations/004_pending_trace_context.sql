-- The trace of the inbound message that last extended a contact's burst: the scheduler appends
-- the burst's ReplyRequested in it, so that the reply continues the message's trace (and its
-- sampling decision) instead of starting one of its own.
ALTER TABLE pending_replies ADD COLUMN IF NOT EXISTS trace_context text;
