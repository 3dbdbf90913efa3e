"""Rule-based answer verifier: 0/1 reward for a math response (spec §8)."""

from attnrl.reward.extract import extract_solution, last_boxed
from attnrl.reward.verifier import Verifier

__all__ = ["Verifier", "extract_solution", "last_boxed"]
