-- The trace context (W3C traceparent/tracestate) the reply was generated in. The sender runs
-- outside any handler; it starts its "whatsapp send" span in this context, so that the send is
-- part of the message's trace (webhook -> conversation -> llm-proxy -> send). NULL: no trace.
ALTER TABLE replies ADD COLUMN IF NOT EXISTS trace_context jsonb;
