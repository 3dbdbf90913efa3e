"""attnrl: process-supervised RL for math reasoning with attention-guided tree exploration.

The pure algorithm core. Nothing here imports prefect, ray, dvc, great_expectations, vllm
or deepspeed; those live behind adapters in ``infra/``.
"""

__version__ = "0.1.0"
