"""Adapters to heavy systems (Ray, vLLM, DeepSpeed, Great Expectations, DVC, S3), imported lazily.

The pure core ``attnrl`` never imports these systems; it talks to them through protocols such
as ``attnrl.rollout.RolloutEngine``.
"""
