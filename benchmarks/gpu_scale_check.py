"""The GPU check: run it first whenever a GPU is at hand (one H100/H200, no network, ~15 minutes).

Everything at the exact DeepSeek-R1-Distill-Qwen-1.5B shapes (spec §2.1; random weights built on the GPU
itself, nothing downloads), the way the ``r1-distill-1.5b`` preset trains one rank (spec §11, §12):

1. ``environment``: device, memory, versions, TF32 defaults;
2. ``plain_forward``: a plain no-grad bf16 forward (SDPA) of one sequence per length, 1 k to 9 k tokens: the
   baseline every pass is read against;
3. ``fci_kernel``: one attention layer's FCI kernel (``attnrl.fci_kernel``) at the longest length, per
   precision (fp32 with TF32 off and on, and the CUDA path: bf16 matmuls writing fp32 scores) and block
   rows, beside SDPA on the same Q, K, V;
4. ``fci_accuracy``: the kernel against the naive reference (full softmax in fp64, spec §5.2) at 2,048 tokens;
5. ``passes``: the trainer's scoring pass with FCI, the reference pass and one PPO update over 8 sequences of
   1,024 + 8,192 tokens in 36,864-token micro-batches, on the preset's backend: DeepSpeed ZeRO-3 in bf16
   (a world of one) where DeepSpeed is installed, else the torch backend (bf16 autocast);
6. ``weights``: the weight export for the object store and the weight stream of vLLM's native transfer
   (full tensors in bf16, module by module), each with its fingerprint;
7. ``trees``: tree-packed training (``train.tree_packing``) on one question's tree of the paper's shape
   (a 1,024-token prompt, G = 6 responses of 4,096 tokens, each branched at N = 2 points around its middle
   with T = 2 continuations): the reference pass and one update per path, then tree-packed through
   FlexAttention's block mask and through the SDPA segment kernel, with the log-prob and loss differences.

Each section is timed after a warm-up, reports tokens/s and peak GPU memory, and fails on its own (its
error is recorded and the next section runs); a section that would start after ``--budget-s`` is skipped.
One JSON object on stdout. Needs torch, transformers and this repository; DeepSpeed's ZeRO path needs the
wheels README "The GPU check" carries (deepspeed, hjson, pydantic and its parts).

    python benchmarks/gpu_scale_check.py              # on the GPU (about 3-5 minutes, bounded by --budget-s)
    python benchmarks/gpu_scale_check.py --small      # the same sections on CPU with a small body, in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# DeepSeek-R1-Distill-Qwen-1.5B (its public config.json; spec §2.1, stack-notes.md).
R1_DISTILL_1_5B = {
    "vocab_size": 151_936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
}
# --small: the same vocabulary and head (the memory problem) on a small body.
SMALL_BODY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 1024}

# The r1-distill-1.5b preset's train section (tests check it against attnrl.config's resolution).
TRAIN = {
    "lr": 1e-6, "weight_decay": 0.01, "grad_clip": 1.0, "mini_batch_sequences": 192,
    "max_tokens_per_micro_batch": 36_864, "logits_chunk_tokens": 1024, "gradient_checkpointing": True,
    "packing": "auto", "tree_packing": False, "zero_stage": 3, "reference_offload": False,
}
ALGORITHM = {
    "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0, "kl_coef": 0.001, "entropy_coef": 0.0,
    "loss_aggregation": "token_mean", "fci_delta": 4, "step_attention": "mean_mean",
    "fci_mask_first_step": True, "fci_mask_after_think": True,
}
TEMPERATURE = 1.0  # training rollouts (spec §12)
SECTIONS = ("environment", "plain_forward", "fci_kernel", "fci_accuracy", "passes", "weights", "trees")


def _shape(small: bool) -> dict[str, Any]:
    if small:
        return {"lengths": [64, 128, 256], "prompt": 32, "response": 96, "sequences": 3, "step_every": 16,
                "token_budget": 256, "accuracy_length": 128, "kernel_blocks": [16, 64, None], "device": "cpu",
                "warmup": 1, "repeats": 2, "tree": {"prompt": 16, "response": 32, "offsets": (12, 20), "responses": 2}}
    return {"lengths": [1024, 2048, 4096, 9216], "prompt": 1024, "response": 8192, "sequences": 8, "step_every": 64,
            "token_budget": TRAIN["max_tokens_per_micro_batch"], "accuracy_length": 2048,
            "kernel_blocks": [128, 512, None], "device": "cuda", "warmup": 1, "repeats": 3,
            "tree": {"prompt": 1024, "response": 4096, "offsets": (1536, 2560), "responses": 6}}


class Meter:
    """Wall time (device-synchronised) and peak device memory of a call, repeated after warm-ups."""

    def __init__(self, torch: Any, device: Any) -> None:
        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any], *, warmup: int = 0, repeats: int = 1, tokens: int | None = None):
        for _ in range(warmup):
            fn()
        self.sync()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        resident = self.torch.cuda.memory_allocated() if self.cuda else None
        times, result = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            result = fn()
            self.sync()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        peak = self.torch.cuda.max_memory_allocated() if self.cuda else None
        return {
            "seconds": round(seconds, 4), "repeats": repeats,
            "tokens_per_s": None if tokens is None else round(tokens / seconds, 1),
            "peak_gib": None if peak is None else round(peak / 2**30, 2),
            "peak_over_resident_gib": None if peak is None else round((peak - resident) / 2**30, 2),
        }, result


def _model(small: bool, dtype: Any, device: Any):
    """A random-init Qwen2 of the R1-Distill shapes, built directly on ``device`` in ``dtype``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    numbers = {**R1_DISTILL_1_5B, **SMALL_BODY} if small else R1_DISTILL_1_5B
    config = Qwen2Config(**numbers, attn_implementation="sdpa")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _sequences(shape: dict[str, Any], vocab: int):
    """Random prompt ⧺ response token ids with a step every ``step_every`` tokens, their segmentations, and
    training sequences with plausible behaviour log-probs and advantages."""
    import torch

    from attnrl.steps import StepSegmentation
    from attnrl.training.trainer import TrainSequence

    generator = torch.Generator().manual_seed(1)
    prompts, responses, segmentations, train = [], [], [], []
    p, r = shape["prompt"], shape["response"]
    for _ in range(shape["sequences"]):
        ids = torch.randint(0, vocab, (p + r,), generator=generator).tolist()
        prompts.append(tuple(ids[:p]))
        responses.append(tuple(ids[p:]))
        segmentations.append(StepSegmentation((0, *range(p, p + r, shape["step_every"]), p + r)))
        advantage = float(torch.randn((), generator=generator))
        train.append(TrainSequence(prompts[-1], responses[-1], tuple([-11.9] * r), tuple([advantage] * r)))
    return prompts, responses, segmentations, train


