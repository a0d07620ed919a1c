"""default_model.py and model.py: default-model assembly and verification, resolving names, LoRA policy and eval
loading."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
import torch

import default_model as D
import model as M


def make_parts(tmp_path, chunks: list[bytes]):
    parts = []
    for i, chunk in enumerate(chunks, 1):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(chunk)
        parts.append(p)
    whole = b"".join(chunks)
    return parts, hashlib.sha256(whole).hexdigest(), len(whole)


def test_assemble_parts_concatenates_in_order(tmp_path):
    parts, sha, size = make_parts(tmp_path, [b"GGUF" * 1000, b"abc" * 777, b"tail"])
    dest = D.assemble_parts(parts, tmp_path / "cache" / "m.gguf", sha, size)
    assert dest.read_bytes() == b"GGUF" * 1000 + b"abc" * 777 + b"tail"
    assert D.sha256_file(dest) == sha
    # a second call keeps the verified file
    mtime = dest.stat().st_mtime_ns
    assert D.assemble_parts(parts, dest, sha, size) == dest and dest.stat().st_mtime_ns == mtime


def test_assemble_parts_rejects_corrupted_part(tmp_path):
    parts, sha, size = make_parts(tmp_path, [b"x" * 5000, b"y" * 3000])
    parts[1].write_bytes(b"y" * 2999 + b"z")  # same size, one byte flipped
    dest = tmp_path / "cache" / "m.gguf"
    with pytest.raises(M.ModelError, match="sha256"):
        D.assemble_parts(parts, dest, sha, size)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no partial file left behind


def test_assemble_parts_rejects_wrong_size(tmp_path):
    parts, sha, size = make_parts(tmp_path, [b"x" * 5000, b"y" * 3000])
    parts[1].write_bytes(b"y" * 10)
    with pytest.raises(M.ModelError, match="bytes"):
        D.assemble_parts(parts, tmp_path / "m.gguf", sha, size)


def test_assemble_parts_rebuilds_corrupted_cache(tmp_path):
    parts, sha, size = make_parts(tmp_path, [b"a" * 100, b"b" * 100])
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"a" * 100 + b"c" * 100)  # right size, wrong content
    D.assemble_parts(parts, dest, sha, size)
    assert D.sha256_file(dest) == sha


def test_missing_parts_name_the_pip_command():
    with pytest.raises(M.ModelError, match="pip install") as e:
        D.find_parts(("azr-no-such-package-part1",))
    assert "\n" not in str(e.value)


def test_default_model_path_returns_cached_folder(tmp_path):
    out = tmp_path / D.DEFAULT_HF_DIR
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert D.default_model_path(tmp_path) == out  # no assembly, no conversion


@pytest.mark.parametrize("name", ["/no/such/dir", "./missing_model", "missing.gguf", "~/nope/model.gguf", "a/b/c"])
def test_resolve_model_missing_path_is_model_error(name):
    with pytest.raises(M.ModelError) as e:
        M.resolve_model(name)
    assert "\n" not in str(e.value)


def test_resolve_model_passes_through(tmp_path, tiny_model_dir):
    assert M.resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert M.resolve_model("Qwen/Qwen2.5-Coder-3B-Instruct") == "Qwen/Qwen2.5-Coder-3B-Instruct"
    (tmp_path / "empty").mkdir()
    with pytest.raises(M.ModelError, match="config.json"):
        M.resolve_model(str(tmp_path / "empty"))


def test_dtype_and_device_helpers():
    assert M.as_dtype("bf16") is torch.bfloat16 and M.as_dtype("fp32") is torch.float32
    assert M.as_dtype(torch.float16) is torch.float16
    with pytest.raises(M.ModelError):
        M.as_dtype("int3")
    assert M.pick_device() in ("cpu", "cuda")
    assert M.default_dtype("cpu") in (torch.bfloat16, torch.float32)
    assert M.default_dtype("cuda") in (torch.bfloat16, torch.float16)
    assert M.set_torch_threads() >= 1


def test_load_policy_only_lora_trains(tiny_model_dir):
    from peft import PeftModel

    policy, tok = M.load_policy(str(tiny_model_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0, load_in_4bit=False,
                                gradient_checkpointing=True, device="cpu", dtype=torch.float32)
    assert isinstance(policy, PeftModel)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for target in M.LORA_TARGETS:
        assert any(f"{target}.lora_A" in n for n in trainable), target
    assert tok.padding_side == "left" and tok.pad_token is not None and tok.chat_template

    # one training step changes LoRA weights only
    batch = tok(["def f(a):\n    return a", "x"], return_tensors="pt", padding=True)
    assert (batch.attention_mask[1, 0] == 0) and (batch.attention_mask[1, -1] == 1)  # left padded
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    policy.train()
    loss = policy(**batch, labels=batch.input_ids.masked_fill(batch.attention_mask == 0, -100), use_cache=False).loss
    loss.backward()
    torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2).step()
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_policy_generates_and_reference_is_adapter_disabled(tiny_model_dir):
    policy, tok = M.load_policy(str(tiny_model_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0, load_in_4bit=False,
                                gradient_checkpointing=False, device="cpu", dtype="bf16")
    policy.eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
               for c in ("def f(a): return a", "Predict the output of f('Hello world')")]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = policy.generate(**batch, max_new_tokens=8, do_sample=True, temperature=1.0,
                              pad_token_id=tok.pad_token_id)
        assert out.shape[0] == 2 and out.shape[1] <= batch.input_ids.shape[1] + 8
        with policy.disable_adapter():
            ref = policy(**batch).logits
    assert torch.isfinite(ref.float()).all()


def test_lora_autocast_runs_the_adapter_in_bf16(tiny_model_dir):
    """On a bf16 base the adapter sees bf16 inputs (no float32 copy of the activations), gradients reach the
    float32 LoRA weights through gradient checkpointing and match the float32-adapter gradients closely."""
    policy, tok = M.load_policy(str(tiny_model_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0, load_in_4bit=False,
                                gradient_checkpointing=True, device="cpu", dtype="bf16")
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)                      # so the gradient reaches lora_A too
    policy.train()
    lora_a = next(m for n, m in policy.named_modules() if n.endswith("q_proj.lora_A.default"))
    seen: list[torch.dtype] = []
    lora_a.register_forward_hook(lambda mod, args, out: seen.append(args[0].dtype))
    batch = tok(["def f(a):\n    return a", "x = [1, 2, 3]"], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    grads = {}
    for mode in ("float32 adapter", "base precision"):
        policy.zero_grad(set_to_none=True)
        seen.clear()
        fast = mode == "base precision"
        with M.adapter_inputs_uncast(policy) if fast else contextlib.nullcontext():
            with M.lora_autocast(policy) if fast else contextlib.nullcontext():
                loss = policy(**batch, labels=labels, use_cache=False).loss
            loss.backward()                             # recomputes the forward (gradient checkpointing)
        grads[mode] = torch.cat([p.grad.flatten() for p in policy.parameters() if p.requires_grad])
        assert all(p.dtype == torch.float32 for p in policy.parameters() if p.requires_grad)
        assert set(seen) == {torch.float32 if mode == "float32 adapter" else torch.bfloat16}, (mode, seen)
    a, b = grads.values()
    assert torch.isfinite(b).all() and float(b.norm()) > 0
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99
    fp32, _ = M.load_policy(str(tiny_model_dir), lora_r=4, load_in_4bit=False, device="cpu", dtype=torch.float32)
    assert M.lora_below_base_precision(policy) and not M.lora_below_base_precision(fp32)
    with M.lora_autocast(fp32), M.adapter_inputs_uncast(fp32):     # a float32 base: nothing changes
        assert not torch.is_autocast_enabled("cpu")
        assert all(m.cast_input_dtype_enabled for m in fp32.modules() if hasattr(m, "cast_input_dtype_enabled"))


def test_load_for_eval_with_adapter(tiny_model_dir, tmp_path):
    policy, _ = M.load_policy(str(tiny_model_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0, load_in_4bit=False,
                              gradient_checkpointing=False, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)  # make the adapter matter
    policy.save_pretrained(tmp_path / "adapter")
    net, tok = M.load_for_eval(str(tiny_model_dir), adapter=str(tmp_path / "adapter"), device="cpu",
                               dtype=torch.float32, load_in_4bit=False)
    ids = tok(["def f(a):"], return_tensors="pt")
    with torch.no_grad():
        policy.eval()
        assert torch.allclose(net(**ids).logits, policy(**ids).logits, atol=1e-5)
    base, _ = M.load_for_eval(str(tiny_model_dir), device="cpu", dtype=torch.float32, load_in_4bit=False)
    assert not base.training
    with pytest.raises(M.ModelError, match="adapter"):
        M.load_for_eval(str(tiny_model_dir), adapter=str(tmp_path / "nope"), device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_default_model_generates(load_in_4bit):
    net, tok = M.load_for_eval(M.DEFAULT_MODEL, device="cpu", dtype="bf16", load_in_4bit=load_in_4bit)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that adds two numbers."}],
                                   tokenize=False, add_generation_prompt=True)
    batch = tok([text], return_tensors="pt")
    with torch.no_grad():
        out = net.generate(**batch, max_new_tokens=16, do_sample=False)
    reply = tok.decode(out[0, batch.input_ids.shape[1]:], skip_special_tokens=True)
    print(f"load_in_4bit={load_in_4bit}: {reply!r}")
    assert "def" in reply or "return" in reply, reply
