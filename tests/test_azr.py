"""End-to-end: the real loop (generation, sandbox, TRR++ update, checkpoints) on a tiny model, on CPU.

The tiny model is first taught the answer format (conftest.formatted_tiny_dir); from then on everything is real.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import types
from pathlib import Path

import pytest
import torch

import azr
from buffers import Buffers, Task
from config import Config
from rewards import BUILTIN_TASK_TYPES, seed_task


def tiny_args(model_dir: Path, run_dir: Path, iterations: int) -> list[str]:
    return ["--model", str(model_dir), "--output-dir", str(run_dir), "--iterations", str(iterations),
            "--preset", "cpu-demo", "--tasks-per-iteration", "6", "--learnability-samples", "2",
            "--seed-buffer-size", "1", "--max-new-tokens-propose", "8", "--max-new-tokens-solve", "8",
            "--micro-batch-size", "8", "--learning-rate", "1e-3", "--lora-r", "4", "--no-gradient-checkpointing",
            "--samples-per-group", "1", "--sandbox-timeout", "2", "--proposer-prompt", "official"]


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(run_dir / "checkpoint" / "adapter" / "adapter_model.safetensors")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


DETERMINISTIC = ("reward_mean", "solve_rate", "validity_rate", "buffer/", "admitted", "response_tokens")


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
    for key in ("time/generation", "time/sandbox", "time/update", "time/other", "tokens_per_second", "peak_rss_gib",
                "generation/prefill_tokens", "generation/decode_tokens", "deduction/propose/truncated_rate",
                "deduction/solve/truncated_rate", "deduction/propose/soft_check_rate", "update/steps"):
        assert key in rows[-1], key
    assert 0 < rows[-1]["generation/useful_share_of_decode"] <= 1
    assert sum(r["admitted"] for r in rows) == sum(sizes.values()) - 3      # what entered the buffers, counted
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
    (["--mini-batches", "0"], "--mini-batches must be at least 1"),
    (["--template", "alpaca"], "--template must be one of r1 chat"),
    (["--proposer-prompt", "form"], "--proposer-prompt must be one of official compact"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--sampling-weights", "int4"], "--sampling-weights must be one of auto int8 policy"),
    (["--seed-file", "/nonexistent/seeds.jsonl"], "cannot read seed file /nonexistent/seeds.jsonl"),
    (["--seed-file", str(Path(__file__))], "line 1: not an AZR seed task"),
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


def test_int8_sampling_weights_where_they_cannot_run_are_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import generation
    monkeypatch.setattr(generation, "fbgemm_int8", lambda: False)       # a torch without fbgemm's int8 kernels
    code = azr.main(tiny_args(tiny_model_dir, tmp_path / "r", 1) + ["--sampling-weights", "int8"])
    err = capsys.readouterr().err.strip()                                # (loading the model may warn first)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("azr: error: --sampling-weights: int8 sampling weights need")


def test_resuming_a_checkpoint_with_an_unknown_option_is_one_line(tmp_path, capsys):
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "state.json").write_text(json.dumps(
        {"config": {**dataclasses.asdict(Config()), "penalize_duplicates": True}}))
    assert azr.main(["--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"azr: error: --resume {tmp_path / 'run'}: the checkpoint's config has options "
                                "this version does not know: penalize_duplicates"]


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert azr.main(["--output-dir", str(blocker / "run"), "--model", str(tmp_path)]) == 2
    assert "not writable" in capsys.readouterr().err


def roll(t: str, role: str, r: float, prompt_ids: list[int] = (), response_ids: list[int] = (1,)) -> azr.Rollout:
    return azr.Rollout(t, role, "", list(prompt_ids), list(response_ids), "", reward=r)


def test_task_relative_advantages_are_per_group():
    big = [roll("deduction", "solve", r) for r in (1, -0.5, 1, -1, 1, -0.5, 1, 1)]
    other = [roll("abduction", "propose", r) for r in (0.2, 0.4, 0.6, 0.8)]
    equal = [roll("induction", "solve", 1.0) for _ in range(3)]
    single = [roll("induction", "propose", -1.0)]
    azr.task_relative_advantages(big + other + equal + single)
    for group in (big, other):
        adv = torch.tensor([s.advantage for s in group])
        assert abs(float(adv.mean())) < 1e-6 and abs(float(adv.std()) - 1) < 1e-4
    assert all(s.advantage == 0 for s in equal + single)      # no spread: no signal, no division by zero
    assert big[0].advantage > 0 > big[3].advantage


def update_setup(model_dir: Path, dtype: str = "fp32", gradient_checkpointing: bool = False, **overrides):
    """A fresh tiny policy, a config for policy_update, and one prompt with two different responses."""
    import model as models
    policy, tokenizer = models.load_policy(str(model_dir), lora_r=4, lora_alpha=8, load_in_4bit=False, device="cpu",
                                           dtype=dtype, gradient_checkpointing=gradient_checkpointing)
    cfg = Config(**{"learning_rate": 5e-2, "micro_batch_size": 8, "mini_batches": 1, **overrides})
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    prompt = tokenizer("def f(a):\n    return a", add_special_tokens=False)["input_ids"]
    good = tokenizer("<answer>```output", add_special_tokens=False)["input_ids"]
    bad = tokenizer("0123456789 ()[]", add_special_tokens=False)["input_ids"]
    return policy, tokenizer, cfg, optimizer, prompt, good, bad


def logp_sum(policy, tokenizer, sample: azr.Rollout) -> float:
    with torch.no_grad():
        logp, _ = azr.token_logps(policy, [sample], 1.0)
    return float(logp.sum())


def test_update_raises_positive_and_lowers_negative_advantage(tiny_model_dir):
    """The sign of the loss: one step makes the positive-advantage response likelier, the negative one less likely."""
    torch.manual_seed(0)
    policy, tokenizer, cfg, optimizer, prompt, good, bad = update_setup(tiny_model_dir)
    samples = [roll("deduction", "solve", 1.0, prompt, good), roll("deduction", "solve", -1.0, prompt, bad)]
    azr.task_relative_advantages(samples)
    before = [logp_sum(policy, tokenizer, s) for s in samples]
    stats = azr.policy_update(policy, optimizer, samples, cfg, azr.Timer(),
                                 random.Random(0))
    after = [logp_sum(policy, tokenizer, s) for s in samples]
    assert stats["steps"] == 1 and stats["clip_fraction"] == 0      # first step: ratio 1, nothing clipped
    assert after[0] > before[0] + 0.1 and after[1] < before[1] - 0.1, (before, after)


def test_update_on_a_bf16_base_runs_the_adapter_in_bf16(tiny_model_dir):
    """The CPU default: bf16 base, float32 LoRA, gradient checkpointing. The update's forward and its recomputation
    feed the adapter bf16 (no float32 copies), the LoRA weights stay float32, and the step still goes the
    advantages' way."""
    torch.manual_seed(0)
    policy, tokenizer, cfg, optimizer, prompt, good, bad = update_setup(tiny_model_dir, dtype="bf16",
                                                                         gradient_checkpointing=True)
    seen: set[torch.dtype] = set()
    for name, module in policy.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda mod, args, out: seen.add(args[0].dtype))
    samples = [roll("deduction", "solve", 1.0, prompt, good), roll("deduction", "solve", -1.0, prompt, bad)]
    azr.task_relative_advantages(samples)
    before = [logp_sum(policy, tokenizer, s) for s in samples]
    seen.clear()
    azr.policy_update(policy, optimizer, samples, cfg, azr.Timer(), random.Random(0))
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in policy.parameters() if p.requires_grad)
    after = [logp_sum(policy, tokenizer, s) for s in samples]
    assert after[0] > before[0] + 0.1 and after[1] < before[1] - 0.1, (before, after)


