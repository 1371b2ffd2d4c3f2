"""ORBION llm-proxy: the only service that talks to OpenAI, the WhatsApp send API and Google Sheets."""
