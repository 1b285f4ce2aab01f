"""Fixtures shared by the study tests: a PostgreSQL database of the test's own."""

from __future__ import annotations

import pytest

from benchmarks.stress import PG_URL, postgres_available, scratch_database


@pytest.fixture
def pg_database():
    """The URL of a new, empty PostgreSQL database, dropped after the test; skips when no server answers."""
    why = postgres_available(PG_URL)
    if why is not None:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {why}")
    with scratch_database(PG_URL, prefix="adabatch_test") as url:
        yield url
