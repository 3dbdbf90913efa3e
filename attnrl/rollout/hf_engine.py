"""The transformers implementation of ``RolloutEngine`` (CPU, or GPU without vLLM).

Rows (request × n) are sorted by prompt length, left-padded, and generated in chunks of
``batch_size`` with ``model.generate``. Temperature and top-p are applied by
:class:`SampledLogprobs`, a logits processor that also keeps the log-prob of each sampled token
under the distribution it was drawn from, so memory stays O(rows × length) instead of the
O(rows × length × vocabulary) of ``output_logits=True``. At top_p = 1 these equal what a
training forward computes at the same temperature (stack-notes.md; a test checks it).
Out-of-vocabulary ids (>= ``vocab_size``, a padded LM-head row) truncate a response (spec §5.4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from attnrl.rollout.engine import Completion, GenerationRequest, SamplingParams, cut_at_vocabulary
from attnrl.utils import stopping
from attnrl.utils.seeding import derive_seed


class SampledLogprobs(LogitsProcessor):
    """Temperature and top-p warping that records each sampled token's log-prob.

    ``generate`` calls it once per step with the ids so far, whose last column is the token
    sampled from the previous step's distribution: that distribution is the only one kept.
    ``finish`` adds the last step's token. The warpers are transformers' own, so sampling is
    what ``generate(temperature=..., top_p=...)`` would do.
    """

    def __init__(self, temperature: float, top_p: float) -> None:
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self._previous: torch.Tensor | None = None  # [rows, vocab] log-probs of the last step
        self._steps: list[torch.Tensor] = []  # one [rows] tensor per sampled token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._record(input_ids[:, -1])
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        self._previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _record(self, sampled: torch.Tensor) -> None:
        if self._previous is not None:
            self._steps.append(self._previous.gather(-1, sampled[:, None].to(self._previous.device))[:, 0])
            self._previous = None

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """The [rows, steps] log-probs of ``new_tokens`` (the generated columns)."""
        self._record(new_tokens[:, -1])
        if len(self._steps) != new_tokens.shape[1]:
            raise RuntimeError(f"recorded {len(self._steps)} steps for {new_tokens.shape[1]} generated tokens")
        return torch.stack(self._steps, dim=1).cpu()


class HFRolloutEngine:
    """Batched sampling with a transformers causal LM."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        pad_token_id: int,
        eos_token_id: int,
        vocab_size: int | None = None,
        batch_size: int = 64,
        progress: bool = False,
    ) -> None:
        """``vocab_size`` is the tokenizer's (``len(tokenizer)``); ids at or above it truncate a response."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size
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
                stopping.checkpoint()
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
        recorder = SampledLogprobs(params.temperature, params.top_p)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            # temperature/top_p/top_k are neutral here so transformers adds no warpers of its own:
            # the recorder applies them and sees exactly the distribution that is sampled.
            sequences = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max(limits),
                pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_token_id,
                logits_processor=LogitsProcessorList([recorder]),
            )
        new_tokens = sequences[:, width:].cpu()
        token_logprobs = recorder.finish(new_tokens)
        return [self._completion(new_tokens[row].tolist(), token_logprobs[row].tolist(), limit)
                for row, limit in enumerate(limits)]

    def _completion(self, tokens: list[int], logprobs: list[float], limit: int) -> Completion:
        """One row cut at its EOS (kept), its own limit, or its first out-of-vocabulary id."""
        stop = tokens.index(self.eos_token_id) + 1 if self.eos_token_id in tokens else None
        if stop is not None and stop <= limit:
            end, reason = stop, "stop"
        else:
            end, reason = min(limit, len(tokens)), "length"
        ids, values, cut = cut_at_vocabulary(tokens[:end], logprobs[:end], self.vocab_size)
        return Completion(token_ids=ids, logprobs=values, finish_reason="oov" if cut else reason)
