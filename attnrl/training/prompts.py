"""Drawing prompt batches: shuffled epochs with a resumable cursor (spec §7.5 mechanics).

A batch that runs past the end of an epoch rolls into the next one, as the code's single-example
dataloader does. Each epoch's order depends only on the seed and the epoch number, so the cursor
(epoch, position) is the whole state.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from attnrl.data.problem import Problem
from attnrl.utils.seeding import derive_seed


class PromptSampler:
    def __init__(self, problems: Sequence[Problem], seed: int) -> None:
        if not problems:
            raise ValueError("no training problems to sample from")
        self.problems = list(problems)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(derive_seed(self.seed, "epoch", epoch)).shuffle(order)
        return order

    def take(self, count: int) -> list[Problem]:
        batch = []
        for _ in range(count):
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            batch.append(self.problems[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
