"""ORBION gateway: WhatsApp webhooks in, verified, rate limited and published as events."""