def _segmentation(length: int, step_every: int):
    from attnrl.steps import StepSegmentation

    return StepSegmentation((0, *range(step_every, length, step_every), length))


def _qkv(shape_model: dict[str, Any], length: int, dtype: Any, device: Any, seed: int = 2):
    """One layer's Q, K, V of the R1-Distill attention ([heads, L, d], [kv_heads, L, d]), scaled like real ones."""
    import torch

    heads, kv_heads = shape_model["num_attention_heads"], shape_model["num_key_value_heads"]
    dim = shape_model["hidden_size"] // heads
    generator = torch.Generator(device=device).manual_seed(seed)
    draw = lambda h: (torch.randn((h, length, dim), generator=generator, device=device) * 2.0).to(dtype)  # noqa: E731
    return draw(heads), draw(kv_heads), draw(kv_heads), dim


# --------------------------------------------------------------------------------------------------- sections


def environment(ctx: SimpleNamespace) -> dict[str, Any]:
    torch = ctx.torch
    import transformers

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception as exc:  # noqa: BLE001 - any import failure means: not usable here
        ds_version = f"not usable: {type(exc).__name__}: {exc}"[:200]
    cuda = ctx.device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "deepspeed": ds_version,
        "python": "%d.%d.%d" % sys.version_info[:3],
        "tf32_matmul_default": bool(torch.backends.cuda.matmul.allow_tf32),
        "model": "small body, R1-Distill vocabulary" if ctx.small else "R1-Distill-Qwen-1.5B shapes",
        "parameters": sum(p.numel() for p in ctx.policy().parameters()),
    }


