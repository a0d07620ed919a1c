"""Loading the policy: --model resolved to a loadable folder, LoRA (optionally on 4-bit NF4), and eval models.

The default model, Qwen2.5-Coder-0.5B-Instruct, comes from PyPI part packages (default_model.py says which, and
why). peft and bitsandbytes take seconds to import, so they are imported only inside the functions.
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from default_model import DEFAULT_MODEL, ModelError, cache_root, convert_gguf, default_model_path, sha256_file
from memory import LORA_TARGETS  # LoRA on every attention and MLP projection (the QLoRA recipe)
from sandbox import usable_cpus  # the CPUs this process may run on

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# CPU defaults, from `python bench/bench_model.py` on the 2-core CPUs (README, docs/LOG.md): plain LoRA, no 4-bit
# (an 8x256-token step took 23.0 s in bf16, 24.3 s on 4-bit NF4). The dtype depends on the CPU (default_dtype): on
# the first benchmark's CPU bf16 was the fastest (the step 23.0 s against 43.1 s in fp32; sampling 67.2 tok/s
# against 31.8); on an AVX2-only CPU, where oneDNN emulates bf16, fp32 was faster (2.2x in 16-row decoding, 6.5x
# in prefill).
CPU_LOAD_IN_4BIT = False


# -----------------------------------------------------------------------------
# devices, dtypes, threads


def pick_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = ("auto", "bf16", "fp16", "fp32")   # --dtype choices


def default_dtype(device: str | None = None) -> torch.dtype:
    """bf16 on a CUDA GPU that computes it natively, else fp16; on a CPU bf16 where native, else fp32."""
    device = device or pick_device()
    if str(device).startswith("cuda"):
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.bfloat16 if cpu_native_bf16() else torch.float32


def cpu_native_bf16() -> bool:
    """Does oneDNN run bf16 natively on this CPU (its check: yes from AVX-512 on, no on AVX2-only x86)? Without it
    bf16 matmuls of 32+ rows ran 3.4-6x slower than fp32 on a 2-core AVX2 CPU (docs/LOG.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):   # a torch build without oneDNN
        return False


def native_bf16(device: str | torch.device = "cuda") -> bool:
    """Does this CUDA GPU have bf16 arithmetic (compute capability 8.0+, Ampere on)? torch.cuda.is_bf16_supported()
    also says yes for older cards (T4, V100), where bf16 is emulated, far slower than their fp16."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8


def default_load_in_4bit(device: str | None = None) -> bool:
    """4-bit NF4 on CUDA (QLoRA); on CPU whichever the benchmark found faster."""
    device = device or pick_device()
    return True if str(device).startswith("cuda") else CPU_LOAD_IN_4BIT


def as_dtype(dtype: str | torch.dtype | None, device: str | None = None) -> torch.dtype:
    """Accept torch dtypes or names like 'bf16', 'bfloat16', 'fp32', 'float16'; None means the default."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    key = str(dtype).lower().removeprefix("torch.")
    if key not in names:
        raise ModelError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    return names[key]


def threads_per_process(local_processes: int = 1) -> int:
    """Torch threads for one of `local_processes` processes sharing this machine: $OMP_NUM_THREADS when set (the
    user's or the launcher's choice), else an equal share of the usable CPUs."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return max(1, usable_cpus() // max(1, local_processes))


def set_torch_threads(num_threads: int | None = None) -> int:
    """Set torch's thread count (default: threads_per_process(), one process) and return it."""
    torch.set_num_threads(max(1, num_threads or threads_per_process()))
    return torch.get_num_threads()


def resolve_model(name: str | Path, cache_dir: str | Path | None = None) -> str:
    """Turn `--model` into something `from_pretrained` loads: the default sentinel (the PyPI part packages,
    default_model.py), a .gguf file (converted once, cached by content hash), a local HF folder, or a hub id
    ('org/name', passed through)."""
    name = str(name)
    if name in (DEFAULT_MODEL, "default"):
        return str(default_model_path(cache_dir))
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {name}")
        out = cache_root(cache_dir) / f"{path.stem}-{sha256_file(path)[:16]}-bf16"
        if not (out / "config.json").is_file():
            print(f"azr: converting {path.name} once into {out}...", flush=True)
        return str(convert_gguf(path, out))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{name} is a folder but not a Hugging Face model (no config.json)")
        return str(path)
    if path.exists():
        raise ModelError(f"{name} is a file, not a model folder or a .gguf file")
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise ModelError(f"model not found: {name} (not a local folder, a .gguf file, or a hub id 'org/name')")
    return name  # a hub id; from_pretrained downloads it


# -----------------------------------------------------------------------------
# loading


