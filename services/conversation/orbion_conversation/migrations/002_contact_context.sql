-- What the llm-proxy's prompt wants to know about a contact: the lead's BANT stage (from the
-- lead service's BantStageAdvanced) and the language the LLM detected (from ReplyGenerated).
ALTER TABLE conversation_contacts ADD COLUMN IF NOT EXISTS lead_stage text NOT NULL DEFAULT '';
ALTER TABLE conversation_contacts ADD COLUMN IF NOT EXISTS language text NOT NULL DEFAULT '';
