"""The transformers implementation of ``RolloutEngine`` (CPU, or GPU without vLLM).

Rows (request × n) are sorted by prompt length, left-padded, and generated in chunks of
``batch_size`` with ``model.generate``. Behaviour log-probs come from the raw logits scaled by
the temperature, so they equal what a training forward computes (stack-notes.md; a test
checks it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from attnrl.rollout.engine import Completion, GenerationRequest, SamplingParams
from attnrl.utils.seeding import derive_seed


class HFRolloutEngine:
    """Batched sampling with a transformers causal LM."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        pad_token_id: int,
        eos_token_id: int,
        batch_size: int = 64,
        progress: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.batch_size = batch_size
        self.progress = progress

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(dict(state_dict), strict=True)

    @torch.no_grad()
    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams, seed: int
    ) -> list[list[Completion]]:
        rows = [(r, i) for r, request in enumerate(requests) for i in range(request.n)]
        # Similar lengths share a chunk: less padding, and the order is independent of input order
        # ties (stable sort), so a fixed request list always forms the same chunks.
        order = sorted(range(len(rows)), key=lambda k: len(requests[rows[k][0]].prompt_ids))
        results: dict[int, Completion] = {}
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        was_training = self.model.training
        self.model.eval()
        try:
            # leave=False: one bar per call would otherwise pile up over a training run.
            bar = tqdm(chunks, desc="generate", leave=False, disable=not self.progress or len(chunks) < 2)
            for chunk_index, chunk in enumerate(bar):
                chunk_requests = [requests[rows[k][0]] for k in chunk]
                completions = self._generate_chunk(chunk_requests, params, derive_seed(seed, chunk_index))
                results.update(zip(chunk, completions, strict=True))
        finally:
            self.model.train(was_training)
        grouped: list[list[Completion]] = [[] for _ in requests]
        for k, (r, _) in enumerate(rows):
            grouped[r].append(results[k])
        return grouped

    def _generate_chunk(
        self, requests: Sequence[GenerationRequest], params: SamplingParams, seed: int
    ) -> list[Completion]:
        limits = [r.max_new_tokens or params.max_new_tokens for r in requests]
        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, request in enumerate(requests):
            input_ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            attention_mask[row, width - len(request.prompt_ids) :] = 1
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=0,
                max_new_tokens=max(limits),
                pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_token_id,
                return_dict_in_generate=True,
                output_logits=True,
            )
        new_tokens = out.sequences[:, width:].cpu()
        logits = torch.stack(out.logits, dim=1).float().cpu()  # (rows, steps, vocab), unprocessed
        logprobs = torch.log_softmax(logits / params.temperature, dim=-1)
        token_logprobs = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        completions = []
        for row, limit in enumerate(limits):
            tokens = new_tokens[row].tolist()
            stop = tokens.index(self.eos_token_id) + 1 if self.eos_token_id in tokens else None
            if stop is not None and stop <= limit:
                end, reason = stop, "stop"
            else:
                end, reason = min(limit, len(tokens)), "length"
            completions.append(
                Completion(
                    token_ids=tuple(tokens[:end]),
                    logprobs=tuple(token_logprobs[row, :end].tolist()),
                    finish_reason=reason,
                )
            )
        return completions
