"""Local infrastructure from pip binaries: real servers that answer, keep data, and stop cleanly."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg
import nats
import psutil
import pytest
import redis.asyncio as aioredis

from orbion_common.infra import (
    SERVER_NAMES,
    InfraError,
    LocalInfra,
    port_is_free,
    read_state,
    resolve_urls,
    running_local_urls,
)
from orbion_common.settings import CommonSettings
from tests.support.servers import reap_stale_test_folders


async def _jetstream_account(url: str) -> int:
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        info = await nc.jetstream().account_info()
        return int(info.limits.max_streams)
    finally:
        await nc.close()


async def test_every_local_server_answers_a_real_request(local_infra: LocalInfra) -> None:
    conn = await asyncpg.connect(local_infra.url("postgres"))
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_database()") == "orbion"
    finally:
        await conn.close()
    client = aioredis.from_url(local_infra.url("redis"))
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()
    assert isinstance(await _jetstream_account(local_infra.url("nats")), int)


@pytest.mark.parametrize("crash", [False, True], ids=["clean-restart", "sigkill-restart"])
async def test_a_restarted_postgres_keeps_committed_rows(
    local_infra: LocalInfra, unique: str, crash: bool
) -> None:
    url = local_infra.url("postgres")
    table = f"t_{unique}"
    conn = await asyncpg.connect(url)
    await conn.execute(f"CREATE TABLE {table} (v text)")
    await conn.execute(f"INSERT INTO {table} VALUES ('kept')")
    await conn.close()
    port_before = local_infra.ports["postgres"]

    await local_infra.arestart_server("postgres", kill=crash)

    assert local_infra.ports["postgres"] == port_before
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval(f"SELECT v FROM {table}") == "kept"
    finally:
        await conn.execute(f"DROP TABLE {table}")
        await conn.close()


async def test_a_restarted_redis_keeps_its_keys(local_infra: LocalInfra, unique: str) -> None:
    url = local_infra.url("redis")
    client = aioredis.from_url(url)
    await client.set(f"test:{unique}", "kept")
    await client.aclose()

    await local_infra.arestart_server("redis")

    client = aioredis.from_url(url)
    try:
        assert await client.get(f"test:{unique}") == b"kept"
    finally:
        await client.delete(f"test:{unique}")
        await client.aclose()


async def test_a_killed_redis_comes_back_on_the_same_port(local_infra: LocalInfra) -> None:
    # appendfsync everysec, as in production: a SIGKILL may lose the last second of writes
    # (Redis holds caches and rate-limit windows), so only the comeback is asserted.
    old_pid = local_infra.pid("redis")
    await local_infra.arestart_server("redis", kill=True)
    assert local_infra.pid("redis") != old_pid
    client = aioredis.from_url(local_infra.url("redis"))
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


@pytest.mark.parametrize("crash", [False, True], ids=["clean-restart", "sigkill-restart"])
async def test_a_restarted_nats_keeps_acknowledged_stream_messages(
    local_infra: LocalInfra, unique: str, crash: bool
) -> None:
    url = local_infra.url("nats")
    stream, subject = f"T{unique.upper()}", f"test.{unique}"
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[subject])
    ack = await js.publish(subject, b"kept")
    await nc.close()

    await local_infra.arestart_server("nats", kill=crash)

    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        msg = await js.get_msg(stream, ack.seq)
        assert msg.data == b"kept"
    finally:
        await js.delete_stream(stream)
        await nc.close()


async def test_a_server_restart_meanwhile_does_not_block_the_event_loop(local_infra: LocalInfra) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    ticker = asyncio.create_task(tick())
    await local_infra.arestart_server("redis")
    ticker.cancel()
    assert ticks > 1


def test_stop_leaves_no_process_and_the_next_run_reuses_ports_and_data(infra_data_dir: Path) -> None:
    data_dir = infra_data_dir / "infra"
    infra = LocalInfra(data_dir, durable=False)
    infra.start()
    pids = {name: infra.pid(name) for name in SERVER_NAMES}
    ports = infra.ports
    assert running_local_urls(data_dir) == {name: infra.url(name) for name in SERVER_NAMES}

    infra.stop()

    for name, pid in pids.items():
        assert pid is not None
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, name
        assert port_is_free(ports[name]), name
    state = read_state(data_dir)
    assert state is not None and all(info["pid"] == 0 for info in state.servers.values())
    assert running_local_urls(data_dir) == {}

    again = LocalInfra(data_dir, durable=False)
    assert again.ports == ports  # stable URLs for the developer between runs
    again.start()
    try:
        assert (data_dir / "postgres" / "PG_VERSION").exists()
    finally:
        again.stop()


def test_local_nats_runs_its_go_code_on_one_thread_unless_gomaxprocs_says_otherwise(
    infra_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def gomaxprocs_of_nats(folder: str) -> str | None:
        with LocalInfra(infra_data_dir / folder, servers=("nats",), durable=False) as infra:
            pid = infra.pid("nats")
            assert pid is not None
            return psutil.Process(pid).environ().get("GOMAXPROCS")

    monkeypatch.delenv("GOMAXPROCS", raising=False)
    assert gomaxprocs_of_nats("default") == "1"
    monkeypatch.setenv("GOMAXPROCS", "2")
    assert gomaxprocs_of_nats("explicit") == "2"


def test_configured_urls_start_nothing(tmp_path: Path) -> None:
    settings = CommonSettings(
        nats_url="nats://db.example:4222", database_url="postgresql://u@db.example/x",
        redis_url="redis://db.example:6379/0", data_dir=tmp_path,
    )
    urls, started = resolve_urls(settings, start=True)
    assert started is None
    assert (urls.nats_url, urls.database_url, urls.redis_url) == (
        "nats://db.example:4222", "postgresql://u@db.example/x", "redis://db.example:6379/0",
    )
    assert not (tmp_path / "infra.json").exists()


def test_unconfigured_urls_come_from_the_running_local_infra(local_infra: LocalInfra) -> None:
    settings = CommonSettings(
        nats_url="", database_url="", redis_url="redis://configured:6379/0", data_dir=local_infra.data_dir
    )
    urls, started = resolve_urls(settings, start=False)
    assert started is None
    assert urls.nats_url == local_infra.url("nats")
    assert urls.database_url == local_infra.url("postgres")
    assert urls.redis_url == "redis://configured:6379/0"


async def test_session_fixtures_give_real_servers_and_an_isolated_schema(
    db_pool: asyncpg.Pool, fresh_schema: str, settings_env: Callable[..., CommonSettings], redis_url: str
) -> None:
    await db_pool.execute(f'CREATE TABLE "{fresh_schema}".probe (v int)')
    await db_pool.execute(f'INSERT INTO "{fresh_schema}".probe VALUES (1)')
    assert await db_pool.fetchval(f'SELECT count(*) FROM "{fresh_schema}".probe') == 1
    settings = settings_env(stream_name="PROBE")
    assert settings.redis_url == redis_url and settings.stream_name == "PROBE"
    assert settings.database_url and settings.nats_url


def test_servers_of_a_killed_test_session_are_reaped_by_the_next_one(tmp_path: Path) -> None:
    folder = tmp_path / "orbion-test-killed"
    code = (
        "import sys, time\n"
        "from orbion_common.infra import LocalInfra\n"
        f"infra = LocalInfra({str(folder)!r}, servers=['redis', 'nats'], durable=False)\n"
        "infra.start()\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    session = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert session.stdout is not None and session.stdout.readline().strip() == "started"
    state = read_state(folder)
    assert state is not None
    server_pids = [int(info["pid"]) for info in state.servers.values()]
    session.kill()  # no atexit, no finalizer: the servers are orphaned
    session.wait()
    assert all(psutil.pid_exists(pid) for pid in server_pids)

    assert reap_stale_test_folders(tmp_path) == [folder]

    assert not folder.exists()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in server_pids)


def test_postgres_refuses_a_folder_pytest_would_lock_it_out_of(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root runs postgres as another user")
    with pytest.raises(InfraError, match="tmp_path"):
        LocalInfra(tmp_path / "x", servers=["postgres"]).start()
