"""memory.py — how much GPU memory a run needs, computed from the model's config.json alone (no weights loaded).

A run's memory at its peak is the sum of what lives all the time (the weights, the LoRA weights with their
gradients and AdamW states) and the larger of its two phases' working sets:

  generation  the KV cache of generation_batch_size rows x (longest prompt + token cap) (generation.prefill
              frees each layer of the prompts' own caches once copied), a decode step's logits, and a merged copy
              of the adapted weights when the base is not 4-bit (generation.adapters_merged)
  update      one micro-batch, a packed row of at most micro_batch_size x (prompt + response) positions
              (azr.micro_batches): the activations kept for the backward (one hidden state per layer with
              gradient checkpointing, every layer's tensors without), the row's [positions, positions] attention
              bias, and the LM head's float32 logits, LOGITS_CHUNK_TOKENS positions at a time (azr.micro_batch_backward)

plus the CUDA context and the allocator's fragmentation. The constants below are estimates from the shapes; no
GPU has measured them yet (bench/gpu_check.py prints the measured peaks beside these).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
LOGITS_CHUNK_TOKENS = 128        # response positions whose float32 logits exist at once in the update (azr.py)
LOGITS_CHUNK_COPIES = 4          # float32 [chunk, vocab] tensors alive at once (measured on CPU: the logits, the
                                 # softmax and log-softmax backward's temporaries, the gradient)
# Tensors a decoder layer keeps per token for its backward, in the compute dtype: hidden-width ones (norm inputs
# and outputs, q/k/v, attention output, residuals; RMSNorm's float32 copies counted twice) and MLP-width ones
# (gate, up, activation, product, down input).
ACTIVATION_HIDDEN_COPIES = 16
ACTIVATION_MLP_COPIES = 5
# Prompt length: the official proposer prompt with K references, Qwen tokenizer, official seed tasks. Measured
# with 6 references: median 1,500 tokens, 95th percentile 1,850, longest 2,500; this gives 2,312 for 6.
PROMPT_TOKENS_BASE = 512
PROMPT_TOKENS_PER_REFERENCE = 300
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)   # 4-bit codes, 8-bit absmax per 64, fp32 per 256 absmax
CUDA_CONTEXT_GIB = 0.75          # the CUDA context and kernels, outside torch's allocator
ALLOCATOR_SLACK = 0.10           # share of the tensors' peak lost to fragmentation in the caching allocator
MIN_HEADROOM = 0.10              # python azr.py picks a preset only if its plan leaves this share of the card free
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
MODEL_CONFIGS = Path(__file__).resolve().parent / "data" / "model-configs"


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that memory depends on (a Hugging Face config.json's fields)."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int

    @classmethod
    def from_config(cls, config: dict) -> "Shape":
        heads = config["num_attention_heads"]
        return cls(layers=config["num_hidden_layers"], hidden=config["hidden_size"],
                   intermediate=config["intermediate_size"], heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads, vocab=config["vocab_size"],
                   tied=bool(config.get("tie_word_embeddings", False)),
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads)

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        """Weights of the decoder layers' linear layers: what 4-bit quantizes."""
        return self.layers * sum(a * b for a, b in self.projections().values())

    def other_params(self) -> int:
        """Everything else: embeddings, the LM head if untied, the q/k/v biases, the norms."""
        p = self.projections()
        per_layer = p["q_proj"][1] + p["k_proj"][1] + p["v_proj"][1] + 2 * self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * per_layer + self.hidden

    def lora_params(self, rank: int) -> int:
        return self.layers * rank * sum(a + b for name, (a, b) in self.projections().items() if name in LORA_TARGETS)

    def kv_bytes_per_position(self, dtype_bytes: int) -> int:
        """Keys and values of one sequence position over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class Plan:
    """A run's predicted GPU memory, in bytes, by part; `peak` adds the CUDA context and fragmentation."""
    weights: int
    lora: int                # LoRA weights, gradients and AdamW states, float32
    generation: int          # KV cache and generation's transient copies
    update: int              # one micro-batch's activations and logits chunk
    prompt_tokens: int
    response_tokens: int

    @property
    def generation_peak(self) -> int:
        """Tensors alive at generation's peak (what torch.cuda.max_memory_allocated measures)."""
        return self.weights + self.lora + self.generation

    @property
    def update_peak(self) -> int:
        return self.weights + self.lora + self.update

    @property
    def peak(self) -> int:
        """What the card must hold: the larger phase, fragmentation, the CUDA context."""
        return int(max(self.generation_peak, self.update_peak) * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB * GIB)

    def headroom(self, card_gib: float) -> float:
        """Share of the card left free at the peak (negative: it does not fit)."""
        return 1 - self.peak / (card_gib * GIB)

    def fits(self, card_gib: float) -> bool:
        return self.peak <= card_gib * GIB

    def table(self, card_gib: float | None = None) -> str:
        rows = [("weights", self.weights), ("LoRA + AdamW (fp32)", self.lora),
                (f"KV cache + prefill ({self.prompt_tokens}+{self.response_tokens} tokens per row)", self.generation),
                ("update, one micro-batch", self.update), ("generation peak", self.generation_peak),
                ("update peak", self.update_peak),
                (f"peak (+{ALLOCATOR_SLACK:.0%} fragmentation, +{CUDA_CONTEXT_GIB} GiB CUDA context)", self.peak)]
        lines = [f"  {name:<64} {value / GIB:7.2f} GiB" for name, value in rows]
        if card_gib is not None:
            verdict = "fits" if self.fits(card_gib) else "DOES NOT FIT"
            lines.append(f"  {'card':<64} {card_gib:7.2f} GiB  ({verdict}, headroom {self.headroom(card_gib):.0%})")
        return "\n".join(lines)


