"""The monitor's settings: windows, caps, poll targets, thresholds and alerting (prefix ``ORBION_``).

Only the monitor reads these; every field name starts with ``monitor_`` so no other service's
variable can clash. Common variables (URLs, ports, stream name) come from ``CommonSettings``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from orbion_common.settings import SERVICES, CommonSettings


class Settings(CommonSettings):
    """Monitor settings; see docs/monitoring.md."""

    monitor_targets: dict[str, str] | None = Field(
        None,
        description="Base URLs of the services to poll, as a JSON object {name: url} ({} polls none); "
        "unset: every service except the monitor at its configured host and port.",
    )
    monitor_poll_interval_seconds: float = Field(
        5.0,
        description="How often the monitor polls /readyz, /metrics, Postgres, NATS and Redis, "
        "then evaluates the alert rules.",
    )
    monitor_check_timeout_seconds: float = Field(
        1.5, description="Timeout of each health probe and scrape (kept short: the roll-up never hangs)."
    )
    monitor_window_seconds: int = Field(
        10, ge=1, description="Width of one aggregation window (time series resolution)."
    )
    monitor_windows: int = Field(
        90, ge=1, description="Windows kept for the time series (90 x 10 s = 15 min)."
    )
    monitor_recent_seconds: int = Field(
        60, ge=1, description="Span of the 'current' figures (percentiles, error ratio, messages/min)."
    )
    monitor_max_operations: int = Field(
        256, description="Cap on distinct (service, operation) pairs; more are counted under '_other'."
    )
    monitor_max_traces: int = Field(
        2000, description="Traces kept in memory for stage breakdowns and /api/traces/{id}."
    )
    monitor_max_spans_per_trace: int = Field(128, description="Spans kept per trace (the rest are counted).")
    monitor_max_body_bytes: int = Field(
        16 * 1024 * 1024, description="Largest OTLP request body accepted (413 above)."
    )
    monitor_memory_threshold_percent: float = Field(
        90.0, description="Host memory use above which health is degraded."
    )
    monitor_disk_threshold_percent: float = Field(
        90.0, description="Disk use (of the data folder's file system) above which health is degraded."
    )
    monitor_consumer_lag_threshold: int = Field(
        1000, description="Pending messages of a JetStream consumer above which health is degraded."
    )
    monitor_alert_rules_file: Path | None = Field(
        None,
        description="TOML file of alert rules; empty: the packaged defaults (orbion_monitor/alerts.toml).",
    )
    monitor_alert_webhook_url: str = Field(
        "", description="URL that receives firing and resolved alerts as JSON POSTs; empty: none."
    )

    def targets(self) -> dict[str, str]:
        """The services to poll: ``{name: base_url}``."""
        if self.monitor_targets is not None:
            return {name: url.rstrip("/") for name, url in self.monitor_targets.items()}
        return {name: self.service_url(name) for name in SERVICES if name != "monitor"}
