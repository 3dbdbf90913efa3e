"""Prefect flows, one per stage plus ``pipeline`` (issue "Orchestration").

Each flow will be a thin wrapper around the stage functions in ``attnrl.stages``; until then
the CLI (``attnrl prepare|warmup|evaluate|demo``) calls those functions directly, so there is
still exactly one implementation of every stage.
"""
