"""Reports of a load run: one JSON object per step, a Markdown report, PNG plots.

Owns the file layout under the results folder (git-ignored)::

    results/loadtest-<UTC time>/steps.jsonl   one JSON object per step, as measured
                               summary.json  the run: machine, settings, sustainable rate
                               report.md     the tables docs/performance.md is made of
                               throughput.png  achieved vs offered rate
                               latency.png     percentiles vs offered rate

Plots need matplotlib (Agg backend, no display); without it the report says so and the
rest is written. Measuring is runner.py's job; this module only formats.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import psutil


def python_speed(steps: int = 1_000_000, tries: int = 3) -> float:
    """Million steps per second of a plain Python loop on one core (best of ``tries``).

    Machines of the same CPU name differ by 2x and more (shared cores, older hosts); this
    figure, printed with every report, says which runs can be compared.
    """
    best = float("inf")
    for _ in range(tries):
        started = time.perf_counter()
        total = 0
        for i in range(steps):
            total += i
        best = min(best, time.perf_counter() - started)
    return round(steps / best / 1e6, 1)


def machine() -> dict[str, Any]:
    """The machine a run happened on: CPU, cores, memory, OS, Python, commit, one core's speed."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "python_mloops_per_s": python_speed(),
        "commit": commit,
        "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def new_folder(results: Path, kind: str) -> Path:
    folder = results / f"{kind}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def append_step(folder: Path, step: Mapping[str, Any]) -> None:
    with (folder / "steps.jsonl").open("ab") as f:
        f.write(orjson.dumps(step) + b"\n")


def _ms(summary: Mapping[str, Any] | None, key: str) -> str:
    if not summary or summary.get(key) is None:
        return "–"
    value = float(summary[key])
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _ratio(cache: Mapping[str, Any], name: str) -> str:
    c = cache.get(name) or {}
    r = c.get("hit_ratio")
    return "–" if r is None else f"{r:.0%}"


def _rate(r: float) -> str:
    return f"{r:g}" if r >= 1 else f"{r:.2f}"


def _backlog(backlog: Mapping[str, int] | None) -> str:
    if backlog is None:
        return "–"
    left = [f"{name} {n}" for name, n in sorted(backlog.items()) if n]
    return ", ".join(left) or "none"


