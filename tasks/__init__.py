"""Prefect ``@task`` wrappers (retries, timeouts, artifacts) around stage steps; no algorithm logic."""