def test_clipping_zeroes_the_gradient_past_one_plus_epsilon():
    """Past 1 + eps with A > 0, or past 1 - eps with A < 0, a token adds no gradient; inside the range it does."""
    eps = 0.2
    for ratio, advantage, zero in ((1.5, 1.0, True), (1.5, -1.0, False), (0.5, -1.0, True), (0.5, 1.0, False),
                                   (1.1, 1.0, False), (0.9, -1.0, False)):
        logp = torch.zeros(1, 3, requires_grad=True)
        old = torch.full((1, 3), -math.log(ratio))
        loss, r = azr.clipped_policy_loss(logp, old, torch.tensor([[advantage]]), eps)
        loss.sum().backward()
        assert torch.allclose(r, torch.tensor(ratio))
        assert bool((logp.grad == 0).all()) == zero, (ratio, advantage, logp.grad)
        if not zero:      # inside or on the improving side: the gradient pushes logp the advantage's way
            assert bool((-logp.grad * advantage > 0).all())


def test_mini_batches_take_one_step_each(tiny_model_dir):
    torch.manual_seed(0)
    policy, tokenizer, cfg, optimizer, prompt, good, bad = update_setup(tiny_model_dir, mini_batches=3,
                                                                         micro_batch_size=2)
    samples = [roll("deduction", "solve", r, prompt, good if r > 0 else bad) for r in (1, -1, 1, -1, 1, -1)]
    azr.task_relative_advantages(samples)
    stats = azr.policy_update(policy, optimizer, samples, cfg, azr.Timer(),
                                 random.Random(0))
    assert stats["steps"] == 3 and stats["clip_fraction"] > 0     # later mini-batches see a moved ratio