def load_tokenizer(path: str) -> "PreTrainedTokenizerBase":
    """Tokenizer for batched generation: left padding and a pad token (falls back to EOS)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"could not load the tokenizer of {path}: {type(e).__name__}: {e}".splitlines()[0]) from e
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer of {path} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_base(path: str, device: str, dtype: torch.dtype, load_in_4bit: bool) -> "PreTrainedModel":
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype}
    if load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as e:
            raise ModelError(f"load_in_4bit needs bitsandbytes: {e}; run: pip install bitsandbytes") from e
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        raise ModelError(f"could not load model {path}: {type(e).__name__}: {e}".splitlines()[0]) from e
    if not load_in_4bit:
        model.to(device)
    gen = model.generation_config
    if gen is not None and gen.pad_token_id is None:
        pad = getattr(model.config, "pad_token_id", None)
        gen.pad_token_id = pad if pad is not None else gen.eos_token_id
    return model


def load_policy(
    model: str,
    *,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    load_in_4bit: bool | None = None,
    gradient_checkpointing: bool = False,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple["PeftModel", "PreTrainedTokenizerBase"]:
    """The trainable policy: base model (optionally 4-bit NF4) + a fresh LoRA adapter; only LoRA trains.

    The reference policy for a KL term is the same model inside `with policy.disable_adapter():`.
    None for device/dtype/load_in_4bit picks the defaults (see pick_device, default_dtype, default_load_in_4bit).
    """
    from peft import LoraConfig, get_peft_model

    path = resolve_model(model)
    device = device or pick_device()
    dtype = as_dtype(dtype, device)
    load_in_4bit = default_load_in_4bit(device) if load_in_4bit is None else load_in_4bit
    tokenizer = load_tokenizer(path)
    base = _load_base(path, device, dtype, load_in_4bit)
    prepare_for_training(base, kbit=load_in_4bit and str(device).startswith("cuda"),
                         gradient_checkpointing=gradient_checkpointing)
    present = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    targets = [t for t in LORA_TARGETS if t in present]
    if not targets:
        raise ModelError(f"none of the LoRA target modules {list(LORA_TARGETS)} exist in {path}")
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    policy = get_peft_model(base, config)
    return policy, tokenizer


def prepare_for_training(base: "PreTrainedModel", kbit: bool, gradient_checkpointing: bool) -> None:
    """Set a base up for LoRA training: gradient checkpointing if asked, and for a 4-bit base (kbit) peft's k-bit
    preparation. That casts every parameter that is not 4-bit (embeddings, norms, the LM head, the q/k/v biases)
    to float32; here they go back to the dtype the base was loaded in, so a 4-bit base computes in bf16 as a bf16
    base does (the QLoRA recipe): frozen_dtype reports bf16, and the update's autocast and the merged-adapter
    sampling path act. The LoRA weights that get_peft_model adds stay float32, for the optimizer."""
    from peft import prepare_model_for_kbit_training

    if kbit:
        compute = base.dtype                         # the first floating-point parameter's: the loading dtype
        prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        for p in base.parameters():
            if p.dtype == torch.float32 and compute != torch.float32:    # 4-bit packed weights are uint8
                p.data = p.data.to(compute)
    if gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()


@contextmanager
def activation_checkpointing(policy, on: bool):
    """While inside, if `on`, the policy's decoder layers keep only their inputs for the backward and recompute the
    rest there (non-reentrant checkpointing): a micro-batch's activations shrink to one hidden state per layer, for
    one more forward. Gradients are the same. A base with checkpointing on already (--gradient-checkpointing) is
    left as it is."""
    base = policy.get_base_model()
    if not on or base.is_activation_checkpointing:
        yield
        return
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        base.activation_checkpointing_disable()
        base.disable_input_require_grads()          # the hook enabling added; non-reentrant needs none


def frozen_dtype(net) -> torch.dtype | None:
    """The dtype of the frozen (base) floating-point weights; 4-bit packed weights are not floating point."""
    return next((p.dtype for p in net.parameters() if not p.requires_grad and p.is_floating_point()), None)


def lora_below_base_precision(policy) -> bool:
    """True when the frozen base weights are bf16 and the trainable LoRA weights float32 (for the optimizer)."""
    base = frozen_dtype(policy)
    return base == torch.bfloat16 and any(p.dtype != base for p in policy.parameters() if p.requires_grad)


def lora_autocast(policy) -> AbstractContextManager:
    """Autocast to bf16 if `lora_below_base_precision`, so the adapter's matmuls run in bf16, as the sampler's merged
    bf16 weights do (generation.adapters_merged). Wrap the forward only; gradients reach the float32 weights.
    Otherwise nothing."""
    if not lora_below_base_precision(policy):
        return nullcontext()
    return torch.autocast(next(policy.parameters()).device.type, dtype=torch.bfloat16)


@contextmanager
def adapter_inputs_uncast(policy):
    """Stop PEFT casting each adapted layer's input to the float32 LoRA dtype (a copy of every activation, and
    float32 sums) if `lora_below_base_precision`. Only valid with the forward under `lora_autocast`; enter it
    around the forward and the backward, which recomputes the forward under gradient checkpointing. Without it
    the default model's update took 1.27x longer (bench/bench_update.py, README)."""
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(policy, active=lora_below_base_precision(policy)):
        yield


def load_for_eval(
    model: str,
    adapter: str | Path | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    load_in_4bit: bool | None = None,
) -> tuple["PreTrainedModel | PeftModel", "PreTrainedTokenizerBase"]:
    """A model for evaluation (eval mode, no gradients needed): the base, plus a saved LoRA adapter if given.

    None for load_in_4bit uses the same default as load_policy, so an adapter is evaluated on the base it trained on.
    """
    path = resolve_model(model)
    device = device or pick_device()
    dtype = as_dtype(dtype, device)
    tokenizer = load_tokenizer(path)
    load_in_4bit = default_load_in_4bit(device) if load_in_4bit is None else load_in_4bit
    net = _load_base(path, device, dtype, load_in_4bit=load_in_4bit)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ModelError(f"no LoRA adapter at {adapter} (adapter_config.json missing)")
        net = PeftModel.from_pretrained(net, str(adapter)).to(device)
    net.eval()
    return net, tokenizer
