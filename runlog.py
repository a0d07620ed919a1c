"""runlog.py — the run directory: metrics and samples logs, the plot, the optional wandb/tensorboard mirror, and
the checkpoint (written atomically, recovered after a crash, restored on --resume).

    RUN_DIR/metrics.jsonl  samples.jsonl  curves.png  config.json  checkpoint/{adapter/, trainer.pt, buffers.jsonl,
    state.json}

With several processes the main one writes; every process's torch RNG state goes into the checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from buffers import Buffers
from config import Config, ConfigError


def truncate_logs(run_dir: Path, iteration: int) -> None:
    """Drop log lines of iterations after `iteration` (on resume they will be redone; a new run keeps none)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / name
        if path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["iteration"] <= iteration]
            path.write_text("".join(line + "\n" for line in keep))


def append_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def plot(run_dir: Path) -> None:
    """Redraw run_dir/curves.png from metrics.jsonl: rewards, solve/validity rates, lengths, eval accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    panels = [("reward_mean", "mean reward"), ("solve_rate", "solve rate (solver)"),
              ("validity_rate", "proposal validity"), ("response_tokens_mean", "response tokens")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 3.6))
    its = [r["iteration"] for r in rows]
    for ax, (suffix, title) in zip(axes, panels):
        for key in sorted({k for r in rows for k in r if k.endswith("/" + suffix)}):
            ax.plot(its, [r.get(key) for r in rows], marker=".", label=key.rsplit("/", 1)[0])
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    ax = axes[-1]
    evals = [(r["iteration"], r["eval/cruxeval-o"]) for r in rows if r.get("eval/cruxeval-o") is not None]
    if evals:
        ax.plot(*zip(*evals), marker="o", label="CRUXEval-O (held out)")
        ax.legend(fontsize=7)
    ax.set_title("held-out accuracy")
    ax.set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png.tmp", format="png", dpi=90)
    plt.close(fig)
    os.replace(run_dir / "curves.png.tmp", run_dir / "curves.png")


class Reporter:
    """Optional mirror of metrics to wandb or tensorboard (imported only when asked for)."""

    def __init__(self, kind: str, run_dir: Path, cfg: Config) -> None:
        self.kind, self.backend = kind, None
        if kind == "wandb":
            import wandb
            self.backend = wandb.init(project="azr", dir=str(run_dir), config=dataclasses.asdict(cfg))
        elif kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.backend = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, m: dict) -> None:
        scalars = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.kind == "wandb":
            self.backend.log(scalars, step=m["iteration"])
        elif self.kind == "tensorboard":
            for k, v in scalars.items():
                self.backend.add_scalar(k, v, m["iteration"])


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read checkpoint {path}: {e}") from None


def save_checkpoint(run_dir: Path, policy, optimizer, buffers: Buffers, cfg: Config, iteration: int,
                    rng: random.Random) -> None:
    """Write run_dir/checkpoint atomically: build it beside, then swap directories with renames.
    Every process's torch RNG state is kept; the rest is identical on all processes and the main one writes."""
    torch_rng = gather_object([{"cpu": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}])
    if not PartialState().is_main_process:
        return
    tmp, final, old = run_dir / "checkpoint.tmp", run_dir / "checkpoint", run_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    policy.save_pretrained(tmp / "adapter")
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch_rng}, tmp / "trainer.pt")
    buffers.save(tmp / "buffers.jsonl")
    state = {"iteration": iteration, "config": dataclasses.asdict(cfg), "python_rng": rng.getstate()}
    (tmp / "state.json").write_text(json.dumps(state))
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)            # a crash between the two renames leaves checkpoint.old, found on resume
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path) -> Path:
    """run_dir/checkpoint, recovering checkpoint.old if a crash fell between save_checkpoint's two renames."""
    ckpt = run_dir / "checkpoint"
    if not ckpt.exists() and (run_dir / "checkpoint.old").exists():
        try:
            os.replace(run_dir / "checkpoint.old", ckpt)
        except FileNotFoundError:     # another process of this run recovered it first
            pass
    return ckpt


def load_checkpoint(run_dir: Path, policy, optimizer) -> tuple[int, Buffers, random.Random]:
    """Restore adapter weights, optimizer, buffers, RNG states; returns the last finished iteration.
    A process without a saved RNG state (resumed with more processes than saved it) keeps its fresh seed."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt = find_checkpoint(run_dir)
    state = load_json(ckpt / "state.json")
    set_peft_model_state_dict(policy, load_file(ckpt / "adapter" / "adapter_model.safetensors"))
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True, map_location="cpu")   # saved on any device;
    # load_state_dict moves the optimizer state to its parameters' device
    optimizer.load_state_dict(trainer["optimizer"])
    rank = PartialState().process_index
    if rank < len(trainer["torch_rng"]):
        saved = trainer["torch_rng"][rank]
        torch.set_rng_state(saved["cpu"])
        if saved["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
    rng = random.Random()
    rng.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python_rng"]))
    return state["iteration"], Buffers.load(ckpt / "buffers.jsonl"), rng