def test_a_copied_reference_is_scored_like_any_task():
    """A proposal that copies a buffered task is valid (reason "duplicate", kept out of the buffer) and gets the
    learnability reward, as in the official code; a malformed proposal gets -1 and no estimate."""
    from prompts import Proposal
    from rewards import validate_proposals
    from sandbox import Sandbox
    cfg = Config(learnability_samples=2)
    buffers = Buffers(["deduction"], capacity=10)
    buffers["deduction"].add([seed_task("deduction")])
    copy, new = seed_task("deduction"), Proposal(program="def f(a):\n    return a * 2", input="3")
    with Sandbox(timeout=5.0) as sb:
        verdicts = validate_proposals(sb, "deduction", [Proposal(program=copy.program, input=copy.input), new], 1,
                                      existing=buffers["deduction"])
    assert [v.reason for v in verdicts] == ["duplicate", None] and all(v.valid for v in verdicts)
    proposals = [azr.Rollout("deduction", "propose", "", [], [1], "", well_formatted=ok, validation=v)
                 for v, ok in zip(verdicts + verdicts[:1], (True, True, False))]
    estimate = azr.learnability_tasks(proposals, cfg)
    assert [t.program for t in estimate] == [copy.program] * 2 + [new.program] * 2
    attempts = [azr.Rollout("deduction", "solve", "", [], [1], "", correct=ok) for ok in (True, False, True, True)]
    azr.learnability(proposals, attempts, buffers, cfg)
    assert [(s.reward, s.solve_rate) for s in proposals] == [(0.5, 0.5), (-0.5, 1.0), (-1.0, None)]
    assert azr.admit(buffers, {"deduction": [v.task for v in verdicts]}) == 1          # the copy is not added


@pytest.mark.parametrize("flags, force_accept, lenient", [
    ({}, False, False),
    ({"force_accept_tasks": True}, True, False),
    ({"lenient_answers": True}, False, True),
    ({"force_accept_tasks": True, "lenient_answers": True, "force_accept_threshold": 1}, False, False)])
def test_force_accept_and_lenient_answers_are_separate_warmups(flags, force_accept, lenient, monkeypatch):
    """--force-accept-tasks reaches the validation, --lenient-answers the answer parsing, each alone, and only
    while iteration < --force-accept-threshold."""
    seen = {}

    def propose(policy, tokenizer, sb, buffers, cfg, iteration, rng, counts, force_accept, timer):
        seen["force_accept"] = force_accept
        return [], {t: [] for t in counts}

    def solve(policy, tokenizer, sb, tasks, cfg, lenient, desc, timer):
        seen["lenient"] = lenient
        return []

    monkeypatch.setattr(azr, "propose", propose)
    monkeypatch.setattr(azr, "solve", solve)
    monkeypatch.setattr(azr, "policy_update", lambda *args: {})
    buffers = Buffers(["deduction"], seed=seed_task)
    azr.self_play_iteration(None, types.SimpleNamespace(pad_token_id=0), None, None, buffers, Config(**flags),
                            {"deduction": 1}, 1, random.Random(0), azr.Timer())
    assert seen == {"force_accept": force_accept, "lenient": lenient}


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


def test_seed_files_are_revalidated_in_the_sandbox(tmp_path):
    """Official seed rows are checked like proposals: outputs recomputed, broken or unsafe programs dropped."""
    from sandbox import Sandbox
    rows = [{"snippet": "def g(x):\n    return x * 2", "input": "4", "output": "None"},       # wrong output, renamed
            {"snippet": "import os\ndef f(a):\n    return a", "input": "1", "output": "1"},   # forbidden import
            {"snippet": "def f(a):\n    return 1 / 0", "input": "1", "output": "1"},          # crashes
            {"snippet": "def f(a):\n    return a + 1", "inputs": [str(i) for i in range(10)],
             "outputs": ["0"] * 10, "message": "adds one"}]
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config(seed_file=[str(path)])
    buffers = Buffers(BUILTIN_TASK_TYPES, seed=seed_task)
    with Sandbox(workers=1) as sb:
        azr.load_seed_files(sb, buffers, cfg)
    assert buffers.sizes() == {"deduction": 2, "abduction": 2, "induction": 2}
    added = buffers["deduction"].tasks[-1]
    assert added.program == "def f(x):\n    return x * 2" and added.output == "8"
    assert buffers["induction"].tasks[-1].outputs[:3] == ["1", "2", "3"]


def test_seeding_stops_after_its_round_bound_and_says_so(monkeypatch, capsys):
    """A model that never writes a valid task cannot stall the run: 4 + target rounds, then a clear message."""
    calls = []

    def propose_nothing(policy, tokenizer, sb, buffers, cfg, iteration, rng, todo, force_accept, timer):
        calls.append(dict(todo))
        added = {"deduction": [Task("deduction", f"def f(a):\n    return a + {len(calls)}", "1", "2")]}
        return [], {t: added.get(t, []) if len(calls) == 1 else [] for t in todo}

    monkeypatch.setattr(azr, "propose", propose_nothing)
    cfg = Config(seed_buffer_size=3)
    buffers = Buffers(BUILTIN_TASK_TYPES, seed=seed_task)
    azr.seed_buffers(None, None, None, buffers, cfg, {"deduction": 1, "abduction": 1, "induction": 1},
                     random.Random(0))
    assert len(calls) == 4 + 3 and calls[0] == {"deduction": 2, "abduction": 2, "induction": 2}
    assert calls[1]["deduction"] == 1                      # each round proposes the remaining shortfall
    out = capsys.readouterr().out
    assert "seeding stopped after 7 rounds short of --seed-buffer-size 3" in out and "'deduction': 2" in out
