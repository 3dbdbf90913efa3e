"""The run configuration schema, grouped by stage (params.yaml mirrors this layout).

Every field carries its meaning, unit and source in its description. Defaults are the
paper's 1.5B setting (spec §12) unless a field says otherwise; the ``tiny`` preset is a small
delta for the embedded default. Where paper and official code disagree (spec §16) the choice is
a field whose description names the AMBIG entry and says which side the default takes. The
``rollout`` section (sampling and engines) lives in ``attnrl.config.rollout``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from attnrl.config.distributed import DistributedConfig
from attnrl.config.layout import layout_problems
from attnrl.config.rollout import RolloutConfig
from attnrl.config.section import Section


class SourceSpec(Section):
    """Where a set of problems comes from."""

    kind: Literal["synthetic", "verl_parquet", "jsonl", "hf"] = Field(
        description="Loader: 'synthetic' (the embedded task, from data.synthetic), 'verl_parquet' "
        "(spec §2.3 layout), 'jsonl' (one problem per line), 'hf' (a Hugging Face dataset; needs network "
        "or a local dataset directory)."
    )
    path: str | None = Field(
        default=None,
        description="File, directory or HF dataset name. Required for every kind but 'synthetic'.",
    )
    name: str | None = Field(
        default=None,
        description="Benchmark name used in metrics; defaults to the file stem or the dataset name.",
    )
    split: str = Field(default="train", description="HF split to load, and the split recorded for jsonl rows.")
    k: int = Field(
        default=1, ge=1, description="Evaluation samples per problem (spec §14: 32 for AIME/AMC, 4 for the rest)."
    )
    limit: int | None = Field(default=None, ge=1, description="Keep only the first N problems (smoke runs).")
    on_invalid: Literal["error", "skip"] = Field(
        default="error",
        description="A row that cannot be graded (empty prompt or answer, wrong type): stop with an error "
        "naming the row, or skip it with a warning (real training sets have a few such rows).",
    )
    prompt_field: str = Field(default="problem", description="HF only: column holding the question text.")
    answer_field: str = Field(default="answer", description="HF only: column holding the answer(s).")

    @model_validator(mode="after")
    def _path_required(self) -> SourceSpec:
        if self.kind != "synthetic" and not self.path:
            raise ValueError(f"path is required for kind '{self.kind}'")
        return self


class SyntheticTaskConfig(Section):
    """The embedded step-by-step arithmetic task (see attnrl/data/synthetic.py)."""

    family: Literal["chain", "planted"] = Field(
        default="chain",
        description="'chain': left-to-right operation chains, every step feeds the next; 'planted': variable "
        "definitions and a query that reuses one of them, its definition the known critical step "
        "(attnrl/data/planted.py).",
    )
    levels: list[int] = Field(
        default=[1, 2, 3, 4, 5],
        min_length=1,
        description="Difficulty levels = number of operations in the chain ('chain') or of definitions ('planted').",
    )
    modulus: int = Field(default=10, ge=2, le=10, description="Arithmetic is modulo this (single-digit numbers).")
    operators: str = Field(default="+-", min_length=1, description="Operators drawn uniformly; a subset of '+-*'.")
    train_per_level: int = Field(default=2000, ge=1, description="Training problems per level.")
    eval_per_level: int = Field(default=100, ge=1, description="Held-out problems per level.")
    holdout_fraction: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="Share of the expression space reserved for evaluation: no training problem "
        "(warmup or RL) ever uses a held-out expression.",
    )

    @model_validator(mode="after")
    def _check(self) -> SyntheticTaskConfig:
        if any(level < 1 for level in self.levels):
            raise ValueError("levels must be >= 1")
        bad = set(self.operators) - set("+-*")
        if bad:
            raise ValueError(f"operators: unknown {sorted(bad)}; known: + - *")
        return self


class DataConfig(Section):
    """Stage 'prepare': which problems are used for training and evaluation."""

    train: list[SourceSpec] = Field(description="Training problem sources.")
    eval: list[SourceSpec] = Field(description="Evaluation benchmarks, each with its own k.")
    synthetic: SyntheticTaskConfig = Field(
        default_factory=SyntheticTaskConfig, description="The embedded task, used by 'synthetic' sources."
    )
    max_prompt_tokens: int = Field(
        default=1024, ge=1, description="Prompts longer than this after templating are dropped (spec §2.2)."
    )
    overlong_prompts: Literal["drop", "error"] = Field(
        default="drop",
        description="'drop' prompts over max_prompt_tokens as verl's filter_overlong_prompts does (spec §2.2), or "
        "'error': stop at the first one, naming its row (data that must arrive whole).",
    )
    prompt_suffix: str = Field(
        default=" Let's think step by step and output the final answer within \\boxed{}.",
        description="Appended to jsonl/HF questions (spec §2.4). verl parquet prompts already carry it.",
    )


class TinyModelConfig(Section):
    """Architecture of the embedded default model (a tiny Qwen2, built from config, no download)."""

    hidden_size: int = Field(default=128, ge=8, description="Model width.")
    num_layers: int = Field(default=4, ge=1, description="Transformer blocks (FCI maximises over all of them, §5.2).")
    num_heads: int = Field(default=4, ge=1, description="Query heads per layer; divides hidden_size.")
    num_kv_heads: int = Field(default=4, ge=1, description="Grouped-query attention KV heads; divides num_heads.")
    intermediate_size: int = Field(default=512, ge=8, description="MLP width.")
    max_position_embeddings: int = Field(default=256, ge=16, description="Longest prompt + response, in tokens.")

    @model_validator(mode="after")
    def _check(self) -> TinyModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_kv_heads must divide num_heads")
        if self.hidden_size % self.num_heads:
            raise ValueError("num_heads must divide hidden_size")
        return self


class ModelConfig(Section):
    """The policy model."""

    path: str | None = Field(
        default=None,
        description="Local directory of a Hugging Face causal LM (for example a downloaded "
        "DeepSeek-R1-Distill-Qwen-1.5B). null = build the tiny default model and warm it up.",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Used when path is null.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="bfloat16", description="Weights dtype; the tiny preset uses float32 on CPU."
    )
    device: str = Field(default="auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N'.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention"] = Field(
        default="auto",
        description="Attention kernel of the trainer's reference pass and update (the scoring pass swaps in the FCI "
        "kernel). 'auto' = 'flex_attention' on CUDA: packed sequences (train.packing) through a block-sparse "
        "document mask that transformers builds from the restarting position ids, compiled by torch, nothing to "
        "install (flash-attn is source-only on the package index, and vLLM's varlen kernels have no backward); "
        "'sdpa' on CPU, where FlexAttention has no backward.",
    )


class WarmupConfig(Section):
    """Stage 'warmup': supervised fine-tuning of the tiny model on reference solutions.

    Real runs start from a trained checkpoint and set ``enabled: false``.
    """

    enabled: bool = Field(default=False, description="Run SFT before RL (tiny default: true).")
    steps: int = Field(default=1500, ge=1, description="Optimizer steps.")
    batch_size: int = Field(default=32, ge=1, description="Sequences per optimizer step.")
    lr: float = Field(default=1e-3, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(default=50, ge=0, description="Linear learning-rate warm-up steps.")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Cosine decay floor as a fraction of lr.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient-norm clip.")
    teacher_error_rate: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Chance that a step of a reference solution carries a wrong value (the chain then goes on "
        "from it), as if distilled from a fallible teacher. The tiny preset uses it so the warmed-up policy "
        "solves some problems but not all, leaving room for RL.",
    )
    threads: int = Field(default=2, ge=1, description="torch CPU threads for the warmup.")
    log_every: int = Field(default=100, ge=1, description="Steps per row of the loss history (warmup metrics).")


class DifficultyConfig(Section):
    """Stage 'difficulty': per-problem pass rate and mean FCI under the initial policy (spec §7).

    Problems never or always solved carry no advantage for any method; dropping them before
    training spends the RL budget where it can learn. The mean FCI of the always-solved problems
    seeds the ADS running mean of the easy filter (spec §7.2).
    """

    enabled: bool = Field(default=False, description="Run the stage and train on the problems it keeps.")
    samples_per_problem: int = Field(default=6, ge=1, description="k samples per problem (training sampling settings).")
    max_problems: int | None = Field(
        default=None, ge=1, description="Estimate only this many training problems (a seeded random subset)."
    )
    min_pass_rate: float = Field(
        default=0.0, ge=0, lt=1, description="Keep problems whose pass rate is above this (0 drops never-solved)."
    )
    max_pass_rate: float = Field(
        default=1.0, gt=0, le=1, description="Keep problems whose pass rate is below this (1 drops always-solved)."
    )


class RewardConfig(Section):
    """The verifier (spec §8)."""

    timeout_s: float = Field(default=5.0, gt=0, description="Hard limit per response (spec §8: 5 s).")
    workers: int = Field(default=1, ge=1, description="Grading subprocesses for the math-verify path.")


class EvalConfig(Section):
    """Stage 'evaluate' (spec §14). Benchmarks come from data.eval, each with its k."""

    temperature: float = Field(default=0.6, gt=0, description="Spec §14 / AMBIG-10: 0.6 (script), unstated in paper.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Spec §14: 1.0.")
    max_new_tokens: int = Field(default=32768, ge=1, description="Spec §14: 32,768 for final evaluation.")


class AlgorithmConfig(Section):
    """The RL method (spec §4–§11, §13). Paper-vs-code choices name their AMBIG entry."""

    method: Literal["attnrl", "treerl", "grpo"] = Field(
        default="attnrl", description="Method preset label recorded with results."
    )
    advantage: Literal["tree", "grpo"] = Field(
        default="tree", description="Advantage estimator: tree MC values (§9) or GRPO group normalisation (§13.1)."
    )
    branching: Literal["fci", "entropy", "random", "none"] = Field(
        default="fci", description="Branch-point criterion (spec §6; 'entropy' = TreeRL §6.6, 'none' = GRPO)."
    )
    num_branch_points: int = Field(default=2, ge=1, description="N branch points per expanded response (§6.2).")
    continuations_per_branch: int = Field(default=2, ge=1, description="T continuations per branch point (§6.4).")
    fci_delta: int = Field(default=4, ge=1, description="Δ: only steps at least Δ later count toward FCI (§5.2).")
    fci_quantile: float = Field(
        default=0.8, gt=0, lt=1, description="Candidate threshold quantile; 0.8 = top 20% (AMBIG-3: paper writes ρ=0.2)."
    )
    fci_mask_first_step: bool = Field(default=True, description="Zero FCI of the first response step (AMBIG-4: code only).")
    fci_mask_after_think: bool = Field(
        default=True, description="Zero FCI of the </think> step and later (AMBIG-4: code only)."
    )
    step_attention: Literal["mean_mean", "mean_sum"] = Field(
        default="mean_mean",
        description="Step-to-step attention: mean over query × mean over key tokens (code), or mean over "
        "query × sum over key tokens (attention mass). AMBIG-5; default follows the code.",
    )
    min_branch_position: int = Field(
        default=512, ge=0, description="Branch steps start at absolute token position >= this (§6.2, code only)."
    )
    min_branch_spacing: int = Field(
        default=512, ge=0, description="Token gap between accepted branch steps (§6.2, code only)."
    )
    expansion: Literal["adaptive", "uniform"] = Field(
        default="adaptive", description="ADS trees per problem (§7.3) or all responses ('uniform', TreeRL)."
    )
    tree_count_rounding: Literal["ceil", "round"] = Field(
        default="ceil", description="num_trees = ceil (code) or round (paper Eq. 9) of n·exp(−z). AMBIG-1."
    )
    easy_filter: Literal["all_correct", "all", "off"] = Field(
        default="all_correct",
        description="Attention-based easy filter applies to all-correct problems only (code), to every "
        "problem (paper Eq. 8), or is off. AMBIG-2.",
    )
    zero_advantage_filter: bool = Field(default=True, description="Drop questions whose leaves share one reward (§7.6).")
    adaptive_batch: bool = Field(default=True, description="Adapt the prompt batch size (§7.5).")
    prompt_batch_size: int = Field(default=64, ge=1, description="Initial prompts per step (§12).")
    target_train_sequences: int | None = Field(
        default=None,
        ge=1,
        description="B' of §7.5; null = prompt_batch_size × n × (1 + N·T), the code's 64·6·5 = 1920.",
    )
    batch_ema_lambda: float = Field(default=0.9, ge=0, le=1, description="λ of §7.5.")
    batch_size_rounding: Literal["ceil", "round"] = Field(
        default="ceil", description="§7.5 update rounding: ceil (code) or round (paper Eq. 10). AMBIG-1."
    )
    off_policy: bool = Field(default=True, description="One-step off-policy loop (§3.2) vs two-step on-policy (§3.1).")
    clip_low: float = Field(default=0.2, gt=0, lt=1, description="PPO ε_low (§11).")
    clip_high: float = Field(default=0.28, gt=0, description="PPO clip-higher ε_high (§11).")
    dual_clip: float = Field(default=3.0, gt=1, description="Dual-clip c for negative advantages (§11).")
    kl_coef: float = Field(default=0.001, ge=0, description="k3 KL-to-reference loss weight (§11).")
    entropy_coef: float = Field(default=0.0, ge=0, description="Entropy bonus weight (§11: 0).")
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean"] = Field(
        default="token_mean", description="Token-mean (code, all methods) or per-sequence mean (paper Eq. 1). AMBIG-11."
    )


class TrainConfig(Section):
    """Stage 'train': optimisation of the policy (spec §11, §12)."""

    steps: int = Field(default=500, ge=1, description="Training steps (spec §15.3: 500 for AttnRL).")
    max_rounds_without_update: int = Field(
        default=20,
        ge=1,
        description="Generation rounds in a row that leave nothing to train on (every question filtered out, §7.6: "
        "a policy that solves or fails everything) before the run stops with an error instead of sampling forever. "
        "Such a round updates nothing, does not count as a step and writes no checkpoint.",
    )
    lr: float = Field(default=1e-6, gt=0, description="AdamW learning rate, constant (§11).")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay (§11: 0.01).")
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient-norm clip (§11: 1.0).")
    mini_batch_sequences: int = Field(default=192, ge=1, description="Sequences per optimizer step (§11).")
    max_tokens_per_micro_batch: int = Field(
        default=36864,
        ge=1,
        description="Token budget of one forward (scoring, reference and update passes), in token slots: rows × "
        "longest row when left-padded, the packed total when padding-free. Consecutive sequences share a "
        "micro-batch up to it; a longer sequence forms its own. Gradients accumulate to the mini-batch, whose "
        "loss stays the exact token mean (spec §12: dynamic micro-batching, 36,864 tokens per GPU, train and "
        "log-prob).",
    )
    logits_chunk_tokens: int = Field(
        default=1024,
        ge=1,
        description="Response positions whose logits exist at once: the LM head runs over the gathered hidden "
        "states in chunks of this many tokens, and with gradients each chunk is recomputed in the backward. "
        "Bounds logit memory to chunk × vocabulary × 4 bytes (1024 × 151,936 × 4 B = 0.6 GB for "
        "R1-Distill) instead of micro-batch tokens × vocabulary (verl's chunked entropy, OpenRLHF's chunked "
        "logsumexp).",
    )
    gradient_checkpointing: bool = Field(
        default=True,
        description="Recompute each decoder layer's activations in the backward (non-reentrant) instead of "
        "keeping them: activation memory of the update drops from O(layers × tokens × hidden × k) to one layer's "
        "(spec §11: the official run trains with gradient checkpointing). Gradients are unchanged.",
    )
    packing: Literal["auto", "padding_free", "left_padded"] = Field(
        default="auto",
        description="Micro-batch layout. 'padding_free': sequences concatenated in one row with restarting "
        "position ids (spec §5.1: use_remove_padding); 'left_padded': rows padded on the left to the longest "
        "(the rollout engine's layout); 'auto': padding-free where the attention kernel is varlen "
        "(flash_attention_2/3), left-padded otherwise, because transformers gives SDPA and eager a dense "
        "block-diagonal [total, total] mask over a packed row, whose cost grows with the square of the total "
        "instead of rows × longest².",
    )
    tree_packing: bool = Field(
        default=False,
        description="Merge the sequences of every pass (the continuations' behaviour pass, the reference pass, "
        "the update) into prefix trees: a token shared by several paths (the prompt, the prefix a continuation "
        "branched from) goes through the model once, and its loss is the sum of those paths' terms, so loss and "
        "gradient equal per-path training (attnrl/training/prefix_tree.py). sdpa and eager run it segment by "
        "segment (attnrl/training/tree_attention.py), flex_attention through a block mask; with flash attention the "
        "passes fall back to train.packing with a warning. The micro-batch budget counts distinct tokens; in a "
        "trainer group a prompt's sequences stay on one rank. Off by default: on the long-prefix shape it needs more "
        "memory than per-path training (docs/method.md, 'Tree-packed training'), and it has not run on a GPU.",
    )
    backend: Literal["deepspeed", "torch"] = Field(
        default="deepspeed", description="Optimizer backend: DeepSpeed engine (infra/) or plain torch AdamW."
    )
    zero_stage: int = Field(
        default=3,
        ge=0,
        le=3,
        description="DeepSpeed ZeRO stage: 0 none, 1 optimizer state, 2 + gradients, 3 + parameters partitioned "
        "over data-parallel ranks (spec §11: the official run shards everything with FSDP2, i.e. stage 3). "
        "Under stage 3 the trainer gathers parameters for weight export and checkpoints.",
    )
    reference_offload: bool = Field(
        default=True,
        description="deepspeed backend: keep the frozen reference model's parameters in CPU memory, streamed to "
        "the device layer by layer for the reference pass (a ZeRO-3 inference engine; spec §11: 'Ref model on "
        "FSDP2 with parameter offload'). False keeps them on the device (still partitioned over ranks).",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto",
        description="Compute precision: 'bf16', 'fp32', or 'auto' = bf16 where the device supports it (CUDA). "
        "torch backend: bf16 autocast over fp32 weights and gradients. deepspeed backend, ZeRO 1-3: DeepSpeed bf16 "
        "(bf16 weights and activations, fp32 master weights, optimizer state and gradient accumulation); ZeRO 0: "
        "as the torch backend (DeepSpeed 0.19 cannot accumulate bf16 gradients in fp32 at stage 0).",
    )
    max_generated_tokens: int | None = Field(
        default=None, ge=1, description="Stop once this many tokens were generated (equal budgets across methods)."
    )
    save_every: int = Field(default=10, ge=1, description="Checkpoint every N steps (§12 save_freq).")
    keep_checkpoints: int = Field(default=2, ge=1, description="Most recent checkpoints kept on disk.")


class PathsConfig(Section):
    """Where each stage writes (relative paths are relative to the working directory)."""

    data_dir: str = Field(default="data", description="Prepared problems: {data_dir}/prepared/{train,eval}.parquet.")
    models_dir: str = Field(default="models", description="Initial policy: {models_dir}/init/.")
    runs_dir: str = Field(default="runs", description="Training and evaluation runs.")
    reports_dir: str = Field(default="reports", description="HTML report and plots.")


class ChecksConfig(Section):
    """Data checks between stages (Great Expectations gates, ``infra/data_gates.py``)."""

    enabled: bool = Field(default=True, description="Run the gates after each stage and on each training batch.")
    data_docs_dir: str = Field(
        default="runs/data-checks",
        description="The project's file-backed GX context (gx/: suites, checkpoints, every validation result) and "
                    "its Data Docs (index.html), which list every gate run.",
    )
    rollout_every: int = Field(
        default=1, ge=1, description="Validate the rollout batch of every N-th training step (1 = every step)."
    )
    min_nonzero_advantage_ratio: float = Field(
        default=0.0, ge=0, le=1,
        description="Least fraction of a training batch's paths with a non-zero advantage somewhere.",
    )


class ReportConfig(Section):
    """Stage 'report': what it shows besides the curves and the evaluation table."""

    trace_problems: int = Field(
        default=3, ge=0,
        description="Held-out problems (of the first benchmark, highest level and disagreeing samples first) on which the report shows "
        "the method at work: FCI per step, branch points, the tree's values and advantages (0: none).",
    )
    results_dir: str = Field(
        default="benchmarks/results",
        description="The research benchmarks' JSON results (benchmarks/*.py), rendered as the paper's tables and "
        "figures in the report's research section; relative to the project root. Absent: the section says so.",
    )


class TimeoutsConfig(Section):
    """The longest each stage's task may run (seconds; null: no bound). Past it Prefect fails the task
    run (TaskRunTimeoutError); the stage's task retries apply, each attempt bounded again. Prefect
    interrupts a blocking call with SIGALRM when the flow runs in its process's main thread (the CLI, a
    deployment's worker subprocess) and nothing else holds that signal. Ray calls inside a stage have
    their own bounds (``rollout.ray.call_timeout_s``, ``distributed.call_timeout_s``)."""

    prepare_s: float | None = Field(default=3600, gt=0, description="Stage 'prepare'.")
    warmup_s: float | None = Field(default=6 * 3600, gt=0, description="Stage 'warmup'.")
    difficulty_s: float | None = Field(default=6 * 3600, gt=0, description="Stage 'difficulty'.")
    train_s: float | None = Field(default=7 * 24 * 3600, gt=0, description="Stage 'train' (the whole run).")
    evaluate_s: float | None = Field(default=6 * 3600, gt=0, description="Stage 'evaluate' (each evaluation).")
    report_s: float | None = Field(default=3600, gt=0, description="Stage 'report'.")
    workspace_wait_s: float | None = Field(
        default=24 * 3600, gt=0,
        description="How long a run waits for another run on the same root to finish (flows/workspace.py).")


LAYOUT_ERROR = "layout: "  # how a broken layout's message starts (one line, the fields named)


class RunConfig(Section):
    """Everything one run reads. Serialised as params.yaml, grouped by stage."""

    seed: int = Field(default=1, description="Master seed; every RNG seed is derived from it (spec §12: data.seed=1).")
    paths: PathsConfig = Field(default_factory=PathsConfig, description="Output locations.")
    data: DataConfig = Field(description="Stage 'prepare'.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The policy.")
    warmup: WarmupConfig = Field(default_factory=WarmupConfig, description="Stage 'warmup'.")
    difficulty: DifficultyConfig = Field(default_factory=DifficultyConfig, description="Stage 'difficulty'.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Generation.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Grading.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Stage 'evaluate'.")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="The RL method.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Stage 'train'.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Stage 'train' on a Ray actor group of DeepSpeed ranks."
    )
    checks: ChecksConfig = Field(default_factory=ChecksConfig, description="Data checks between stages.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="Stage 'report'.")
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig, description="Bounds on each stage's task.")

    @model_validator(mode="after")
    def _layout(self) -> RunConfig:
        """Trainer ranks, engines, GPUs and the weight sync must fit together (``attnrl.config.layout``)."""
        if problems := layout_problems(self):
            raise ValueError(LAYOUT_ERROR + "; ".join(problems))
        return self

    @model_validator(mode="after")
    def _engine_length(self) -> RunConfig:
        """A configured ``rollout.vllm.max_model_len`` holds a prompt and the longest response any stage asks the
        engines for (training and difficulty: ``rollout.sampling.max_new_tokens``; evaluation: ``eval.max_new_tokens``)."""
        configured = self.rollout.vllm.max_model_len
        if configured is None or self.rollout.engine != "vllm":
            return self
        limits = {"rollout.sampling.max_new_tokens": self.rollout.sampling.max_new_tokens,
                  "eval.max_new_tokens": self.eval.max_new_tokens}
        field, longest = max(limits.items(), key=lambda item: item[1])
        needed = self.data.max_prompt_tokens + longest
        if configured < needed:
            raise ValueError(f"rollout.vllm.max_model_len: {configured} is below data.max_prompt_tokens + {field} "
                             f"({self.data.max_prompt_tokens} + {longest} = {needed}); raise it or leave it null")
        return self
