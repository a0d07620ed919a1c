"""Device hygiene, checked on a CPU: the auto dtype, threads and sandbox workers, checkpoints loaded to the CPU,
CUDA-synchronized phase timers, bf16 compute after k-bit preparation, evaluation on the adapter's own base, and
the update's tensors all on the policy's device."""
from __future__ import annotations

import json
import random

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import azr
import evaluate
import model as models
import runlog
import sandbox
from buffers import Buffers
from config import Config
from rewards import seed_task


@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_is_bf16_only_where_native(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # it allows emulation
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.default_dtype("cuda") == dtype == models.as_dtype("auto", "cuda")
    assert azr.plan_dtype(Config()) == {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    assert azr.plan_dtype(Config(dtype="fp32")) == "fp32"


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_auto_dtype_is_bf16_only_where_native(monkeypatch, native, dtype):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert models.cpu_native_bf16() is native
    assert models.default_dtype("cpu") == dtype == models.as_dtype("auto", "cpu")


def test_cpu_dtype_and_flag_values():
    assert models.default_dtype("cpu") in (torch.bfloat16, torch.float32)
    assert models.as_dtype("fp32", "cpu") == torch.float32 and models.as_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(azr.ConfigError, match="--dtype"):
        azr.parse_args(["--dtype", "int8"])


def test_threads_respect_omp_num_threads_and_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(sandbox.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(sandbox.os, "cpu_count", lambda: 64)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert models.usable_cpus() == 6 and models.threads_per_process(2) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert models.threads_per_process(2) == 5
    with sandbox.Sandbox(timeout=2) as sb:
        assert sb.num_workers == 6


class _CountingSync:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args) -> None:
        self.calls += 1


def test_phase_timers_synchronize_cuda_when_it_is_in_use(monkeypatch):
    sync = _CountingSync()
    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    timer = azr.Timer()
    with timer("update"):
        pass
    assert sync.calls == 0
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with timer("update"):
        pass
    assert sync.calls == 2        # before the clock starts and before it stops


def test_checkpoints_load_onto_the_cpu_whatever_saved_them(tiny_model_dir, tmp_path, monkeypatch):
    policy, _ = models.load_policy(str(tiny_model_dir), lora_r=4, lora_alpha=8, device="cpu", dtype="fp32")
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad])
    buffers = Buffers(["deduction"], capacity=10, seed=seed_task)
    runlog.save_checkpoint(tmp_path, policy, optimizer, buffers, Config(), 1, random.Random(0))
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("map_location")) or real_load(*a, **k))
    assert runlog.load_checkpoint(tmp_path, policy, optimizer)[0] == 1
    assert seen == ["cpu"]


def test_kbit_preparation_leaves_a_bf16_base_computing_in_bf16(tiny_model_dir):
    """peft's k-bit preparation casts the base to float32; prepare_for_training casts it back, so the base is
    bf16, the LoRA weights float32, and the update's autocast is on."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    def lora(base):
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(models.LORA_TARGETS)))

    alone = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    prepare_model_for_kbit_training(alone, use_gradient_checkpointing=False)
    assert models.frozen_dtype(lora(alone)) == torch.float32          # what the 4-bit path did before

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    models.prepare_for_training(base, kbit=True, gradient_checkpointing=True)
    policy = lora(base)
    assert base.is_activation_checkpointing
    assert {p.dtype for p in policy.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in policy.parameters() if p.requires_grad} == {torch.float32}
    assert models.frozen_dtype(policy) == torch.bfloat16 and models.lora_below_base_precision(policy)
    with models.lora_autocast(policy):
        assert torch.is_autocast_enabled("cpu")
        out = policy(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert out.dtype == torch.bfloat16


def test_evaluate_loads_the_base_the_adapters_run_used(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_config.json").write_text("{}")
    config = {"model": "Qwen/Qwen2.5-Coder-3B", "load_in_4bit": True, "dtype": "fp16"}
    (ckpt / "state.json").write_text(json.dumps({"iteration": 3, "config": config}))
    run = str(tmp_path / "run")
    assert evaluate.base_settings(evaluate.parse_args(["--adapter", run])) == ("Qwen/Qwen2.5-Coder-3B", True, "fp16")
    flags = ["--adapter", run, "--model", "other", "--no-load-in-4bit", "--dtype", "bf16"]
    assert evaluate.base_settings(evaluate.parse_args(flags)) == ("other", False, "bf16")
    assert evaluate.base_settings(evaluate.parse_args([])) == (models.DEFAULT_MODEL, False, "auto")


class _OneDevice(TorchFunctionMode):
    """Fails any torch call that mixes tensors (of more than one element) on different devices."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device.type for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim()}
        if len(devices) > 1:
            raise AssertionError(f"{func} mixes tensors on {sorted(devices)}")
        return func(*args, **kwargs)


def test_the_update_moves_every_input_to_the_policys_device(tiny_model_dir):
    """On the meta device, a tensor left on the CPU (a missing .to(device)) meets the model's in some call. The
    prompts share a prefix, and the forward, the chunked LM head with its backward and the KL pass all run."""
    policy, tokenizer = models.load_policy(str(tiny_model_dir), lora_r=4, lora_alpha=8, device="cpu", dtype="fp32")
    policy.to("meta")
    batch = [azr.Rollout("deduction", "solve", "", [5, 6, 7, 8], [9, 10, 11], "", advantage=1.0),
             azr.Rollout("deduction", "solve", "", [5, 6, 7, 9], [9, 12], "", advantage=-1.0)]
    with _OneDevice():
        old_logps = {}
        sums = azr.micro_batch_backward(policy, batch, [0, 1], old_logps, 5, Config(entropy_coef=0.01, kl_coef=0.1))
    assert {v.device.type for v in sums.values()} == {"meta"} and [len(v) for v in old_logps.values()] == [3, 2]