def plain_forward(ctx: SimpleNamespace) -> dict[str, Any]:
    """No-grad bf16 forward of one sequence (SDPA, logits of the last position only): the baseline."""
    torch = ctx.torch
    model = ctx.policy()
    out = {}
    for length in ctx.shape["lengths"]:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=ctx.device)

        def forward():
            with torch.no_grad(), ctx.autocast():
                return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

        out[str(length)], _ = ctx.meter(forward, warmup=ctx.shape["warmup"], repeats=ctx.shape["repeats"],
                                        tokens=length)
    return out


def fci_kernel(ctx: SimpleNamespace) -> dict[str, Any]:
    """One layer's FCI kernel per (precision, TF32, block rows) at the longest length, beside SDPA."""
    torch = ctx.torch
    import torch.nn.functional as F

    from attnrl.fci_kernel import CPU_BLOCK_ROWS, StepPlan, attention_with_influence, block_rows, mixed_matmul

    length = ctx.shape["lengths"][-1]
    numbers = ctx.numbers
    half = torch.bfloat16
    q, k, v, dim = _qkv(numbers, length, half, ctx.device)
    plan = StepPlan(_segmentation(length, ctx.shape["step_every"]), ALGORITHM["fci_delta"], "mean_mean", ctx.device)
    scale = dim**-0.5
    layers = numbers["num_hidden_layers"]
    auto_rows = block_rows(length, numbers["num_attention_heads"]) if ctx.device.type == "cuda" else CPU_BLOCK_ROWS

    def sdpa():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)

    result: dict[str, Any] = {"length": length, "layers": layers, "auto_block_rows": auto_rows}
    result["sdpa_bf16"], _ = ctx.meter(sdpa, warmup=ctx.shape["warmup"], repeats=ctx.shape["repeats"], tokens=length)
    configs = [("fp32", False, rows) for rows in ctx.shape["kernel_blocks"]]
    configs += [("fp32", True, ctx.shape["kernel_blocks"][0]), ("fp32", True, None)]
    configs += [("input", False, rows) for rows in ctx.shape["kernel_blocks"]]
    runs = {}
    for precision, tf32, rows in configs:
        chosen = rows or auto_rows
        name = f"{precision}{'_tf32' if tf32 else ''}_rows{'_auto' if rows is None else ''}{chosen}"
        with _tf32(torch, tf32):
            measured, _ = ctx.meter(lambda: attention_with_influence(q, k, v, plan, scale, chosen, precision),
                                    warmup=ctx.shape["warmup"], repeats=ctx.shape["repeats"], tokens=length)
        measured["over_sdpa"] = round(measured["seconds"] / max(result["sdpa_bf16"]["seconds"], 1e-9), 2)
        measured["all_layers_seconds"] = round(measured["seconds"] * layers, 3)
        runs[name] = measured
    result["runs"] = runs
    # False: this torch lacks bmm(..., out_dtype=float32) and the "input" runs upcast instead (fci_kernel._matmul_fp32).
    result["bf16_matmul_writes_fp32"] = mixed_matmul(ctx.device.type)
    return result


