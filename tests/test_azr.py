"""End-to-end: the real loop (generation, sandbox, TRR++ update, checkpoints) on a tiny model, on CPU.

A random tiny model writes gibberish, so no proposal would ever be valid and the buffers could not grow.
The fixture therefore first teaches the tiny model the answer format with a few seconds of supervised
fine-tuning on a handful of well-formed responses to the real prompts; from then on everything is real.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import azr
from buffers import Buffers, Task, seed_task
from prompts import chat, propose_prompt, solve_prompt
from sandbox import FORBIDDEN_MODULES

PROGRAMS = [
    ("def f(a):\n    return a * 2", "3"),
    ("def f(a):\n    return a[::-1]", "'abc'"),
    ("def f(a, b):\n    return a + b", "1, 2"),
    ("def f(a):\n    return len(a)", "[1, 2, 3]"),
    ("def f(a):\n    return sorted(a)", "[3, 1, 2]"),
    ("def f(a):\n    return a.upper()", "'hi'"),
]


def well_formed_examples() -> list[tuple[str, str]]:
    """(prompt, response) pairs: one well-formed response per role and task type, over a few programs."""
    seeds = {t: seed_task(t) for t in ("deduction", "abduction", "induction")}
    pairs = []
    for program, inp in PROGRAMS:
        block = f"```python\n{program}\n```\n```input\n{inp}\n```"
        for t in ("deduction", "abduction"):
            prompt = propose_prompt(t, [seeds[t]], FORBIDDEN_MODULES)
            pairs.append((prompt, f"<think>A small program.</think><answer>{block}</answer>"))
        inputs = "\n".join(f"```input\n{i}\n```" for i in ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10"))
        task = Task("deduction", program, inp, "")
        prompt = propose_prompt("induction", [seeds["induction"]], FORBIDDEN_MODULES, program=task)
        pairs.append((prompt, f"<think>Numbers.</think><answer>{inputs}\n```message\nDoubles it.\n```</answer>"))
        pairs.append((solve_prompt(Task("deduction", program, inp, "6")),
                      "<think>Trace it.</think><answer>```output\n6\n```</answer>"))
        pairs.append((solve_prompt(Task("abduction", program, inp, "6")),
                      "<think>Invert it.</think><answer>```input\n3\n```</answer>"))
        pairs.append((solve_prompt(seeds["induction"]),
                      f"<think>Pattern.</think><answer>```python\n{program}\n```</answer>"))
    return pairs


@pytest.fixture(scope="session")
def formatted_tiny_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model taught the answer format: each well-formed response becomes one added token, and a
    short supervised fine-tuning teaches which response tokens fit which prompt (seconds on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("formatted_tiny")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pairs = well_formed_examples()
    tokenizer.add_tokens(sorted({response for _, response in pairs}))
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    rows = [(tokenizer(chat(tokenizer, prompt), add_special_tokens=False)["input_ids"],
             tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            for prompt, response in pairs]
    torch.manual_seed(0)
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        batch = rng.sample(rows, 8)
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, r) in enumerate(batch):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
            mask[i, :len(p) + len(r)] = 1
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_args(model_dir: Path, run_dir: Path, iterations: int) -> list[str]:
    return ["--model", str(model_dir), "--output-dir", str(run_dir), "--iterations", str(iterations),
            "--preset", "cpu-demo", "--tasks-per-iteration", "3", "--learnability-samples", "2",
            "--seed-buffer-size", "1", "--max-new-tokens-propose", "8", "--max-new-tokens-solve", "8",
            "--micro-batch-size", "8", "--learning-rate", "1e-3", "--lora-r", "4", "--no-gradient-checkpointing",
            "--samples-per-group", "1", "--sandbox-timeout", "2"]


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(run_dir / "checkpoint" / "adapter" / "adapter_model.safetensors")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


DETERMINISTIC = ("reward_mean", "solve_rate", "validity_rate", "buffer/", "force_accepted", "response_tokens")


def deterministic_part(m: dict) -> dict:
    return {k: v for k, v in m.items() if any(s in k for s in DETERMINISTIC)}


def test_two_iterations_then_resume_is_exact(formatted_tiny_dir, tmp_path):
    run = tmp_path / "run"
    assert azr.main(tiny_args(formatted_tiny_dir, run, 2)) == 0
    rows = metrics(run)
    assert [r["iteration"] for r in rows] == [1, 2]
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "samples.jsonl").read_text().strip()
    sizes = Buffers.load(run / "checkpoint" / "buffers.jsonl").sizes()
    assert sum(sizes.values()) > 3, f"buffers did not grow beyond the 3 seeds: {sizes}"
    lora_b = [v for k, v in adapter_tensors(run).items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero and must have moved"
    for key in ("time/generation", "time/sandbox", "time/update", "time/other", "tokens_per_second", "peak_rss_gib"):
        assert key in rows[-1]
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["iteration"] == 2

    # the same run done in one go, three iterations ...
    straight = tmp_path / "straight"
    assert azr.main(tiny_args(formatted_tiny_dir, straight, 3)) == 0
    # ... equals two iterations plus a resume that extends the run to three
    assert azr.main(["--resume", str(run), "--iterations", "3"]) == 0
    resumed_rows, straight_rows = metrics(run), metrics(straight)
    assert [r["iteration"] for r in resumed_rows] == [1, 2, 3]
    assert [deterministic_part(r) for r in resumed_rows] == [deterministic_part(r) for r in straight_rows]
    a, b = adapter_tensors(run), adapter_tensors(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (Buffers.load(run / "checkpoint" / "buffers.jsonl").sizes()
            == Buffers.load(straight / "checkpoint" / "buffers.jsonl").sizes())


def test_kill_between_checkpoint_renames_is_recovered(formatted_tiny_dir, tmp_path):
    run = tmp_path / "run"
    assert azr.main(tiny_args(formatted_tiny_dir, run, 1)) == 0
    (run / "checkpoint").rename(run / "checkpoint.old")      # as if killed between the two renames
    assert azr.main(["--resume", str(run), "--iterations", "2"]) == 0
    assert [r["iteration"] for r in metrics(run)] == [1, 2]


@pytest.mark.parametrize("argv, message", [
    (["--iterations", "0"], "--iterations must be at least 1"),
    (["--task-types", "deduction", "telepathy"], "--task-types must be distinct values"),
    (["--task-types", "deduction", "abduction", "--task-distribution", "1"], "--task-distribution needs one"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--resume", "/nonexistent/run"], "cannot read checkpoint"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    code = azr.main(argv + (["--output-dir", str(tmp_path / "r")] if "--resume" not in argv else []))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and err.startswith("azr: error:")


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert azr.main(["--output-dir", str(blocker / "run"), "--model", str(tmp_path)]) == 2
    assert "not writable" in capsys.readouterr().err


def test_task_relative_advantages_are_per_group():
    def roll(t: str, role: str, r: float) -> azr.Rollout:
        return azr.Rollout(t, role, "", [], [1], "", reward=r)
    big = [roll("deduction", "solve", r) for r in (1, -0.5, 1, -1, 1, -0.5, 1, 1)]
    other = [roll("abduction", "propose", r) for r in (0.2, 0.4, 0.6, 0.8, 0.2, 0.4, 0.6, 0.8)]
    azr.task_relative_advantages(big + other, {}, min_group=8)
    for group in (big, other):
        adv = torch.tensor([s.advantage for s in group])
        assert abs(float(adv.mean())) < 1e-6 and abs(float(adv.std()) - 1) < 1e-4
    stats: dict = {}
    small = [roll("induction", "solve", 1.0)]
    azr.task_relative_advantages(small, stats, min_group=8)   # one sample: running estimate, no division by 0
    assert small[0].advantage == pytest.approx(0.0) and stats["induction/solve"].count == 1


def test_split_counts_follows_distribution():
    assert azr.split_counts(10, [0.3, 0.3, 0.4]) == [3, 3, 4]
    assert azr.split_counts(5, [1, 1, 1]) == [2, 2, 1]
    assert sum(azr.split_counts(7, [0.2, 0.5, 0.3])) == 7
