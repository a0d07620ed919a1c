"""Data parallel over processes on CPU (gloo): the same code path `accelerate launch` takes on several GPUs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import azr
from buffers import Buffers

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_sharded_update_equals_single_process_update(tiny_model_dir, tmp_path):
    """Two processes each backpropagate part of the batch; the summed gradient must give the single-process step."""
    import distributed_update

    out = tmp_path / "two.pt"
    # --standalone: torchrun binds a free port itself (no window between picking a port and binding it)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests" / "distributed_update.py"), str(tiny_model_dir), str(out)], tmp_path)
    two = torch.load(out, weights_only=True)
    assert two["world"] == 2
    weights, stats = distributed_update.update(str(tiny_model_dir))
    before = {n: p for n, p in distributed_update.lora_policy(str(tiny_model_dir))[0].named_parameters()
              if p.requires_grad}
    assert weights.keys() == two["weights"].keys() == before.keys()
    assert all(not torch.allclose(w, before[n]) for n, w in weights.items()), "the update must move every weight"
    for name, w in weights.items():
        assert torch.allclose(w, two["weights"][name], atol=1e-6, rtol=1e-5), name
    for key in ("loss", "entropy", "clip_fraction", "kl", "grad_norm"):
        assert two["stats"][key] == pytest.approx(stats[key], rel=1e-4, abs=1e-7), key


def test_accelerate_launch_two_processes_then_resume_in_one(formatted_tiny_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (torchrun underneath; gloo on CPU) runs the real loop;
    the main process alone writes the run dir, and a single process resumes it."""
    from test_azr import metrics, tiny_args

    run_dir = tmp_path / "run"
    # `python -m accelerate.commands.launch` is `accelerate launch` without needing the console script on PATH
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()),
                str(REPO / "azr.py"), *tiny_args(formatted_tiny_dir, run_dir, 1)], tmp_path)
    assert "x 2 process(es)" in proc.stdout
    rows = metrics(run_dir)
    assert [r["iteration"] for r in rows] == [1]
    # every proposal of the iteration was generated once, split over the two processes and gathered
    assert sum(rows[0][f"{t}/propose/count"] for t in ("deduction", "abduction", "induction")) == 6
    assert sum(Buffers.load(run_dir / "checkpoint" / "buffers.jsonl").sizes().values()) >= 3
    trainer = torch.load(run_dir / "checkpoint" / "trainer.pt", weights_only=True)
    assert len(trainer["torch_rng"]) == 2           # both processes' sampling states
    assert not torch.equal(trainer["torch_rng"][0]["cpu"], trainer["torch_rng"][1]["cpu"])
    assert azr.main(["--resume", str(run_dir), "--iterations", "2"]) == 0
    assert [r["iteration"] for r in metrics(run_dir)] == [1, 2]
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["iteration"] == 2