@contextlib.contextmanager
def _tf32(torch: Any, enabled: bool):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def fci_accuracy(ctx: SimpleNamespace) -> dict[str, Any]:
    """The kernel's FCI and attention output against the naive reference (fp64 softmax, spec §5.2)."""
    torch = ctx.torch
    from attnrl.fci import forward_influence, step_attention
    from attnrl.fci_kernel import StepPlan, attention_with_influence, block_rows

    length = ctx.shape["accuracy_length"]
    numbers = ctx.numbers
    segmentation = _segmentation(length, ctx.shape["step_every"])
    plan = StepPlan(segmentation, ALGORITHM["fci_delta"], "mean_mean", ctx.device)
    heads, kv_heads = numbers["num_attention_heads"], numbers["num_key_value_heads"]
    rows = block_rows(length, heads) if ctx.device.type == "cuda" else 64
    out: dict[str, Any] = {"length": length, "block_rows": rows}
    for precision, dtype, tf32 in (("fp32", torch.float32, False), ("fp32", torch.float32, True),
                                   ("input", torch.bfloat16, False)):
        q, k, v, dim = _qkv(numbers, length, dtype, ctx.device)
        scale = dim**-0.5
        groups = heads // kv_heads
        # The reference sees exactly the kernel's inputs (bf16-rounded ones for the CUDA path), in fp64.
        q64, k64, v64 = q.double(), k.double().repeat_interleave(groups, 0), v.double().repeat_interleave(groups, 0)
        causal = torch.ones((length, length), dtype=torch.bool, device=ctx.device).tril()
        attention = torch.softmax((q64 @ k64.transpose(1, 2) * scale).masked_fill(~causal, float("-inf")), dim=-1)
        want_y = forward_influence(step_attention(attention, segmentation.boundaries, "mean_mean"),
                                   ALGORITHM["fci_delta"])
        want_out = attention @ v64
        del attention
        with _tf32(torch, tf32):
            got_out, got_y = attention_with_influence(q, k, v, plan, scale, rows, precision)
        name = f"{precision}_{str(dtype).split('.')[-1]}{'_tf32' if tf32 else ''}"
        out[name] = {
            "fci_max_abs_error": float((got_y.double() - want_y).abs().max()),
            "fci_max_abs": float(want_y.abs().max()),
            "output_max_abs_error": float((got_out.double() - want_out).abs().max()),
        }
    return out


def _trainer(ctx: SimpleNamespace, kernel: str | None = None, tree_packing: bool = False):
    """A trainer as the preset builds one rank, on fresh weights: fp32 master weights (DeepSpeed casts to bf16
    and keeps its own), a frozen reference on the device, the preset's backend; ``kernel``: both models'
    attention implementation (default: the model's own)."""
    torch = ctx.torch
    from attnrl.training.backend import build_backend
    from attnrl.training.trainer import PolicyTrainer
    from attnrl.utils.registry import provide

    if ctx.deepspeed:  # run from a checkout, attnrl's entry points (pyproject.toml) may not be installed
        from infra.deepspeed_backend import DeepSpeedBackend

        provide("deepspeed_backend", DeepSpeedBackend)
    train = SimpleNamespace(**{**TRAIN, "max_tokens_per_micro_batch": ctx.shape["token_budget"],
                               "precision": ctx.precision, "backend": "deepspeed" if ctx.deepspeed else "torch",
                               "tree_packing": tree_packing})
    policy = ctx.fresh_policy(torch.float32)
    reference = ctx.fresh_policy(torch.bfloat16 if ctx.precision == "bf16" else torch.float32)
    for model in (policy, reference) if kernel else ():
        model.set_attn_implementation(kernel)
    backend = build_backend(train.backend, policy, train)
    if ctx.deepspeed:
        reference = backend.prepare_reference(reference)
    return PolicyTrainer(policy, backend, reference=reference, pad_token_id=0, algorithm=SimpleNamespace(**ALGORITHM),
                         train=train, temperature=TEMPERATURE,
                         autocast=torch.bfloat16 if ctx.precision == "bf16" else None)


