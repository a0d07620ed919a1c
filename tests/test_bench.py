"""The benchmark scripts in bench/ start from any directory: their imports of the repo's flat modules resolve and
their options parse. Their real runs are long and print figures, so they are not part of the fast suite; the proposal
probe's task-type selection is checked on the tiny model, and the GPU check runs whole at a tiny shape."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = ["bench_azr.py", "bench_generation.py", "bench_int8.py", "bench_model.py", "bench_proposals.py",
           "bench_sandbox.py", "bench_update.py", "bench_update_memory.py", "gpu_check.py"]


def test_every_benchmark_is_listed():
    assert sorted(p.name for p in BENCH.glob("*.py")) == sorted(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_help_runs_from_elsewhere(script, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_proposal_probe_runs_one_task_type_alone(tiny_model_dir, tmp_path):
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_proposals.py"), "--model", str(tiny_model_dir),
                           "--cells", "r1:1.0:1.0:identity:compact", "--task-types", "induction", "--samples", "2",
                           "--max-new-tokens", "8", "--induction-inputs", "4", "--output", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [cell] = json.loads(out.read_text())
    assert list(cell["types"]) == ["induction"]
    induction = cell["types"]["induction"]
    assert induction["n"] == 2 and len(induction["samples"]) == 2
    assert all("def f(a):\n    return a" in s["prompt"] for s in induction["samples"])   # the identity seed's


def test_the_int8_benchmark_prints_drift_speed_and_agreement(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_int8.py"), "--model", str(tiny_model_dir),
                           "--drift-items", "2", "--max-new-tokens", "8", "--greedy-tokens", "4"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("int8: KL per token mean", "bf16: KL per token mean", "ratio int8 / policy", "identical responses"):
        assert line in proc.stdout


def test_the_update_memory_benchmark_compares_two_settings(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_update_memory.py"), "--model", str(tiny_model_dir),
                           "--prompt", "40", "--response", "8", "--settings", "0", "16"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint above never:" in proc.stdout and "checkpoint above    16:" in proc.stdout
    assert "ratio: time" in proc.stdout


def test_the_gpu_check_runs_at_a_tiny_shape(tmp_path):
    """bench/gpu_check.py --tiny: a random model from the shipped config, shrunk, through the loop's generation,
    transformers' continuous batching and one update step, with no download."""
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--tiny"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generation (generation.generate)" in proc.stdout and "update (2 x" in proc.stdout
    assert "continuous batching:" in proc.stdout and "tokens/s" in proc.stdout


def load_bench(name: str):
    """A bench script imported as a module (it puts the repo's flat modules on sys.path itself)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_update_profile_counts_prompt_and_response_positions_of_the_packed_rows():
    import random

    import azr
    from config import PRESETS, Config

    bench = load_bench("bench_update")
    cfg = Config(**{**PRESETS["cpu-demo"], "mini_batches": 1, "micro_batch_size": 2})
    prompt = list(range(100, 130))                                     # 30 tokens two proposals share
    samples = [azr.Rollout("deduction", "propose", "", prompt, [1, 2, 3, 4], ""),
               azr.Rollout("deduction", "propose", "", prompt, [1, 2, 9], ""),      # shares 2 response tokens
               azr.Rollout("deduction", "solve", "", [7] * 20, [8] * 5, "")]
    counts = bench.packed_counts(samples, cfg, random.Random(0))
    assert counts["prompt tokens"] == 80 and counts["response tokens"] == 12
    assert counts["prompt nodes"] == 30 + 20 and counts["response nodes"] == 4 + 1 + 5
    assert counts["no-grad nodes"] == counts["recomputed nodes"] == 0             # one mini-batch, short rows


def test_the_update_profile_counts_the_linear_layers_arithmetic_per_position():
    from types import SimpleNamespace

    bench = load_bench("bench_update")
    text = SimpleNamespace(hidden_size=8, num_key_value_heads=1, num_attention_heads=2, intermediate_size=16,
                           num_hidden_layers=3, vocab_size=100)        # head size 4: k and v project 8 -> 4
    counts = {"prompt nodes": 1, "response nodes": 0, "no-grad nodes": 0, "no-grad response nodes": 0,
              "recomputed nodes": 0}
    flops = bench.linear_flops(text, rank=2, counts=counts)              # one prompt position, forward + backward
    assert flops["attention projections"] == 4 * 3 * (8 * 8 * 2 + 8 * 4 * 2)
    assert flops["MLP"] == 4 * 3 * (8 * 16 * 3)
    assert flops["LoRA"] == 6 * 3 * 2 * ((8 + 8) * 2 + (8 + 4) * 2 + (8 + 16) * 3)
    assert flops["LM head"] == 0
    counts.update({"response nodes": 1, "no-grad nodes": 1, "no-grad response nodes": 1})
    flops = bench.linear_flops(text, rank=2, counts=counts)
    assert flops["LM head"] == (4 + 2) * 100 * 8
    assert flops["MLP"] == (4 * 2 + 2) * 3 * (8 * 16 * 3)


def test_the_update_profile_runs_on_the_tiny_model(tiny_model_dir, capsys):
    import random

    import azr
    import model as models
    from config import PRESETS, Config

    bench = load_bench("bench_update")
    cfg = Config(**{**PRESETS["cpu-demo"], "model": str(tiny_model_dir)})
    policy, _ = models.load_policy(str(tiny_model_dir), lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                   load_in_4bit=False, gradient_checkpointing=False, device="cpu")
    rng = random.Random(0)
    samples = [azr.Rollout("deduction", "solve", "", [rng.randrange(10, 90) for _ in range(30)],
                           [rng.randrange(10, 90) for _ in range(9)], "", advantage=1.0) for _ in range(4)]
    bench.profile(policy, samples, cfg, {k: v.clone() for k, v in policy.state_dict().items() if "lora_" in k})
    out = capsys.readouterr().out
    assert "36 response nodes" in out and "78 in the no-grad pass" in out     # 4 x 9 responses; 2 of 4 after step 1
    for line in ("by pass:", "by operator group", "the linear layers' arithmetic", "matmul at the MLP's shape"):
        assert line in out
