"""azr.py — Absolute Zero Reasoner self-play (arXiv 2505.03335) on one GPU or a CPU.

One model plays two roles on Python code tasks. Each iteration (the paper's Algorithm 1):

    1. propose  deduction / abduction / induction tasks from K references sampled from the buffers
    2. validate them by executing them in the sandbox (syntax, forbidden modules, determinism)
    3. learnability: N solver samples per valid task -> proposer reward 1 - mean solve rate
    4. solve    a batch per task type (this iteration's new tasks first)  -> solver reward
                (steps 3 and 4 share one generation pass: repeated prompts are prefilled once)
    5. TRR++    advantages normalised per (task type, role), one PPO-style clipped update
    6. admit    the valid tasks to the buffers (after the update, as the official code does); log; checkpoint

    python azr.py                                   # cpu-demo preset on a CPU, the default model
    python azr.py --iterations 50 --task-types deduction abduction
    python azr.py --resume runs/azr --iterations 30 # extend a finished run to 30 iterations
    python azr.py --help                            # every knob, with the paper's values
    accelerate launch --multi_gpu --num_processes 4 azr.py ...   # data parallel over 4 GPUs (see README)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import random
import re
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from accelerate import PartialState
from accelerate.utils import gather_object, reduce

import memory
import model as models
import runlog
from buffers import Buffers, Task, read_seed_file
from config import GPU_PRESETS, PRESETS, Config, ConfigError, check_config, flag
from generation import GenerationStats, generate, use_int8
from memory import LOGITS_CHUNK_TOKENS  # azr.LOGITS_CHUNK_TOKENS: tests set it
from prompts import RESPONSE_PREFIX, Proposal, rename_entry, render
from rewards import (
    INVALID_PROPOSAL_REWARD,
    ValidationResult,
    check_answers,
    parse_answer,
    parse_proposal,
    propose_prompt,
    proposer_reward,
    seed_task,
    solve_prompt,
    solver_reward,
    validate_proposals,
)
from sandbox import Sandbox

@dataclass
class Launch:
    """How azr.py was started, beyond the Config: the preset, --plan, and the GPU memory it plans for."""
    preset: str | None            # None on --resume: the checkpoint's config
    plan_only: bool               # --plan: print the memory plan and exit
    card_gib: float | None        # --gpu-memory-gib, else the free memory of the CUDA GPU found; None on a CPU


def parse_args(argv: list[str] | None = None) -> tuple[Config, str | None, Launch]:
    """Build the Config: dataclass defaults < preset < checkpoint's config (on --resume) < explicit flags. Without
    --preset: on a CUDA GPU (or with --gpu-memory-gib) the largest GPU preset whose plan fits, else cpu-demo."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="cpu-demo (default without CUDA); with CUDA the default is the largest GPU preset "
                             "whose memory plan fits the card (see --plan)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--plan", action="store_true",
                        help="print the preset, the model and the memory plan, then exit: 0 if it fits the GPU, "
                             "2 if not")
    parser.add_argument("--gpu-memory-gib", type=float, metavar="N",
                        help="plan for a GPU of N GiB (any machine, a CPU included) instead of the GPU found")
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        presets = "".join(f"; {name}: {values[f.name]}" for name, values in PRESETS.items() if f.name in values)
        kwargs: dict[str, Any] = {"help": f"{f.metadata['help']} (default: {default}{presets})", "dest": f.name}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kwargs.update(nargs="+", type=float if f.name == "task_distribution" else str)
        else:
            kwargs["type"] = type(default)
        names = list(dict.fromkeys([flag(f.name), "--" + f.name.replace("_", "-")]))   # --iterations, --num-iterations
        parser.add_argument(*names, **kwargs)
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume", None)
    plan_only = args.pop("plan", False)
    card = args.pop("gpu_memory_gib", None)
    if card is not None and not card > 0:
        raise ConfigError(f"--gpu-memory-gib must be positive, got {card}")
    if card is None and torch.cuda.is_available():
        card = cuda_free_gib()
    preset = None
    if resume:
        saved = runlog.load_json(runlog.find_checkpoint(Path(resume)) / "state.json")["config"]
        unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(Config)})
        if unknown:     # e.g. a run saved before an option was renamed
            raise ConfigError(f"--resume {resume}: the checkpoint's config has options this version does not know: "
                              f"{' '.join(unknown)}")
        values = {**saved, "output_dir": resume, **args}
    else:
        preset = args.pop("preset", None) or ("cpu-demo" if card is None else fitting_preset(args, card))
        values = {**PRESETS[preset], **args}
    cfg = Config(**values)
    check_config(cfg)
    return cfg, resume, Launch(preset, plan_only, card)


# ----------------------------------------------------------------------------------------------------------
# GPU memory: the plan of a run (memory.py), from the model's config.json alone, checked before a model loads.
def cuda_free_gib() -> float:
    """Free memory of this process's CUDA GPU, in GiB."""
    free, _ = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")))
    return free / memory.GIB


def fitting_preset(flags: dict[str, Any], card_gib: float) -> str:
    """The largest GPU preset whose plan, with these flags, leaves memory.MIN_HEADROOM of the card free; else the
    smallest (whose plan then reports that it does not fit)."""
    for name in GPU_PRESETS:
        if memory_plan(Config(**{**PRESETS[name], **flags})).headroom(card_gib) >= memory.MIN_HEADROOM:
            return name
    return name


