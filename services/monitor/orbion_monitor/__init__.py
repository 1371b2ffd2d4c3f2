"""ORBION monitor: OTLP trace aggregation, health roll-up, metrics, dashboard and alerts."""