def passes(ctx: SimpleNamespace) -> dict[str, Any]:
    """Scoring with FCI, the reference pass and one update, on the preset's backend."""
    torch = ctx.torch
    from attnrl.training.trainer import TrainSequence

    ctx.release_policy()  # the forward-only sections' model: its memory goes to the trainer's states
    trainer = ctx.trainer = _trainer(ctx)
    backend_name, policy = trainer.train_config.backend, trainer.model
    prompts, responses, segmentations, sequences = _sequences(ctx.shape, policy.config.vocab_size)
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    out: dict[str, Any] = {"backend": backend_name, "zero_stage": TRAIN["zero_stage"] if ctx.deepspeed else None,
                           "precision": ctx.precision, "sequences": len(prompts),
                           "prompt_tokens": ctx.shape["prompt"], "response_tokens": ctx.shape["response"],
                           "token_budget": ctx.shape["token_budget"],
                           "micro_batches": len(trainer._micro_batches(prompts, responses,
                                                                       policy.config._attn_implementation))}
    out["score"], scored = ctx.meter(lambda: trainer.score(prompts, responses, segmentations), warmup=0, repeats=1,
                                     tokens=tokens)
    out["reference"], refs = ctx.meter(lambda: trainer.logprobs(prompts, responses, reference=True), warmup=0,
                                       repeats=1, tokens=tokens)
    batch = [TrainSequence(s.prompt_ids, s.response_ids, sc.logprobs, s.advantages, ref)
             for s, sc, ref in zip(sequences, scored, refs, strict=True)]
    out["update"], stats = ctx.meter(lambda: trainer.update(batch), warmup=0, repeats=1, tokens=tokens)
    out["update_stats"] = {k: stats[k] for k in ("optimizer_steps", "grad_norm", "loss")}
    out["all_scores_finite"] = all(bool(torch.isfinite(torch.tensor(s.logprobs + s.entropies + s.fci)).all())
                                   for s in scored)
    return out


def weights(ctx: SimpleNamespace) -> dict[str, Any]:
    """The object-store export and the native transfer's weight stream (bf16, module by module), with fingerprints."""
    torch = ctx.torch
    from attnrl.rollout.fingerprint import FingerprintBuilder, fingerprint

    if ctx.trainer is None:
        raise RuntimeError("needs the trainer of the passes section")
    backend = ctx.trainer.backend

    def export():
        state = backend.export_weights()
        return fingerprint(state.items(), dtype=torch.bfloat16), sum(t.numel() for t in state.values())

    def stream():
        builder = FingerprintBuilder()
        count = 0
        for name, tensor in backend.weight_stream(torch.bfloat16):
            builder.add(name, tensor)
            count += tensor.numel()
        return builder.result(), count

    out: dict[str, Any] = {}
    out["export_and_fingerprint"], (exported, elements) = ctx.meter(export, warmup=0, repeats=1)
    out["stream_and_fingerprint"], (streamed, streamed_elements) = ctx.meter(stream, warmup=0, repeats=1)
    for key, count in (("export_and_fingerprint", elements), ("stream_and_fingerprint", streamed_elements)):
        out[key]["gib"] = round(count * 2 / 2**30, 2)  # as the engines take them, bf16
    # The stream sends each parameter once (no buffers, a tied head once); where both name a tensor they agree.
    out["fingerprints_agree"] = all(exported.get(name) == value for name, value in streamed.items())
    return out


def _tree(shape: dict[str, Any], vocab: int):
    """One question's tree: G responses (6 at the paper's shape), N = 2 branch points each, T = 2 continuations
    per point (spec §12)."""
    import torch

    from attnrl.training.trainer import TrainSequence

    generator = torch.Generator().manual_seed(3)
    draw = lambda n: tuple(torch.randint(0, vocab, (n,), generator=generator).tolist())  # noqa: E731
    prompt, length, out = draw(shape["prompt"]), shape["response"], []
    for _ in range(shape["responses"]):
        response = draw(length)
        paths = [response, *(response[:o] + draw(length - o) for o in shape["offsets"] for _ in range(2))]
        for path in paths:
            advantage = float(torch.randn((), generator=generator))
            out.append(TrainSequence(prompt, path, tuple([-11.9] * length), tuple([advantage] * length)))
    return out


def _tree_variant(ctx: SimpleNamespace, kernel: str, packed: bool, sequences: list, tokens: int):
    """The reference pass and one update over ``sequences`` on fresh weights, ``kernel``, tree-packed or not."""
    from attnrl.training.trainer import TrainSequence

    trainer = _trainer(ctx, kernel, tree_packing=packed)
    prompts, responses = [s.prompt_ids for s in sequences], [s.response_ids for s in sequences]
    entry: dict[str, Any] = {"kernel": kernel, "tree_packing": packed}
    entry["reference"], refs = ctx.meter(lambda: trainer.logprobs(prompts, responses, reference=True), warmup=0,
                                         repeats=1, tokens=tokens)
    batch = [TrainSequence(s.prompt_ids, s.response_ids, s.old_logprobs, s.advantages, r)
             for s, r in zip(sequences, refs, strict=True)]
    entry["update"], stats = ctx.meter(lambda: trainer.update(batch), warmup=0, repeats=1, tokens=tokens)
    entry["update_stats"] = {k: stats[k] for k in ("optimizer_steps", "grad_norm", "loss")}
    return entry, refs