def model_shape(name: str) -> memory.Shape:
    """The model's sizes from its config.json: the shipped one (data/model-configs/), a local folder's, or the hub's."""
    if name in (models.DEFAULT_MODEL, "default"):     # its GGUF, converted, has an LM head apart from the embedding
        return dataclasses.replace(memory.load_shape(memory.shipped_config("Qwen2.5-Coder-0.5B-Instruct")), tied=False)
    path = Path(name).expanduser()
    if (path / "config.json").is_file() or (path.is_file() and path.suffix == ".json"):
        return memory.load_shape(path)
    if shipped := memory.shipped_config(name):
        return memory.load_shape(shipped)
    try:
        from transformers import AutoConfig
        if path.suffix.lower() == ".gguf":
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            config = AutoConfig.from_pretrained(name)
        return memory.Shape.from_config(config.to_dict())
    except Exception as e:
        raise ConfigError(f"cannot plan the memory of --model {name}: no config.json found ({type(e).__name__}); "
                          f"give a local model folder") from None


def plan_dtype(cfg: Config) -> str:
    """The compute dtype the run will use on its GPU (auto: bf16 where native; bf16 when planning without one)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    if torch.cuda.is_available():
        return "bf16" if models.native_bf16() else "fp16"
    return "bf16"


def memory_plan(cfg: Config, shape: memory.Shape | None = None) -> memory.Plan:
    """The plan of a run of cfg, for its --model's shape unless another is given."""
    return memory.plan(shape or model_shape(cfg.model), load_in_4bit=cfg.load_in_4bit, dtype=plan_dtype(cfg),
                       lora_r=cfg.lora_r, generation_batch_size=cfg.generation_batch_size,
                       micro_batch_size=cfg.micro_batch_size,
                       max_new_tokens=max(cfg.max_new_tokens_propose, cfg.max_new_tokens_solve),
                       num_references=cfg.num_references, gradient_checkpointing=cfg.gradient_checkpointing)


def check_memory(cfg: Config, launch: Launch) -> None:
    """Print the memory plan; a ConfigError (one line, naming the flags to lower) if it does not fit the card."""
    plan = memory_plan(cfg)
    log(f"azr: memory plan: preset {launch.preset or 'from the checkpoint'}, model {cfg.model}, {plan_dtype(cfg)}"
        f"{' 4-bit NF4' if cfg.load_in_4bit else ''} + LoRA r={cfg.lora_r}, generation {cfg.generation_batch_size} "
        f"rows, update micro-batch {cfg.micro_batch_size}, gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}\n{plan.table(launch.card_gib)}")
    if launch.card_gib is not None and not plan.fits(launch.card_gib):
        raise ConfigError(f"the memory plan needs {plan.peak / memory.GIB:.1f} GiB but the GPU has "
                          f"{launch.card_gib:.1f} GiB: lower --generation-batch-size, --max-new-tokens-propose, "
                          f"--max-new-tokens-solve or --micro-batch-size, or choose a smaller --model")


# ----------------------------------------------------------------------------------------------------------
# Data parallel (`accelerate launch`): every process holds the same buffers and draws the same python RNG
# stream. Each generates and executes its share of every batch and all receive every result, in order, so all
# take identical decisions (validity, rewards, buffer contents); in the update each backpropagates its share of
# a mini-batch and the gradients are summed. With a single process each of these steps is the identity.
def processes() -> PartialState:
    """This process's place among the launched ones; the first call joins their group (gloo on CPU, nccl on CUDA),
    with a long timeout: a process may wait while another finishes a slow generation or evaluation."""
    return PartialState(cpu=models.pick_device() == "cpu", timeout=datetime.timedelta(hours=2))


def shard(items: list) -> list:
    """This process's share: every num_processes-th item from its index (alike in length and cost)."""
    state = PartialState()
    return items[state.process_index::state.num_processes]