def sustainable(steps: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The highest-rate step that held its SLO before the first one that broke it."""
    best = None
    for s in sorted(steps, key=lambda s: s["offered_rate"]):
        if not s["slo"]["holds"]:
            break
        best = s
    return best


def markdown(meta: Mapping[str, Any], steps: Sequence[Mapping[str, Any]], plots: Sequence[str]) -> str:
    m = meta["machine"]
    steps = sorted(steps, key=lambda s: s["offered_rate"])  # a refined ladder runs some steps out of order
    lines = [
        f"# ORBION load test: {meta['mode']}",
        "",
        f"Run {m['at']} on {m['cpu']} ({m['cores']} cores, {m['memory_gb']} GB), {m['os']}, Python "
        f"{m['python']}, commit `{m['commit'] or '?'}`. Everything on this machine: the five services, NATS, "
        "Postgres, Redis, the fakes and the load generator. One core's speed: "
        f"{m.get('python_mloops_per_s', '?')} million Python loop steps a second (compare runs only "
        "on machines that agree).",
        "",
        f"SLO per step: pipeline p99 ≤ {meta['slo']['p99_ms']:.0f} ms (end-to-end minus the fake LLM's own "
        f"time and the {meta['quiet_period_s']:g} s quiet period), errors ≤ {meta['slo']['error_rate']:.1%}, "
        "and zero lost messages, duplicate sends and replies to opted-out contacts.",
        "",
    ]
    best = sustainable(steps)
    if meta["mode"] == "ladder":
        if best is None:
            lines.append("**Sustainable rate: none of the steps held the SLO.**")
        else:
            lines.append(
                f"**Sustainable rate: {_rate(best['offered_rate'])} msg/s "
                f"({best['offered_per_minute']:g} msg/min)**, the last step that held the SLO."
            )
        lines.append("")
    lines += [
        "| step | offered msg/s | sent | acked/s | replies/s | errors | ack p50 / p99 ms "
        "| e2e p50 / p99 ms | pipeline p50 / p99 ms | LLM p50 ms | lost | dup sends "
        "| history / LLM cache hits | max RSS MB | SLO |",
        "|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|---|---:|---|",
    ]
    for s in steps:
        services = {k: v for k, v in s["resources"].items() if k != "loadgen"}
        rss = max((v.get("rss_peak_mb") or 0 for v in services.values()), default=0)
        slo = "holds" if s["slo"]["holds"] else "**breaks**: " + "; ".join(s["slo"]["reasons"])
        if s.get("first_attempt"):
            slo += " (first attempt broke: " + "; ".join(s["first_attempt"]["reasons"]) + ")"
        lines.append(
            f"| {s['step']} | {_rate(s['offered_rate'])} | {s['sent']} "
            f"| {s['ack_rate']:g} | {s['reply_rate']:g} "
            f"| {s['error_rate']:.2%} | {_ms(s['ack_ms'], 'p50')} / {_ms(s['ack_ms'], 'p99')} "
            f"| {_ms(s['e2e_ms'], 'p50')} / {_ms(s['e2e_ms'], 'p99')} "
            f"| {_ms(s['pipeline_ms'], 'p50')} / {_ms(s['pipeline_ms'], 'p99')} | {_ms(s['llm_ms'], 'p50')} "
            f"| {s['lost']} | {s['duplicate_sends']} "
            f"| {_ratio(s['cache'], 'conversation_history')} / {_ratio(s['cache'], 'llm_response')} "
            f"| {rss:g} | {slo} |"
        )
    lines += ["", "## Resources per service (peak RSS MB / average CPU % of one core)", ""]
    names = [n for n in (steps[0]["resources"] if steps else {}) if n != "loadgen"]
    lines.append("| step | " + " | ".join(names) + " | machine load avg (start, end) |")
    lines.append("|---|" + "---|" * (len(names) + 1))
    for s in steps:
        cells = []
        for n in names:
            r = s["resources"].get(n, {})
            cpu = r.get("cpu_percent")
            cells.append(f"{r.get('rss_peak_mb') or '–'} / {'–' if cpu is None else cpu}")
        load = s.get("load_avg_1m") or ["–", "–"]
        lines.append(f"| {s['step']} | " + " | ".join(cells) + f" | {load[0]}, {load[1]} |")
    lines += ["", "## Correctness per step", ""]
    lines.append(
        "| step | due replies | covered | lost | duplicate sends | unwanted | throttled | dup webhooks "
        "| verification asked | missing in history (sampled) | reply sources | waited before s | drain s "
        "| backlog after drain |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---|")
    for s in steps:
        h = s.get("missing_in_history") or {}
        lines.append(
            f"| {s['step']} | {s['replies_due']} | {s['replies_covered']} | {s['lost']} "
            f"| {s['duplicate_sends']} "
            f"| {s['unwanted_replies']} | {s['throttled']} | {s['duplicate_webhooks_acked']} "
            f"| {s['verification_questions']} "
            f"| {h.get('missing', 0)} of {h.get('checked_contacts', 0)} contacts "
            f"| {', '.join(f'{k} {v}' for k, v in sorted(s['reply_sources'].items()))} "
            f"| {s.get('waited_for_backlog_s', '–')} | {s.get('drain_seconds', '–')} "
            f"| {_backlog(s.get('backlog_after_drain'))} |"
        )
    staged = [s for s in steps if (s.get("stages_ms") or {}).get("replies")]
    if staged:
        from .runner import SPLIT_NAMES, STAGE_NAMES

        stage_names = {**STAGE_NAMES, **SPLIT_NAMES}
        lines += ["", "## Where the time goes (event-store and JetStream clocks, p50 / p99 ms per reply)", ""]
        lines.append("| step | replies | " + " | ".join(stage_names) + " |")
        lines.append("|---|---:|" + "---|" * len(stage_names))
        for s in staged:
            st = s["stages_ms"]
            cells = [f"{_ms(st.get(k), 'p50')} / {_ms(st.get(k), 'p99')}" for k in stage_names]
            lines.append(f"| {s['step']} | {st['replies']} | " + " | ".join(cells) + " |")
        lines += [""] + [f"- **{k}**: {v}" for k, v in stage_names.items()]
    for s in steps:
        if len(s.get("timeline") or []) >= 6:  # long steps (a soak): is the latency stable over time?
            lines += [
                "",
                f"## Timeline of {s['step']} (pipeline ms of the replies to messages sent then)",
                "",
                "| from s | replies | p50 | p99 |",
                "|---:|---:|---:|---:|",
            ]
            lines += [
                f"| {b['from_s']:g} | {b['replies']} | {_ms(b, 'p50')} | {_ms(b, 'p99')} |"
                for b in s["timeline"]
            ]
    phased = [s for s in steps if s.get("phases")]
    for s in phased:
        lines += [
            "",
            f"## Phases of {s['step']}",
            "",
            "| phase | sent | errors | lost | dup sends | ack p99 ms | e2e p50 / p99 ms | pipeline p99 ms |",
            "|---|---:|---:|---:|---:|---:|---|---:|",
        ]
        for phase, f in s["phases"].items():
            lines.append(
                f"| {phase} | {f['sent']} | {f['errors']} | {f['lost']} | {f['duplicate_sends']} "
                f"| {_ms(f['ack_ms'], 'p99')} | {_ms(f['e2e_ms'], 'p50')} / {_ms(f['e2e_ms'], 'p99')} "
                f"| {_ms(f['pipeline_ms'], 'p99')} |"
            )
    lines += ["", "## Settings changed for the run", ""]
    lines += [f"- `{k}` = `{v}`" for k, v in sorted(meta.get("settings", {}).items())]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    else:
        lines += ["", "(no plots: matplotlib is not installed)"]
    return "\n".join(lines) + "\n"


def plot(folder: Path, steps: Sequence[Mapping[str, Any]]) -> list[str]:
    """throughput.png and latency.png; returns the file names written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ordered = sorted(steps, key=lambda s: s["offered_rate"])
    if not ordered:
        return []
    x = [s["offered_rate"] for s in ordered]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, x, "k:", label="offered")
    ax.plot(x, [s["ack_rate"] for s in ordered], "o-", label="acked by the gateway")
    ax.plot(x, [s["reply_rate"] for s in ordered], "s-", label="replies at WhatsApp")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (msg/s)")
    ax.set_ylabel("achieved (msg/s)")
    ax.set_title("Throughput vs offered load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "throughput.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (
        ("p50", "pipeline p50", "o-"),
        ("p90", "pipeline p90", "^-"),
        ("p99", "pipeline p99", "s-"),
    ):
        ax.plot(x, [s["pipeline_ms"][key] or float("nan") for s in ordered], style, label=label)
    ax.plot(x, [s["ack_ms"]["p99"] or float("nan") for s in ordered], "x--", label="gateway ack p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (msg/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency percentiles vs offered load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "latency.png", dpi=110)
    plt.close(fig)
    return ["throughput.png", "latency.png"]


def write(folder: Path, meta: Mapping[str, Any], steps: Sequence[Mapping[str, Any]]) -> Path:
    """summary.json, plots and report.md for the steps so far; returns the report's path."""
    best = sustainable(steps)
    summary = {**meta, "sustainable_rate": best["offered_rate"] if best else None, "steps": len(steps)}
    (folder / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    plots = plot(folder, steps)
    path = folder / "report.md"
    path.write_text(markdown(meta, steps, plots), encoding="utf-8")
    return path
