-- The lead service's human verification (HumanVerificationRequested/Passed/Failed): while a
-- contact is asked to prove it is human, the agent sends it no LLM replies.
ALTER TABLE conversation_contacts ADD COLUMN IF NOT EXISTS verification_pending boolean NOT NULL DEFAULT false;
-- Passed once: the lead asks a contact once, so a Requested delivered late cannot reopen it.
ALTER TABLE conversation_contacts ADD COLUMN IF NOT EXISTS verified boolean NOT NULL DEFAULT false;
-- Event ids of the inbound messages the lead judged as answers (the causation of Passed/Failed),
-- newest last, a few: an answer redelivered after its verdict still gets no reply.
ALTER TABLE conversation_contacts
    ADD COLUMN IF NOT EXISTS verification_answer_ids text[] NOT NULL DEFAULT '{}';