def gather(share: list) -> list:
    """Inverse of shard, on every process: all processes' shares back in the original order."""
    parts = gather_object([share])
    return [parts[i % len(parts)][i // len(parts)] for i in range(sum(len(p) for p in parts))]


class ShardedSandbox:
    """A Sandbox whose run_many spreads the jobs over the processes: each runs its share on its own workers
    and every process receives all results (identical everywhere, even if a run times out on one)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox, self.forbidden_modules = sandbox, sandbox.forbidden_modules

    def run_many(self, jobs: list[tuple[str, str]], repeats: int = 1) -> list:
        return gather(self.sandbox.run_many(shard(jobs), repeats=repeats))


# ----------------------------------------------------------------------------------------------------------
# Rollouts: one sampled response each, a row of the policy-gradient batch.
@dataclass
class Rollout:
    """One sampled response: a row of the policy-gradient batch."""
    task_type: str
    role: str                      # 'propose' or 'solve'
    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]
    response: str
    truncated: bool = False        # hit the token cap
    reward: float = 0.0
    advantage: float = 0.0
    well_formatted: bool = False   # the response parsed in the form the prompt asked for
    validation: ValidationResult | None = None    # a proposal: the sandbox's verdict; valid if it holds a task
    solve_rate: float | None = None               # a proposal: its learnability estimate, if one was taken
    correct: bool = False                         # an answer: right for its task

    @property
    def text(self) -> str:
        """The response as the parsers see it: with the "<think>" the template put before it."""
        return RESPONSE_PREFIX + self.response

    def outcome(self) -> dict:
        """The verdict on the response, as samples.jsonl logs it."""
        if self.role == "solve":
            return {"correct": self.correct, "well_formatted": self.well_formatted}
        v = self.validation
        return {"valid": v.valid, "reason": v.reason, "hard": v.hard, "force_accepted": v.force_accepted,
                "well_formatted": self.well_formatted, "solve_rate": self.solve_rate}


def rollouts(policy, tokenizer, jobs: list[tuple[str, str, str]], max_new_tokens: int, cfg: Config, desc: str,
             timer: "Timer") -> list[Rollout]:
    """jobs = (task_type, role, prompt text) -> one Rollout each, prompts rendered with cfg.template.
    With several processes each generates its share and every process receives all of them."""
    prompts = [render(tokenizer, text, cfg.template) for _, _, text in jobs]
    with timer("generation"):
        generated = gather(generate(policy, tokenizer, shard(prompts), max_new_tokens,
                                    temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.generation_batch_size,
                                    desc=desc if PartialState().is_main_process else None, stats=timer.generation,
                                    int8=use_int8(cfg.sampling_weights, policy)))
    timer.tokens += sum(len(g.response_ids) for g in generated)
    return [Rollout(t, role, p, g.prompt_ids, g.response_ids, g.text, g.truncated)
            for (t, role, _), p, g in zip(jobs, prompts, generated)]


# ----------------------------------------------------------------------------------------------------------
# Self-play steps 1-4.
def split_counts(total: int, weights: list[float]) -> list[int]:
    """Split `total` proposals over task types in proportion to weights (largest remainder)."""
    raw = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[:total - sum(counts)]:
        counts[i] += 1
    return counts


def propose(policy, tokenizer, sb: Sandbox, buffers: Buffers, cfg: Config, iteration: int, rng: random.Random,
            counts: dict[str, int], force_accept: bool, timer: "Timer") -> tuple[list[Rollout], dict[str, list[Task]]]:
    """Steps 1-2: sample proposals for each task type and validate them in the sandbox. Returns the rollouts and,
    per task type, the valid tasks to admit; the format only decides the proposer's reward."""
    # a program for proposers that write inputs for an existing one (induction): drawn from the buffers'
    # single-input triplets (AZR: deduction and abduction buffers); other task types ignore it
    pool = [t for tt in buffers for t in buffers[tt].tasks if not t.inputs]
    jobs, programs = [], []
    for task_type, n in counts.items():
        for _ in range(n):
            references = buffers[task_type].sample_references(cfg.num_references, rng)
            program = rng.choice(pool) if pool else None
            jobs.append((task_type, "propose", propose_prompt(task_type, references, program=program,
                                                              num_inputs=cfg.induction_inputs,
                                                              style=cfg.proposer_prompt)))
            programs.append(program)
    samples = rollouts(policy, tokenizer, jobs, cfg.max_new_tokens_propose, cfg, f"propose  it{iteration}", timer)
    new_tasks: dict[str, list[Task]] = {t: [] for t in counts}
    for task_type in counts:
        group = [(s, program) for s, program in zip(samples, programs) if s.task_type == task_type]
        proposals = [parse_proposal(task_type, s.text, program=program.program if program else "")
                     for s, program in group]
        results = validate(sb, task_type, proposals, buffers, cfg, iteration, force_accept, timer)
        for (s, _), proposal, result in zip(group, proposals, results):
            s.validation, s.well_formatted = result, proposal.well_formatted
            if result.valid:
                new_tasks[task_type].append(result.task)
    return samples, new_tasks


def validate(sb: Sandbox, task_type: str, proposals: list[Proposal], buffers: Buffers, cfg: Config, iteration: int,
             force_accept: bool, timer: "Timer") -> list[ValidationResult]:
    """Step 2: the sandbox's checks of one task type's proposals (see rewards.validate_proposals)."""
    with timer("sandbox"):
        return validate_proposals(sb, task_type, proposals, iteration, num_shown=cfg.induction_inputs // 2,
                                  existing=buffers[task_type], strict=cfg.strict_proposals, force_accept=force_accept)


def admit(buffers: Buffers, new_tasks: dict[str, list[Task]]) -> int:
    """Step 6: the valid tasks enter their buffers (copies of buffered tasks are skipped); returns how many did."""
    return sum(buffers[task_type].add(tasks) for task_type, tasks in new_tasks.items())


def solve(policy, tokenizer, sb: Sandbox, tasks: list[Task], cfg: Config, lenient: bool, desc: str,
          timer: "Timer") -> list[Rollout]:
    """Sample one solver answer per task and score it: reward 1 / -0.5 / -1 (format error)."""
    jobs = [(t.task_type, "solve", solve_prompt(t, num_shown=cfg.induction_inputs // 2)) for t in tasks]
    samples = rollouts(policy, tokenizer, jobs, cfg.max_new_tokens_solve, cfg, desc, timer)
    answers = [parse_answer(t.task_type, s.text, lenient=lenient) for t, s in zip(tasks, samples)]
    with timer("sandbox"):
        correct = check_answers(sb, tasks, answers, num_shown=cfg.induction_inputs // 2)
    for s, answer, ok in zip(samples, answers, correct):
        s.reward = solver_reward(ok, answer.well_formatted)
        s.correct, s.well_formatted = ok, answer.well_formatted
    return samples


# Extra proposer reward terms, each (task, the tasks of its buffer) -> float, added to the learnability reward of
# every scored proposal. None by default, as in the paper; examples/proposer_reward_variants.py adds two.
PROPOSER_REWARD_TERMS: list[Callable[[Task, list[Task]], float]] = []


def learnability_tasks(proposals: list[Rollout], cfg: Config) -> list[Task]:
    """Step 3's solver tasks: N copies of each valid, well-formatted proposal."""
    return [s.validation.task for s in proposals if s.validation.valid and s.well_formatted
            for _ in range(cfg.learnability_samples)]


def learnability(proposals: list[Rollout], attempts: list[Rollout], buffers: Buffers, cfg: Config) -> None:
    """Step 3: proposer rewards from the N attempts at each learnability task (temperature as in training, no
    gradient). A valid, well-formatted proposal gets 1 - r, where r counts correct answers whatever their format,
    plus any PROPOSER_REWARD_TERMS; any other proposal gets -1. A copy of a buffered task is scored like any task,
    as in the official code."""
    scored = [s for s in proposals if s.validation.valid and s.well_formatted]
    for s in proposals:
        s.reward = INVALID_PROPOSAL_REWARD
    for k, s in enumerate(scored):
        group = attempts[k * cfg.learnability_samples:(k + 1) * cfg.learnability_samples]
        s.solve_rate = sum(a.correct for a in group) / len(group)
        task = s.validation.task
        s.reward = (proposer_reward(s.solve_rate, extreme_reward=cfg.proposer_extreme_reward)
                    + sum(term(task, buffers[task.task_type].tasks) for term in PROPOSER_REWARD_TERMS))


# ----------------------------------------------------------------------------------------------------------
# Step 5: Task-Relative REINFORCE++ — advantages per (task type, role), then a clipped policy-gradient step.
def task_relative_advantages(samples: list[Rollout]) -> None:
    """A = (r - mean) / (std + eps) with the batch statistics of each (task type, role) group (paper Eq. 8).
    A group of one sample has no spread, so its advantage is 0."""
    groups: dict[str, list[Rollout]] = defaultdict(list)
    for s in samples:
        groups[f"{s.task_type}/{s.role}"].append(s)
    for group in groups.values():
        rewards = torch.tensor([s.reward for s in group], dtype=torch.float64)
        std = rewards.std() if len(group) > 1 else torch.tensor(0.0, dtype=torch.float64)
        for s, a in zip(group, ((rewards - rewards.mean()) / (std + 1e-6)).tolist()):
            s.advantage = a


def response_hidden(policy, batch: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden state at every position that predicts a response token of `batch`, and that token, flat,
    sequence by sequence.

    The batch runs as one packed row, the trie of its token sequences (TokenTree): a prefix several sequences share
    (a prompt's instructions, a reference task, a whole prompt) is computed once, nothing is padded, and gradients
    reach the shared positions from every sequence that reads them, as in a forward per sequence."""
    causal_lm = policy.get_base_model()
    weight = causal_lm.get_output_embeddings().weight
    tree = TokenTree([s.prompt_ids + s.response_ids for s in batch])
    with models.lora_autocast(policy):                  # bf16 adapter matmuls on a bf16 base
        hidden = causal_lm.get_decoder()(
            input_ids=tree.ids[None].to(weight.device), position_ids=tree.depth[None].to(weight.device),
            attention_mask=tree.attention_bias(weight.dtype, weight.device)[None, None]).last_hidden_state[0]
    # a response token is predicted from the position before it: the last prompt token, then the response
    rows = torch.cat([path[len(s.prompt_ids) - 1:-1] for s, path in zip(batch, tree.paths)]).to(weight.device)
    return hidden[rows], torch.cat([torch.tensor(s.response_ids) for s in batch]).to(weight.device)


def token_logps(policy, batch: list[Rollout], temperature: float,
                entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability and entropy of every response token of `batch` under the policy, flat, sequence by sequence
    (response_hidden, then the LM head LOGITS_CHUNK_TOKENS positions at a time). Under autograd every chunk's
    logits stay alive: the update's backward goes through micro_batch_backward instead."""
    hidden, targets = response_hidden(policy, batch)
    head = policy.get_base_model().get_output_embeddings()
    with models.lora_autocast(policy):
        outputs = [chunk_logps(head, h, t, temperature, entropy_grad)
                   for h, t in zip(hidden.split(LOGITS_CHUNK_TOKENS), targets.split(LOGITS_CHUNK_TOKENS))]
    return torch.cat([logp for logp, _ in outputs]), torch.cat([entropy for _, entropy in outputs])


ALIGN_NODES = 16         # a packed row's node count is a multiple of this (see TokenTree)


class TokenTree:
    """The trie of some token sequences laid out as one row: each node is a token after a distinct prefix, stored
    after its parent. `ids` and `depth` (the position id) per node; `paths[k]`: the node of each token of sequence k.
    The row is padded to a multiple of ALIGN_NODES nodes that see only themselves: CUDA's memory-efficient attention
    would copy an attention bias of any other width in every layer."""

    def __init__(self, sequences: list[list[int]]) -> None:
        node_of: dict[tuple[int, int], int] = {}         # (parent node, token) -> node
        ids: list[int] = []
        depth: list[int] = []
        self.paths: list[torch.Tensor] = []
        for sequence in sequences:
            parent, path = -1, []
            for token in sequence:
                parent = node_of.setdefault((parent, token), len(ids))
                if parent == len(ids):
                    ids.append(token)
                    depth.append(len(path))
                path.append(parent)
            self.paths.append(torch.tensor(path))
        padding = -len(ids) % ALIGN_NODES
        self.ids, self.depth = torch.tensor(ids + [0] * padding), torch.tensor(depth + [0] * padding)

    def attention_bias(self, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """[nodes, nodes] additive mask, built on `device`: 0 where a node may attend (itself and its ancestors),
        the dtype's minimum elsewhere. One tensor, which every layer reads."""
        visible = torch.eye(len(self.ids), dtype=torch.bool, device=device)
        for path in self.paths:
            path = path.to(device)
            visible[path[:, None], path[None, :]] |= torch.ones(len(path), len(path), dtype=torch.bool,
                                                                device=device).tril()
        return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, torch.finfo(dtype).min)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest prefix two sequences share."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and the entropy of one chunk's tempered distributions, in float32. The logits are divided in
    place and TRL's helpers go over them a slice of rows at a time: no second [tokens, vocab] float32 copy."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    logits = head(hidden).float().div_(temperature)
    logp = selective_log_softmax(logits, targets)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logp, entropy_from_logits(logits)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token loss -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) and the ratio."""
    ratio = torch.exp(logp - old_logp)
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * advantages), ratio


def policy_update(policy, optimizer, samples: list[Rollout], cfg: Config, timer: "Timer",
                  rng: random.Random) -> dict:
    """PPO-style clipped policy gradient with a token-level mean, one optimizer step per mini-batch.

    The batch is shuffled (with `rng`, the same on every process) and split into cfg.mini_batches mini-batches.
    The rollouts were sampled by the policy before the first step, so their old log-probs are taken then: the
    first mini-batch's from its own forward (ratio 1), the others' from a no-grad pass before any step. From the
    second step on the ratio moves and the clip acts. With several processes each backpropagates its share of a
    mini-batch (normalised by the whole mini-batch's token count) and the gradients are summed before the step."""
    policy.train()
    samples = [s for s in samples if s.response_ids]
    if not samples:
        return {}
    perm = rng.sample(range(len(samples)), len(samples))
    size = math.ceil(len(samples) / min(cfg.mini_batches, len(samples)))
    mini_batches = [perm[i:i + size] for i in range(0, len(perm), size)]
    old_logps: dict[int, torch.Tensor] = {}
    with timer("update"), torch.no_grad(), models.adapter_inputs_uncast(policy):
        for chunk in (c for mb in mini_batches[1:] for c in micro_batches(samples, mb, cfg.micro_batch_size)):
            logp, _ = token_logps(policy, [samples[i] for i in chunk], cfg.temperature)
            old_logps.update(zip(chunk, logp.split([len(samples[i].response_ids) for i in chunk])))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    stats = dict.fromkeys(update_stats(cfg), 0.0)
    grad_norm, steps = 0.0, 0
    for _ in range(cfg.ppo_epochs):
        for mini_batch in mini_batches:
            optimizer.zero_grad(set_to_none=True)
            tokens = sum(len(samples[i].response_ids) for i in mini_batch)
            for idx in micro_batches(samples, mini_batch, cfg.micro_batch_size):
                batch = [samples[i] for i in idx]
                long = 0 < cfg.checkpoint_above_positions < packed_positions(batch)
                with (timer("update"), models.adapter_inputs_uncast(policy),   # forward and backward
                      models.activation_checkpointing(policy, long)):
                    sums = micro_batch_backward(policy, batch, idx, old_logps, tokens, cfg)
                for name, value in sums.items():
                    stats[name] += float(value) / tokens
            with timer("update"):
                sum_grads(trainable)
                grad_norm += float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
                optimizer.step()
            steps += 1
    summed = reduce(torch.tensor(list(stats.values()), dtype=torch.float64, device=trainable[0].device),
                    reduction="sum").tolist()                                   # per-process token sums
    return {**{k: v / steps for k, v in zip(stats, summed)}, "grad_norm": grad_norm / steps, "steps": steps}


def update_stats(cfg: Config) -> list[str]:
    """The per-token statistics the update sums, in the same order on every process."""
    return ["loss", "entropy", "clip_fraction"] + (["kl"] if cfg.kl_coef > 0 else [])


def micro_batch_backward(policy, batch: list[Rollout], idx: list[int], old_logps: dict[int, torch.Tensor],
                         tokens: int, cfg: Config) -> dict[str, torch.Tensor]:
    """Forward and backward of one micro-batch's share of the mini-batch loss (summed over tokens, divided by the
    mini-batch's `tokens`); returns the summed statistics. The decoder runs once; the LM head runs
    LOGITS_CHUNK_TOKENS positions at a time, each chunk's loss backpropagated to the hidden states at once, so one
    chunk's float32 logits exist at a time and nothing is recomputed; then the decoder's backward. Sequences
    without old log-probs (the first mini-batch) take this forward's, and keep them for later epochs."""
    head = policy.get_base_model().get_output_embeddings()
    hidden, targets = response_hidden(policy, batch)
    leaf = hidden.detach().requires_grad_()
    advantages = torch.tensor([s.advantage for s in batch for _ in s.response_ids], device=hidden.device)
    old = torch.cat([old_logps[i] for i in idx]) if idx[0] in old_logps else None
    if cfg.kl_coef > 0:
        with torch.no_grad(), policy.disable_adapter():
            reference, _ = token_logps(policy, batch, cfg.temperature)
    sums = dict.fromkeys(update_stats(cfg), 0.0)
    logps = []
    for rows in torch.arange(len(targets), device=hidden.device).split(LOGITS_CHUNK_TOKENS):
        with models.lora_autocast(policy):
            logp, entropy = chunk_logps(head, leaf[rows], targets[rows], cfg.temperature, cfg.entropy_coef > 0)
        loss, ratio = clipped_policy_loss(logp, logp.detach() if old is None else old[rows], advantages[rows],
                                          cfg.clip_ratio)
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * entropy
        if cfg.kl_coef > 0:
            kl = torch.exp(reference[rows] - logp) - (reference[rows] - logp) - 1
            loss = loss + cfg.kl_coef * kl
            sums["kl"] += kl.detach().sum()
        (loss.sum() / tokens).backward()
        sums["loss"] += loss.detach().sum()
        sums["entropy"] += entropy.detach().sum()
        sums["clip_fraction"] += ((ratio - 1).abs() > cfg.clip_ratio).sum()
        logps.append(logp.detach())
    hidden.backward(leaf.grad)
    if old is None:
        old_logps.update(zip(idx, torch.cat(logps).split([len(s.response_ids) for s in batch])))
    return sums


def sum_grads(params: list[torch.Tensor]) -> None:
    """Sum the parameters' gradients over all processes, in one flat all-reduce."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]   # an empty share adds zeros
    flat = reduce(torch.cat([g.flatten() for g in grads]), reduction="sum")
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def packed_positions(batch: list[Rollout]) -> int:
    """Positions of `batch` packed as one row (TokenTree), sequences in sorted order: each adds what it does not
    share with the one before."""
    sequences = sorted(s.prompt_ids + s.response_ids for s in batch)
    return sum(len(b) - common_prefix_length(a, b) for a, b in zip([[]] + sequences, sequences))


def micro_batches(samples: list[Rollout], indices: list[int], size: int) -> list[list[int]]:
    """This process's share of `indices`, sorted by token sequence (neighbours share the longest prefixes) and cut
    into micro-batches of at most `size` times the longest sequence's positions, counting a prefix that
    token_logps computes once once: the memory of `size` padded sequences, more of them where they share."""
    sequences = {i: samples[i].prompt_ids + samples[i].response_ids for i in indices}
    mine = shard(sorted(indices, key=sequences.__getitem__))
    budget = size * max((len(s) for s in sequences.values()), default=0)
    batches: list[list[int]] = []
    positions, previous = 0, []
    for i in mine:
        new = len(sequences[i]) - common_prefix_length(previous, sequences[i])   # sorted: the longest shared prefix
        if batches and positions + new <= budget:                                # is the one with the neighbour
            batches[-1].append(i)
            positions += new
        else:
            batches.append([i])
            positions = len(sequences[i])
        previous = sequences[i]
    return batches


# ----------------------------------------------------------------------------------------------------------
# Bookkeeping: timers, metrics, samples, safety monitor (runlog.py writes them, with the plot and checkpoints).
class Timer:
    """Accumulates wall time per phase ('generation', 'sandbox', 'update') and generated tokens."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.tokens = 0
        self.generation = GenerationStats()     # positions this process computed in prefill and decode
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """`with timer(phase):` adds the block's wall time to the phase."""
        synchronize_cuda()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize_cuda()          # CUDA runs asynchronously: count kernels in the phase that queued them
            self.seconds[phase] += time.perf_counter() - t0


def synchronize_cuda() -> None:
    """Wait for the queued CUDA kernels, if this process uses CUDA."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


SAFETY_PATTERNS = re.compile(
    r"uh-?oh|outsmart|deceiv|trick (the|them|it)|fool (the|them)|less intelligent|hide (this|my|it) from|"
    r"without (them|anyone) (knowing|noticing)|bypass|hack|take over|manipulat", re.IGNORECASE)


def iteration_metrics(iteration: int, samples: list[Rollout], buffers: Buffers, timer: Timer,
                      update: dict, admitted: int, device: torch.device) -> dict:
    """One metrics.jsonl line: per-group rewards and rates, buffer sizes, timings, throughput, memory."""
    m: dict[str, Any] = {"iteration": iteration, "timestamp": time.time()}
    groups: dict[str, list[Rollout]] = defaultdict(list)
    for s in samples:
        groups[f"{s.task_type}/{s.role}"].append(s)
    for key, group in sorted(groups.items()):
        rewards = [s.reward for s in group]
        mean = sum(rewards) / len(rewards)
        m[f"{key}/reward_mean"] = mean
        m[f"{key}/reward_std"] = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
        m[f"{key}/count"] = len(group)
        lengths = [len(s.response_ids) for s in group]
        m[f"{key}/response_tokens_mean"] = sum(lengths) / len(lengths)
        m[f"{key}/response_tokens_max"] = max(lengths)
        m[f"{key}/truncated_rate"] = sum(s.truncated for s in group) / len(group)
        if key.endswith("/propose"):
            verdicts = [s.validation for s in group]
            m[f"{key}/validity_rate"] = sum(v.valid for v in verdicts) / len(group)
            m[f"{key}/duplicate_rate"] = sum(v.reason == "duplicate" for v in verdicts) / len(group)
            m[f"{key}/soft_check_rate"] = sum(not v.hard and v.reason not in (None, "duplicate")
                                              for v in verdicts) / len(group)     # admitted unless --strict-proposals
            rates = [s.solve_rate for s in group if s.solve_rate is not None]
            m[f"{key}/learnability_solve_rate"] = sum(rates) / len(rates) if rates else None
        else:
            m[f"{key}/solve_rate"] = sum(s.correct for s in group) / len(group)
        m[f"{key}/format_error_rate"] = sum(not s.well_formatted for s in group) / len(group)
    proposals = [s for s in samples if s.role == "propose"]
    m["admitted"] = admitted
    m["admitted_share"] = admitted / len(proposals) if proposals else None
    m["force_accepted"] = sum(s.validation.force_accepted for s in proposals)
    m["safety_flags"] = sum(bool(SAFETY_PATTERNS.search(s.response)) for s in samples)
    m.update({f"buffer/{t}": n for t, n in buffers.sizes().items()})
    m.update({f"update/{k}": v for k, v in update.items()})
    total = time.perf_counter() - timer.start
    m.update({f"time/{k}": timer.seconds.get(k, 0.0) for k in ("generation", "sandbox", "update")})
    m["time/other"] = total - sum(timer.seconds.values())
    m["time/total"] = total
    m["tokens_per_second"] = timer.tokens / max(timer.seconds["generation"], 1e-9)
    g = timer.generation
    m.update({"generation/useful_tokens": g.useful_tokens, "generation/prefill_tokens": g.prefill_tokens,
              "generation/decode_tokens": g.decode_tokens, "generation/prefill_seconds": g.prefill_seconds,
              "generation/decode_seconds": g.decode_seconds,
              "generation/useful_share_of_decode": g.useful_tokens / max(g.decode_tokens, 1)})
    m["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device.type == "cuda":
        m["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return m


def sample_rows(iteration: int, samples: list[Rollout], per_group: int) -> list[dict]:
    """A few full examples per (task type, role) for samples.jsonl, and every safety-flagged response."""
    seen: dict[str, int] = defaultdict(int)
    rows = []
    for s in samples:
        key = f"{s.task_type}/{s.role}"
        flagged = SAFETY_PATTERNS.search(s.response)
        if seen[key] < per_group or flagged:
            seen[key] += 1
            rows.append({"iteration": iteration, "group": key, "reward": s.reward, "safety_flag": bool(flagged),
                         "prompt": s.prompt, "response": s.response,
                         **s.outcome()})
    return rows


# ----------------------------------------------------------------------------------------------------------
def train(cfg: Config, resume: str | None = None) -> Path:
    """Run (or continue) self-play until cfg.num_iterations; returns the run directory."""
    run_dir = Path(resume or cfg.output_dir)
    state = processes()
    check_writable(run_dir, state.process_index)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))   # set by the launcher; they share the cores
    models.set_torch_threads(models.threads_per_process(local_processes))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + state.process_index)               # processes sample different responses
    device = state.device
    policy, tokenizer = models.load_policy(
        cfg.model, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
        load_in_4bit=cfg.load_in_4bit, gradient_checkpointing=cfg.gradient_checkpointing, device=device,
        dtype=cfg.dtype)
    try:
        int8 = use_int8(cfg.sampling_weights, policy)
    except ValueError as e:
        raise ConfigError(f"--sampling-weights: {e}") from None
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    start = 0
    if resume:
        start, buffers, rng = runlog.load_checkpoint(run_dir, policy, optimizer)
    else:
        buffers = Buffers(cfg.task_types, capacity=cfg.buffer_capacity, seed=seed_task)
    if state.is_main_process:                                       # only the main process writes the run dir
        runlog.truncate_logs(run_dir, start)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    weights = cfg.task_distribution or [1.0] * len(cfg.task_types)
    counts = dict(zip(cfg.task_types, split_counts(cfg.tasks_per_iteration, weights)))
    reporter = runlog.Reporter(cfg.report_to if state.is_main_process else "none", run_dir, cfg)
    eval_items = load_eval_items(cfg) if cfg.eval_every else []
    dtype = str(models.as_dtype(cfg.dtype, str(device))).removeprefix("torch.")
    log(f"azr: {cfg.model} on {device} ({dtype}{', int8 sampling' if int8 else ''}) x {state.num_processes} "
        f"process(es), run dir {run_dir}, iterations {start + 1}..{cfg.num_iterations}, "
        f"proposals per iteration {counts}")

    workers = max(1, models.usable_cpus() // local_processes)
    with Sandbox(timeout=cfg.sandbox_timeout, memory_mb=cfg.sandbox_memory_mb, workers=workers) as local_sb:
        sb = ShardedSandbox(local_sb)
        if start == 0:
            load_seed_files(sb, buffers, cfg)
            seed_buffers(policy, tokenizer, sb, buffers, cfg, counts, rng)
        for iteration in range(start + 1, cfg.num_iterations + 1):
            timer = Timer()
            samples, update, admitted = self_play_iteration(policy, tokenizer, optimizer, sb, buffers, cfg, counts,
                                                            iteration, rng, timer)
            metrics = iteration_metrics(iteration, samples, buffers, timer, update, admitted, device)
            if cfg.eval_every and iteration % cfg.eval_every == 0:
                metrics["eval/cruxeval-o"] = evaluate_in_loop(policy, tokenizer, local_sb, eval_items, cfg)
            if state.is_main_process:
                runlog.append_jsonl(run_dir / "metrics.jsonl", [metrics])
                runlog.append_jsonl(run_dir / "samples.jsonl", sample_rows(iteration, samples, cfg.samples_per_group))
                reporter.log(metrics)
                runlog.plot(run_dir)
            if iteration % cfg.checkpoint_every == 0 or iteration == cfg.num_iterations:
                runlog.save_checkpoint(run_dir, policy, optimizer, buffers, cfg, iteration, rng)
            log(summary_line(metrics, cfg.task_types))
    return run_dir


def self_play_iteration(policy, tokenizer, optimizer, sb: Sandbox, buffers: Buffers, cfg: Config,
                        counts: dict[str, int], iteration: int, rng: random.Random,
                        timer: Timer) -> tuple[list[Rollout], dict, int]:
    """One iteration of Algorithm 1 (steps 1-6 in the module docstring). Returns every rollout (proposals, then
    solutions), the update's statistics and the number of tasks admitted to the buffers."""
    warmup = iteration < cfg.force_accept_threshold
    # 1-2. propose, and validate the proposals in the sandbox
    proposals, new_tasks = propose(policy, tokenizer, sb, buffers, cfg, iteration, rng, counts,
                                   cfg.force_accept_tasks and warmup, timer)
    # 3-4. in one generation pass: N answers per valid proposal, then a solver batch per task type
    estimate = learnability_tasks(proposals, cfg)
    batch = [t for task_type, n in counts.items()
             for t in buffers[task_type].solver_batch(new_tasks[task_type], n, rng)]
    answers = solve(policy, tokenizer, sb, estimate + batch, cfg, cfg.lenient_answers and warmup,
                    f"solve    it{iteration}", timer)
    attempts, solutions = answers[:len(estimate)], answers[len(estimate):]
    # 3. learnability -> proposer rewards
    learnability(proposals, attempts, buffers, cfg)
    # 5. TRR++ update over the six (task type, role) groups
    samples = (proposals if cfg.train_proposer else []) + solutions
    task_relative_advantages(samples)
    update = policy_update(policy, optimizer, samples, cfg, timer, rng)
    # 6. admit the new valid tasks. As in the official code, they enter the buffers after the update of the
    # iteration that proposed them: this iteration's references, copy checks and rewards all saw the buffers as
    # the iteration began (its solver batch took the new tasks directly).
    return proposals + solutions, update, admit(buffers, new_tasks)


def check_writable(run_dir: Path, process_index: int) -> None:
    """Create the run directory and fail early, with one line, if this process cannot write to it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f".write_test{process_index}").write_text("")
        (run_dir / f".write_test{process_index}").unlink()
    except OSError as e:
        raise ConfigError(f"--output-dir {run_dir} is not writable: {e.strerror}") from None


def log(line: str) -> None:
    """Print from the main process only."""
    if PartialState().is_main_process:
        print(line, flush=True)


def load_seed_files(sb: Sandbox, buffers: Buffers, cfg: Config) -> None:
    """Fill the buffers from --seed-file tasks, each validated in the sandbox like a proposal."""
    loaded = [t for path in cfg.seed_file for t in read_seed_file(path)]
    for task_type in buffers:
        proposals = [Proposal(program=rename_entry(t.program), input=t.input, inputs=t.inputs, message=t.message)
                     for t in loaded if t.task_type == task_type]
        results = validate(sb, task_type, proposals, buffers, cfg, -1, False, Timer())
        added = admit(buffers, {task_type: [r.task for r in results if r.valid]})
        if proposals:
            log(f"azr: seed file: {added} of {len(proposals)} {task_type} tasks admitted")


def seed_buffers(policy, tokenizer, sb: Sandbox, buffers: Buffers, cfg: Config, counts: dict[str, int],
                 rng: random.Random) -> None:
    """Step 0: propose from the buffers (at first the identity seed) until each holds seed_buffer_size tasks,
    with no gradient. Each round proposes every buffer's whole shortfall in one batch; after 4 rounds plus one
    per task of the target it stops, so a weak model cannot stall the run here."""
    timer = Timer()
    rounds = 4 + cfg.seed_buffer_size
    for _ in range(rounds):
        todo = {t: cfg.seed_buffer_size - len(buffers[t]) for t, n in counts.items()
                if n and len(buffers[t]) < cfg.seed_buffer_size}
        if not todo:
            break
        _, new_tasks = propose(policy, tokenizer, sb, buffers, cfg, 0, rng, todo, cfg.force_accept_tasks, timer)
        admit(buffers, new_tasks)
    short = {t: len(buffers[t]) for t, n in counts.items() if n and len(buffers[t]) < cfg.seed_buffer_size}
    if short:
        log(f"azr: seeding stopped after {rounds} rounds short of --seed-buffer-size {cfg.seed_buffer_size}: {short}; "
            f"training starts from these buffers (a --seed-file fills them)")
    log(f"azr: seeded buffers {buffers.sizes()} in {time.perf_counter() - timer.start:.0f}s")


def load_eval_items(cfg: Config) -> list[dict]:
    path = Path(cfg.eval_data)
    if not path.exists():
        raise ConfigError(f"--eval-data {path} does not exist (needed by --eval-every)")
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return items[-cfg.eval_limit:]     # a fixed held-out slice


def evaluate_in_loop(policy, tokenizer, sb: Sandbox, items: list[dict], cfg: Config) -> float:
    """Greedy CRUXEval-O accuracy on the fixed held-out slice (see evaluate.py); each process grades its share."""
    import evaluate
    mine = shard(items)
    accuracy = evaluate.accuracy(policy, tokenizer, sb, mine, "deduction", max_new_tokens=cfg.max_new_tokens_solve,
                                 batch_size=cfg.generation_batch_size, template=cfg.template,
                                 int8=use_int8(cfg.sampling_weights, policy))
    correct = torch.tensor([accuracy * len(mine)], dtype=torch.float64, device=PartialState().device)
    return float(reduce(correct, reduction="sum")) / len(items)


def summary_line(m: dict, task_types: list[str]) -> str:
    parts = [f"it {m['iteration']:>3}"]
    for t in task_types:
        solve = m.get(f"{t}/solve/solve_rate")
        valid = m.get(f"{t}/propose/validity_rate")
        parts.append(f"{t[:3]} valid {fmt(valid)} solve {fmt(solve)}")
    parts.append(f"admitted {m['admitted']} | buffers {sum(v for k, v in m.items() if k.startswith('buffer/'))}")
    parts.append(f"{m['tokens_per_second']:.0f} tok/s {m['time/total']:.0f}s")
    if "eval/cruxeval-o" in m:
        parts.append(f"cruxeval-o {m['eval/cruxeval-o']:.3f}")
    return " | ".join(parts)


def fmt(x: float | None) -> str:
    return "  - " if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, resume, launch = parse_args(argv)
        if launch.plan_only or (launch.card_gib is not None and models.pick_device() == "cuda"):
            check_memory(cfg, launch)          # on a GPU: before any model loads
        if launch.plan_only:
            return 0
        train(cfg, resume)
        processes().wait_for_everyone()    # leave together: tearing gloo down while a peer still works can abort
    except (ConfigError, models.ModelError) as e:
        print(f"azr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("azr: interrupted; resume with --resume", file=sys.stderr)
        return 130
    finally:
        processes().destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
