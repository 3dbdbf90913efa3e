"""Prefect ``@task`` wrappers (retries, artifacts) around the stage functions; no algorithm logic.

``tasks.stages``: one task per stage; ``tasks.retry``: which failures are retried;
``tasks.checks``: the checks the pipeline runs between stages.
"""
