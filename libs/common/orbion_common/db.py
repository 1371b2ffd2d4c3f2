"""The asyncpg pool of a service. One pool per process; its search_path is the service's schema."""

from __future__ import annotations

import asyncpg

from .settings import CommonSettings


def schema_of(service: str) -> str:
    """The Postgres schema a service owns: ``llm-proxy`` -> ``llm_proxy``."""
    return service.replace("-", "_")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without asyncpg's reset query (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL).

    That query is a round trip on every release, and ORBION's sessions keep no state to reset:
    settings are fixed at connect (``server_settings``) or ``SET LOCAL``, no cursor outlives
    its transaction, nothing LISTENs on a pooled connection, and the two session advisory
    locks (``leadership``, ``migrations``) are released by their owners, which close the
    connection when they cannot. asyncpg still rolls back a transaction left open.
    """


async def create_pool(settings: CommonSettings, *, service: str) -> asyncpg.Pool:
    """A pool sized by ``ORBION_DB_POOL_MIN/MAX`` whose connections resolve names in the service's schema."""
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        command_timeout=30,
        reset=_keep_session,
        server_settings={
            "search_path": f"{schema_of(service)},public",
            "application_name": f"orbion-{service}",
            # The services run lookups and writes that an index serves (the few counts run on
            # an index too). asyncpg prepares each statement once per connection, and Postgres
            # then caches one generic plan: made while a fresh store was tiny, a sequential scan
            # would be kept as the table grew, until an ANALYZE that autovacuum may be late with
            # or never run. With sequential scans off, cached plans use the indexes from the
            # start and executions reuse them (planning each afresh, with force_custom_plan,
            # cost Postgres as much time as executing).
            "enable_seqscan": "off",
            # Such a scan, where no index serves, is then costed in the billions, far past
            # jit_above_cost: Postgres would compile it with LLVM at every execution (460 ms for
            # a 100-row table). Statements this small never gain from JIT.
            "jit": "off",
            # And each statement is planned once per connection: left to choose, Postgres kept
            # planning at every execution those whose generic plan it costed above their custom
            # ones (batch inserts from arrays, array lookups), 0.7 s of planning in 15 s at
            # 100 msg/s, a quarter of its statement time. With sequential scans off, a generic
            # plan of these keyed statements uses the same indexes as a custom one.
            "plan_cache_mode": "force_generic_plan",
        },
    )
    assert pool is not None
    return pool
