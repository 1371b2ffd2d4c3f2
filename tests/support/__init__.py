"""Shared test support: real NATS, PostgreSQL and Redis for pytest sessions (see ``servers``)."""
