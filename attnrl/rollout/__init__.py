"""Rollout engines: the protocol the training loop talks to, and the transformers engine."""

from attnrl.rollout.engine import Completion, GenerationRequest, RolloutEngine, SamplingParams
from attnrl.rollout.prompts import decode_response, encode_prompt

__all__ = [
    "Completion",
    "GenerationRequest",
    "RolloutEngine",
    "SamplingParams",
    "decode_response",
    "encode_prompt",
]