def prompt_tokens(num_references: int) -> int:
    """The longest prompt a batch is planned for."""
    return PROMPT_TOKENS_BASE + PROMPT_TOKENS_PER_REFERENCE * num_references


def plan(shape: Shape, *, load_in_4bit: bool, dtype: str, lora_r: int, generation_batch_size: int,
         micro_batch_size: int, max_new_tokens: int, num_references: int, gradient_checkpointing: bool) -> Plan:
    """The memory plan of a run of `shape` at these settings (`dtype`: bf16, fp16 or fp32 compute)."""
    size = DTYPE_BYTES[dtype]
    linear, other = shape.linear_params(), shape.other_params()
    weights = int(linear * NF4_BYTES_PER_PARAM) + other * size if load_in_4bit else (linear + other) * size
    lora = shape.lora_params(lora_r) * 16                       # fp32 weight, gradient, two AdamW moments
    prompt = prompt_tokens(num_references)
    kv = shape.kv_bytes_per_position(size)
    # the cache with its room, and at the prefill's end the last layer's per-prompt caches and padded copy beside it
    generation = generation_batch_size * ((prompt + max_new_tokens) * kv + 2 * prompt * kv // shape.layers)
    generation += generation_batch_size * shape.vocab * 4 * 3     # a decode step's float32 logits and sampling copies
    if not load_in_4bit:
        generation += linear * size                # merged copies of the adapted weights
    tokens = micro_batch_size * (prompt + max_new_tokens)
    per_token_layer = (ACTIVATION_HIDDEN_COPIES * shape.hidden + ACTIVATION_MLP_COPIES * shape.intermediate) * size
    if gradient_checkpointing:      # each layer's input kept, one layer's tensors recomputed at a time
        activations = tokens * shape.layers * shape.hidden * size + tokens * per_token_layer
    else:
        activations = tokens * shape.layers * per_token_layer
    chunk = min(LOGITS_CHUNK_TOKENS, micro_batch_size * max_new_tokens)
    logits = chunk * shape.vocab * (4 * LOGITS_CHUNK_COPIES + size)
    mask = tokens ** 2 * size         # the packed row's [positions, positions] attention bias (azr.TokenTree)
    return Plan(weights=weights, lora=lora, generation=generation, update=activations + logits + mask,
                prompt_tokens=prompt, response_tokens=max_new_tokens)


def shipped_config(model: str) -> Path | None:
    """The config.json shipped in data/model-configs/ for a hub id or name like Qwen/Qwen2.5-Coder-3B."""
    name = model.rstrip("/").rsplit("/", 1)[-1]
    for candidate in (name, name.removesuffix("-Instruct")):
        path = MODEL_CONFIGS / candidate / "config.json"
        if candidate and path.is_file():
            return path
    return None


def read_config(path: str | Path) -> dict:
    """A config.json file, or the one in a folder."""
    path = Path(path)
    return json.loads((path / "config.json" if path.is_dir() else path).read_text())


def load_shape(path: str | Path) -> Shape:
    """The Shape in a config.json file, or in a folder holding one."""
    return Shape.from_config(read_config(path))
