"""config.py — every setting of a run: the Config dataclass (the paper's value beside each default), the
presets that fill it, and the checks that reject impossible values. azr.py's parse_args builds it from
flags."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import model as models
from buffers import SeedFileError, read_seed_file
from generation import SAMPLING_WEIGHTS
from prompts import DEFAULT_TEMPLATE, PROPOSER_PROMPTS, TEMPLATES
from rewards import BUILTIN_TASK_TYPES, TASK_TYPES


def option(default: Any, help: str) -> Any:
    """A Config field: its default (a list is copied for each Config) and its one-line --help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


SEED_DIR = Path(__file__).resolve().parent / "data" / "azr-seeds"
SEED_FILES = (str(SEED_DIR / "3b_coder_seed_io.jsonl"), str(SEED_DIR / "3b_coder_code_f_seed_io.jsonl"))
GPU_PRESETS = {"gpu-80gb": 80, "gpu-48gb": 48, "gpu-24gb": 24}   # largest first: the card each is planned for


@dataclass
class Config:
    """One run's settings, with the paper's value in each help. Presets fill it; flags override."""
    # model
    model: str = option(models.DEFAULT_MODEL, "hub id, HF folder or .gguf (paper: Qwen2.5-Coder-3B/7B/14B)")
    load_in_4bit: bool = option(False, "4-bit NF4 base weights, QLoRA (paper: full fine-tuning)")
    dtype: str = option("auto", "auto|bf16|fp16|fp32 (auto: bf16 where GPU or CPU has it natively, else fp16 or fp32)")
    lora_r: int = option(16, "LoRA rank (paper: full fine-tuning)")
    lora_alpha: int = option(32, "LoRA alpha")
    gradient_checkpointing: bool = option(True, "recompute activations in the backward to save memory")
    checkpoint_above_positions: int = option(0, "without --gradient-checkpointing: recompute them only for update "
                                                "micro-batches longer than this (0: never)")
    # run
    output_dir: str = option("runs/azr", "run directory: metrics, samples, plot, checkpoint")
    seed: int = option(0, "random seed (python, torch)")
    num_iterations: int = option(100, "iterations of the run; --resume with more extends it")
    checkpoint_every: int = option(1, "checkpoint every this many iterations, and at the end")
    # self-play
    task_types: list[str] = option(list(BUILTIN_TASK_TYPES), "any subset of deduction abduction induction")
    task_distribution: list[float] = option([], "proposal probability per task type (default uniform)")
    tasks_per_iteration: int = option(192, "proposals per iteration, all task types (paper: 64 per type)")
    num_references: int = option(6, "K reference tasks shown to the proposer (paper: 6)")
    learnability_samples: int = option(8, "N solver samples per proposal for learnability (paper: 8)")
    induction_inputs: int = option(10, "inputs an induction proposal writes, half held out (paper: 10)")
    seed_buffer_size: int = option(256, "tasks per buffer before training, no gradient (paper: 256)")
    seed_file: list[str] = option([], "JSONL seed tasks in the official formats, re-validated")
    buffer_capacity: int = option(10_000, "tasks kept per buffer")
    strict_proposals: bool = option(False, "also reject trivial and non-literal tasks (official: admits)")
    force_accept_tasks: bool = option(False, "warm-up: admit proposals that fail only the strict checks")
    lenient_answers: bool = option(False, "warm-up: parse answers leniently, with no format penalty")
    force_accept_threshold: int = option(50, "the warm-up lasts while iteration < this")
    proposer_extreme_reward: float = option(-0.5, "reward at solve rate 0 or 1 (paper: 0; official: -0.5)")
    train_proposer: bool = option(True, "update on proposer samples too (off: solver-only ablation)")
    # generation
    template: str = option(DEFAULT_TEMPLATE, "prompt template: r1 (AZR's) or chat (the tokenizer's)")
    temperature: float = option(1.0, "sampling temperature of all rollouts (paper: 1.0)")
    top_p: float = option(1.0, "nucleus sampling of all rollouts (paper: 1.0)")
    proposer_prompt: str = option("official", "proposer prompt: official, or compact for small models")
    max_new_tokens_propose: int = option(1024, "response cap of proposer rollouts")
    max_new_tokens_solve: int = option(1024, "response cap of solver rollouts")
    generation_batch_size: int = option(64, "sequences generated together")
    sampling_weights: str = option("auto", "auto|int8|policy: int8 linear layers for sampling (auto: on a CPU "
                                           "in fp32, 2-3x faster decode; the update always uses the policy)")
    # update (TRR++)
    learning_rate: float = option(1e-5, "AdamW learning rate (paper: 1e-6, full fine-tuning)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    clip_ratio: float = option(0.2, "PPO clip epsilon (paper: 0.2)")
    entropy_coef: float = option(0.0, "entropy bonus (paper: 0; 0.001 in an ablation)")
    kl_coef: float = option(0.0, "k3 KL penalty to the adapter-free model (paper: off)")
    ppo_epochs: int = option(1, "passes over the iteration's batch")
    mini_batches: int = option(3, "optimizer steps per pass, one per mini-batch (official: 3)")
    micro_batch_size: int = option(4, "sequences per forward and backward")
    max_grad_norm: float = option(1.0, "gradient clipping (paper: 1.0)")
    # sandbox
    sandbox_timeout: float = option(5.0, "seconds per program run")
    sandbox_memory_mb: int = option(1024, "address-space limit per program run")
    # logging
    samples_per_group: int = option(2, "examples per (task type, role) in samples.jsonl per iteration")
    report_to: str = option("none", "also log to: none, wandb, tensorboard")
    eval_every: int = option(0, "evaluate CRUXEval-O every this many iterations (0: never)")
    eval_limit: int = option(50, "held-out CRUXEval items per evaluation")
    eval_data: str = option(str(Path(__file__).resolve().parent / "data/cruxeval/cruxeval.jsonl"),
                            "CRUXEval JSONL for --eval-every")


PRESETS: dict[str, dict[str, Any]] = {
    # The 2-core CPU: small batches, short responses, the compact proposer prompt for the 0.5B default model.
    # Its values were chosen in learning runs and benchmarks (docs/LOG.md).
    "cpu-demo": dict(num_iterations=5, tasks_per_iteration=12, num_references=2, learnability_samples=4,
                     learning_rate=5e-5, seed_buffer_size=1, max_new_tokens_propose=384,
                     max_new_tokens_solve=256, proposer_prompt="compact", induction_inputs=4,
                     generation_batch_size=32, micro_batch_size=1, mini_batches=2,
                     gradient_checkpointing=False, checkpoint_above_positions=768, output_dir="runs/cpu-demo"),
    # One CUDA GPU: python azr.py picks the largest whose memory plan (memory.py) fits the card.
    # 4-bit Qwen2.5-Coder with LoRA and bf16 compute, seeded from the official (3B) seed files.
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
    weights = cfg.task_distribution
    if weights and (len(weights) != len(cfg.task_types) or min(weights) < 0 or sum(weights) <= 0):
        raise ConfigError("--task-distribution needs one non-negative weight per task type, not all zero")
    positive = ["num_iterations", "tasks_per_iteration", "learnability_samples", "max_new_tokens_propose",
                "max_new_tokens_solve", "generation_batch_size", "micro_batch_size", "ppo_epochs",
                "mini_batches", "lora_r", "checkpoint_every", "buffer_capacity"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{flag(name)} must be at least 1, got {getattr(cfg, name)}")
    if cfg.induction_inputs < 2:
        raise ConfigError(f"--induction-inputs must be at least 2, got {cfg.induction_inputs}")
    for name in ("num_references", "seed_buffer_size", "eval_every", "eval_limit", "force_accept_threshold",
                 "checkpoint_above_positions"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{flag(name)} must not be negative, got {getattr(cfg, name)}")
    for name in ("temperature", "learning_rate", "sandbox_timeout", "clip_ratio", "max_grad_norm"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{flag(name)} must be positive, got {getattr(cfg, name)}")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if cfg.proposer_prompt not in PROPOSER_PROMPTS:
        raise ConfigError(f"--proposer-prompt must be one of {' '.join(PROPOSER_PROMPTS)}, "
                          f"got {cfg.proposer_prompt}")
    if cfg.dtype not in models.DTYPES:
        raise ConfigError(f"--dtype must be one of {' '.join(models.DTYPES)}, got {cfg.dtype}")
    if cfg.sampling_weights not in SAMPLING_WEIGHTS:
        raise ConfigError(f"--sampling-weights must be one of {' '.join(SAMPLING_WEIGHTS)}, "
                          f"got {cfg.sampling_weights}")
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
