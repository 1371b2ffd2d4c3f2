"""The load tool's harness: the run's own database named in the URL the services get."""

from __future__ import annotations

from orbion_loadtest.stack import with_database


def test_the_runs_database_replaces_only_the_database_of_the_url() -> None:
    assert with_database("postgresql://orbion:pw@db:5432/orbion", "loadtest_1") == (
        "postgresql://orbion:pw@db:5432/loadtest_1"
    )
    # a Unix socket directory in the options: cutting at the last "/" named "postgresql" the database
    assert with_database("postgresql://postgres@/test?host=/var/run/postgresql", "loadtest_1") == (
        "postgresql://postgres@/loadtest_1?host=/var/run/postgresql"
    )
    assert with_database("postgresql://postgres@%2Fvar%2Frun%2Fpostgresql/test", "x") == (
        "postgresql://postgres@%2Fvar%2Frun%2Fpostgresql/x"
    )
