"""Fixtures for integration tests against real services."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API on a temporary SQLite database, one per test session (it costs ~10-15 s).

    Yields a synchronous client of that API; the server stops when the session ends.
    """
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # no network
    from prefect import get_client
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60), get_client(sync_client=True) as client:
        yield client


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs with a small object store, one per test module that uses it."""
    import ray

    ray.init(num_cpus=2, object_store_memory=128 * 2**20, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