def trees(ctx: SimpleNamespace) -> dict[str, Any]:
    """Per path against tree-packed, on each attention kernel a tree runs on here: same weights, same paths."""
    torch = ctx.torch
    ctx.trainer = None  # the passes section's trainer and its optimizer state: their memory goes to these
    ctx.release_policy()
    sequences = _tree(ctx.shape["tree"], ctx.numbers["vocab_size"])
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
    kernels = ["flex_attention", "sdpa"] if ctx.device.type == "cuda" else ["sdpa"]
    variants = {"per_path": (kernels[0], False), **{f"tree_{k}": (k, True) for k in kernels}}
    out: dict[str, Any] = {"sequences": len(sequences), "per_path_tokens": tokens}
    baseline = None
    for name, (kernel, packed) in variants.items():
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        entry, refs = _tree_variant(ctx, kernel, packed, sequences, tokens)
        if baseline is None:
            baseline = (refs, entry)
        else:
            entry["reference_max_abs_diff"] = max(abs(a - b) for mine, theirs in zip(refs, baseline[0], strict=True)
                                                  for a, b in zip(mine, theirs, strict=True))
            entry["loss_diff"] = abs(entry["update_stats"]["loss"] - baseline[1]["update_stats"]["loss"])
            entry["update_speedup"] = round(baseline[1]["update"]["seconds"] / entry["update"]["seconds"], 2)
        out[name] = entry
    return out


# --------------------------------------------------------------------------------------------------- driver


def run(small: bool, budget_s: float = 420.0, sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    started = time.perf_counter()
    shape = _shape(small)
    device = torch.device(shape["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --small on CPU")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes, and says so on stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401

        has_deepspeed = True
    except Exception:  # noqa: BLE001
        has_deepspeed = False
    precision = "fp32" if small else "bf16"
    cache: dict[str, Any] = {}

    def policy():
        """The shared bf16 (fp32 with --small) model of the forward-only sections, built once."""
        if "policy" not in cache:
            cache["policy"] = _model(small, torch.bfloat16 if precision == "bf16" else torch.float32, device)
        return cache["policy"]

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    ctx = SimpleNamespace(torch=torch, small=small, shape=shape, device=device, meter=Meter(torch, device),
                          numbers={**R1_DISTILL_1_5B, **SMALL_BODY} if small else R1_DISTILL_1_5B,
                          deepspeed=has_deepspeed, precision=precision, policy=policy, autocast=autocast,
                          fresh_policy=lambda dtype: _model(small, dtype, device), trainer=None,
                          release_policy=lambda: cache.pop("policy", None))
    report: dict[str, Any] = {"script": "benchmarks/gpu_scale_check.py", "small": small, "budget_s": budget_s,
                              "sections": {}}
    for name in sections:
        elapsed = time.perf_counter() - started
        if elapsed > budget_s:
            report["sections"][name] = {"skipped": f"budget of {budget_s:g} s spent ({elapsed:.0f} s)"}
            continue
        section_start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
                result = globals()[name](ctx)
            report["sections"][name] = {"ok": True, "seconds": round(time.perf_counter() - section_start, 2), **result}
        except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others' figures
            report["sections"][name] = {"ok": False, "seconds": round(time.perf_counter() - section_start, 2),
                                        "error": f"{type(exc).__name__}: {exc}"[:2000],
                                        "traceback": traceback.format_exc()[-3000:]}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["total_s"] = round(time.perf_counter() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small body on CPU (every section, in seconds)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no section after this many seconds")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args(argv)
    report = run(args.small, args.budget_s, tuple(args.sections))
    print(json.dumps(report, indent=2))
    return 0 if all(s.get("ok", True) for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
