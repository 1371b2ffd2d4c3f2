-- The conversation's order of a contact's replies (docs/llm-proxy.md, "Order"). The sender sends
-- a contact's replies by requested_at (the ReplyRequested's occurred_at: the conversation appends
-- a contact's requests one after the other, each created after the previous one committed), not
-- by arrival (seq): after a crash the request in flight comes back only after ack_wait, while the
-- contact's later ones arrive at once. previous_reply_key (ReplyRequested.previous_reply_key, '' when
-- unknown) is the contact's previous request: a reply whose previous one is not stored yet is held
-- for at most sender_order_hold_seconds.
ALTER TABLE replies ADD COLUMN IF NOT EXISTS requested_at timestamptz;
UPDATE replies SET requested_at = created_at WHERE requested_at IS NULL;
ALTER TABLE replies ALTER COLUMN requested_at SET DEFAULT now();
ALTER TABLE replies ALTER COLUMN requested_at SET NOT NULL;
ALTER TABLE replies ADD COLUMN IF NOT EXISTS previous_reply_key text NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS replies_unsent_order ON replies (phone, requested_at, seq)
    WHERE state IN ('pending', 'sending');
