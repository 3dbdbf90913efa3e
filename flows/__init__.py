"""Prefect flows, one per stage plus ``pipeline``.

``flows.stages``: ``prepare_flow``, ``warmup_flow``, ``difficulty_flow``, ``train_flow``, ``evaluate_flow``,
``report_flow``; each resolves the config (``config_path``, ``overrides``, ``root``, ``method``, as the CLI)
and calls its stage's task, which calls the one stage function in ``attnrl.stages``.
``flows.pipeline``: ``pipeline`` runs them in order as subflows, with a check between stages.
"""
