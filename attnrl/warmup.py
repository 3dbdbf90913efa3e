"""Supervised warmup of the tiny default model on reference solutions (the 'warmup' stage).

RL needs a policy that already solves some problems (stack-notes.md): from random weights
every reward is 0 and no advantage is non-zero. The warmup is plain next-token SFT with the
loss on response tokens only, AdamW, linear warm-up then cosine decay, gradient clipping.
Real runs skip it and start from a trained checkpoint.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attnrl.config.schema import WarmupConfig
from attnrl.utils import stopping
from attnrl.utils.progress import Progress

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class SFTExample:
    """A prompt and the response the model should learn to write after it (EOS included)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


def sft_example(tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int], response: str) -> SFTExample:
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    return SFTExample(tuple(prompt_ids), tuple(response_ids))


def collate(examples: Sequence[SFTExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs with labels only on response tokens (prompt and padding ignored)."""
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example.prompt_ids + example.response_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(example.prompt_ids) : len(ids)] = torch.tensor(example.response_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def learning_rate(step: int, config: WarmupConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio · lr`` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def response_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over response tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def run_warmup(
    model: PreTrainedModel,
    examples: Sequence[SFTExample],
    config: WarmupConfig,
    *,
    pad_token_id: int,
    seed: int,
) -> list[dict[str, float]]:
    """Train ``model`` in place; returns the logged loss history (one row every ``log_every`` steps)."""
    if not examples:
        raise ValueError("warmup needs at least one example")
    rng = random.Random(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    history: list[dict[str, float]] = []
    model.train()
    try:
        running = 0.0
        with Progress(logger, "warmup", config.steps, "steps") as progress:
            for step in range(config.steps):
                stopping.checkpoint()
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, config)
                batch = collate([examples[rng.randrange(len(examples))] for _ in range(config.batch_size)], pad_token_id)
                loss = response_loss(model, {k: v.to(device) for k, v in batch.items()})
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                running += loss.item()
                count = (step % config.log_every) + 1
                progress.update(loss=running / count)  # the mean over the history row being filled
                if count == config.log_every or step + 1 == config.steps:
                    history.append({"step": step + 1, "loss": running / count, "lr": learning_rate(step, config)})
                    running = 0.0
    finally:
        torch.set_num_threads(previous_threads)
        model.eval()
    return history
