"""The pipeline stages as plain functions: prepare → warmup → (difficulty → train) → evaluate.

Each reads the typed config and the previous stage's outputs and writes its own outputs
atomically. Prefect flows and the CLI call these same functions (one implementation per stage).
"""
