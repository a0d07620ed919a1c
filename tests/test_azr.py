"""End-to-end: the real loop (generation, sandbox, TRR++ update, checkpoints) on a tiny model, on CPU.

The tiny model is first taught the answer format (conftest.formatted_tiny_dir); from then on everything is real.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import azr
from buffers import Buffers


def tiny_args(model_dir: Path, run_dir: Path, iterations: int) -> list[str]:
    return ["--model", str(model_dir), "--output-dir", str(run_dir), "--iterations", str(iterations),
            "--preset", "cpu-demo", "--tasks-per-iteration", "6", "--learnability-samples", "2",
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
    (["--advantage-min-group", "1"], "--advantage-min-group must be at least 2"),
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


@pytest.mark.slow
def test_one_iteration_of_the_default_model(tmp_path):
    """The real default model (PyPI-shipped GGUF, converted once into the cache), one cpu-demo iteration."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import model as models

    run = tmp_path / "run"
    assert azr.main(["--preset", "cpu-demo", "--iterations", "1", "--output-dir", str(run)]) == 0
    rows = metrics(run)
    assert [r["iteration"] for r in rows] == [1]
    assert rows[0]["time/generation"] > 0 and rows[0]["tokens_per_second"] > 0
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert any(s["response"].strip() for s in samples), "the model wrote nothing"
    base = AutoModelForCausalLM.from_pretrained(models.resolve_model(models.DEFAULT_MODEL), dtype=torch.bfloat16)
    PeftModel.from_pretrained(base, str(run / "checkpoint" / "adapter"))   # the adapter is in PEFT format
