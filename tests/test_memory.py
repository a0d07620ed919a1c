"""The memory plan (memory.py): its sizes agree with a real model's, every GPU preset and the 24 GB example fit
their card with 10% free, `python azr.py` picks the preset of each card, and --plan answers 0 or 2."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch

import azr
import memory
import model as models
from config import GPU_PRESETS, PRESETS, Config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_7B = str(ROOT / "data/model-configs/Qwen2.5-Coder-7B")


def test_the_shape_counts_the_parameters_of_a_real_model(tiny_model_dir):
    """Weights, LoRA parameters and KV bytes per position, from config.json alone, equal the tiny model's own."""
    shape = memory.load_shape(tiny_model_dir)
    policy, _ = models.load_policy(str(tiny_model_dir), lora_r=4, lora_alpha=8, load_in_4bit=False, device="cpu",
                                   dtype="fp32")
    base = [p for n, p in policy.named_parameters() if "lora_" not in n]
    assert shape.linear_params() + shape.other_params() == sum(p.numel() for p in base)
    assert shape.lora_params(4) == sum(p.numel() for p in policy.parameters() if p.requires_grad)
    from transformers import DynamicCache
    cache = DynamicCache(config=policy.config)
    with torch.no_grad():
        policy(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True)
    cached = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4
    assert shape.kv_bytes_per_position(4) * 3 == cached


@pytest.mark.parametrize("name, billions", [("Qwen2.5-Coder-0.5B-Instruct", 0.49), ("Qwen2.5-Coder-3B", 3.09),
                                            ("Qwen2.5-Coder-7B", 7.62)])
def test_the_shipped_configs_hold_the_published_sizes(name, billions):
    shape = memory.load_shape(memory.MODEL_CONFIGS / name)
    assert (shape.linear_params() + shape.other_params()) / 1e9 == pytest.approx(billions, abs=0.01)


@pytest.mark.parametrize("preset", list(GPU_PRESETS))
def test_every_gpu_preset_fits_its_card_with_a_tenth_free(preset):
    cfg = Config(**PRESETS[preset])
    assert memory.shipped_config(cfg.model), "the preset's model config ships, so --plan works offline"
    assert all(Path(f).is_file() for f in cfg.seed_file) and cfg.load_in_4bit and cfg.gradient_checkpointing
    assert azr.memory_plan(cfg).headroom(GPU_PRESETS[preset]) >= 0.10


def test_the_24gb_example_fits_its_card_with_a_tenth_free():
    script = (ROOT / "examples/gpu_24gb.sh").read_text().replace("\\\n", " ")
    line = next(line for line in script.splitlines() if line.startswith("python azr.py"))
    flags = [f for f in shlex.split(line)[2:] if f != "$@"]
    cfg, _, launch = azr.parse_args(flags + ["--gpu-memory-gib", "24"])
    assert launch.preset == "gpu-24gb"
    assert azr.memory_plan(cfg).headroom(24) >= 0.10


@pytest.mark.parametrize("card, preset", [(24, "gpu-24gb"), (48, "gpu-48gb"), (80, "gpu-80gb")])
def test_each_card_gets_its_preset(card, preset):
    cfg, _, launch = azr.parse_args(["--gpu-memory-gib", str(card)])
    assert launch.preset == preset and launch.card_gib == card
    assert azr.memory_plan(cfg).peak <= 0.9 * card * memory.GIB


def test_a_larger_batch_or_cap_plans_more():
    shape = memory.load_shape(memory.MODEL_CONFIGS / "Qwen2.5-Coder-3B")
    settings = dict(load_in_4bit=True, dtype="bf16", lora_r=16, generation_batch_size=32, micro_batch_size=2,
                    max_new_tokens=2048, num_references=6, gradient_checkpointing=True)
    base = memory.plan(shape, **settings)
    for change in ({"generation_batch_size": 64}, {"max_new_tokens": 4096}):
        assert memory.plan(shape, **{**settings, **change}).generation > base.generation
    assert memory.plan(shape, **{**settings, "gradient_checkpointing": False}).update > base.update
    assert memory.plan(shape, **{**settings, "load_in_4bit": False}).weights > 3 * base.weights


def test_plan_exits_0_when_it_fits_and_2_with_one_line_when_not(capsys):
    assert azr.main(["--plan", "--gpu-memory-gib", "24"]) == 0
    out = capsys.readouterr().out
    assert "gpu-24gb" in out and "Qwen/Qwen2.5-Coder-3B" in out and "fits" in out
    assert azr.main(["--plan", "--gpu-memory-gib", "8", "--model", SHIPPED_7B]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--generation-batch-size" in err and "8.0 GiB" in err


def test_the_update_chunk_is_the_plans():
    assert azr.LOGITS_CHUNK_TOKENS == memory.LOGITS_CHUNK_TOKENS
