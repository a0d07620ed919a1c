"""generation.py — the one sampling function of the project: self-play rollouts, seeding and evaluation.

`generate` samples one response per rendered prompt (prompts.render) with batched `model.generate`: prompts are
sorted by length so similar lengths share a batch and left-padded; temperature, top-p (top-k off) as given,
temperature 0 means greedy. A response ends at the model's EOS, at either Qwen end marker (`<|im_end|>` ends a
chat turn, `<|endoftext|>` a document; the plain R1 template can end in either), or once its text ends in
`</answer>` (the R1 template has no end-of-turn token, and a small model would otherwise write on into new
"Assistant:" turns until the token cap). This is the one place a faster engine (vLLM on a GPU) would plug in:
it only has to return Generations.

What makes it fast on a CPU (bench/bench_generation.py, README "Measured"): a decode step costs about the same
for 6 rows as for 18, so the loop generates as many rows at once as it can; each distinct prompt is prefilled once
and alone, unpadded, and rows repeating it (the N learnability samples of a task) share its cache; each LoRA layer
samples as one merged weight, so the adapter costs no extra products (a 4-bit base keeps its adapters, cast to the
base dtype); the KV cache grows into reserved room instead of being copied at every step; `</answer>` is found by
a check of the last token, not by transformers' `stop_strings`, which cost about 50 ms per decode step here; and a
batch decodes DECODE_CHUNK steps at a time, dropping its finished rows (and their KV cache) in between, so the few
rows that run on to the token cap do not keep paying full-width steps.

On a CPU whose policy computes in fp32 the sampling weights can be int8 (int8_linears): an iteration's prompts
then sampled 2.3x faster, for a drift from the fp32 policy of 0.009 nats per token (bench/bench_int8.py).
"""
from __future__ import annotations

import ctypes
import functools
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer

from model import frozen_dtype

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
STOP_STRINGS = ("</answer>",)    # an answer is complete there; a small model would go on writing new turns
DECODE_CHUNK = 16                # decode steps between drops of finished rows from a batch (bench_generation)
SAMPLING_WEIGHTS = ("auto", "int8", "policy")   # --sampling-weights choices (use_int8)
INT8_KEPT = ("down_proj",)       # linear layers int8 sampling leaves as they are (see int8_linears)


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]      # up to and including the stop token
    text: str                    # the response, special tokens dropped
    truncated: bool              # hit max_new_tokens without a stop token


@dataclass
class GenerationStats:
    """What generation cost: positions computed in prefill and decode, and the tokens kept in responses."""
    prefill_tokens: int = 0      # prompt positions computed (each distinct prompt once, unpadded)
    decode_tokens: int = 0       # decode positions computed: rows x steps, finished rows included
    useful_tokens: int = 0       # response tokens returned
    prefill_seconds: float = 0.0  # computing the prompts' KV cache
    decode_seconds: float = 0.0   # sampling the responses

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    def add(self, other: GenerationStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def stop_token_ids(model, tokenizer) -> list[int]:
    """The model's EOS ids plus those of STOP_TOKENS that the tokenizer knows."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in STOP_TOKENS if t in vocab)
    return sorted(ids)


def _stop_check(tokenizer, stops: set[int]):
    """response token ids -> has it ended (a stop token, or text ending in one of STOP_STRINGS)?"""
    def finished(response: list[int]) -> bool:
        if not response:
            return False
        if response[-1] in stops:
            return True
        tail = tokenizer.decode(response[-8:], skip_special_tokens=True).rstrip()
        return tail.endswith(STOP_STRINGS)
    return finished


class EndsWithStopString(StoppingCriteria):
    """Per row: has the response's text reached one of STOP_STRINGS? Only rows whose last token holds the
    strings' last character are decoded, so a step costs almost nothing."""

    def __init__(self, tokenizer, prompt_width: int) -> None:
        self.finished = _stop_check(tokenizer, set())
        self.candidates = _tokens_ending_stop_strings(tokenizer)
        self.width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = [tokens[-1] in self.candidates and self.finished(tokens[self.width:])
                for tokens in input_ids.tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@functools.lru_cache(maxsize=4)
def _tokens_ending_stop_strings(tokenizer) -> frozenset[int]:
    """Ids of the tokens whose text holds the last character of a stop string."""
    last_chars = {text[-1] for text in STOP_STRINGS}
    return frozenset(i for token, i in tokenizer.get_vocab().items()
                     if any(c in tokenizer.convert_tokens_to_string([token]) for c in last_chars))


@contextmanager
def adapters_in_base_dtype(model):
    """While sampling, cast trainable (LoRA) weights that are float32 for the optimizer to the dtype of the frozen
    base weights, and restore them after: the adapter then runs in the base dtype instead of casting every
    layer's activations to float32 and back."""
    base = frozen_dtype(model)
    saved = [(p, p.data) for p in model.parameters() if p.requires_grad and base is not None and p.dtype != base]
    for p, data in saved:
        p.data = data.to(base)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


@contextmanager
def adapters_merged(model):
    """While sampling, run each LoRA layer as one plain layer: its weight is replaced by a merged copy, W + s·B·A
    (summed in float32, rounded once to the base dtype), and its adapter is switched off. The adapter's extra
    matrix products and casts cost about 15% of a decode step on a CPU (bench/bench_generation.py). Afterwards
    the original base weights, the adapters and their requires_grad flags are back as they were. A base that
    cannot hold a merged weight (4-bit), or an adapter that is not plain LoRA, keeps its adapters, cast to the
    base dtype (adapters_in_base_dtype)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.merged and not m.disable_adapters]
    if not layers or not all(_plain_lora(m) for m in layers):
        with adapters_in_base_dtype(model):
            yield
        return
    grads = [(p, p.requires_grad) for p in model.parameters()]
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for m in layers:
                weight = m.get_base_layer().weight
                delta = sum(m.get_delta_weight(a).float() for a in m.active_adapters)
                saved.append((weight, weight.data))
                weight.data = (weight.data.float() + delta).to(weight.dtype)
                m.enable_adapters(False)
        yield
    finally:
        for m, (weight, data) in zip(layers, saved):
            weight.data = data
            m.enable_adapters(True)
        for p, flag in grads:
            p.requires_grad_(flag)


def _plain_lora(layer) -> bool:
    """A LoRA layer whose active adapters are exactly s·B·A on a floating-point weight (no DoRA, no LoRA bias,
    not an embedding), so W + s·B·A computes what the layer does."""
    weight = getattr(layer.get_base_layer(), "weight", None)
    return (weight is not None and weight.is_floating_point() and weight.dim() == 2
            and all(a in layer.lora_A and a not in layer.lora_magnitude_vector and not layer.lora_bias.get(a, False)
                    for a in layer.active_adapters))


def int8_supported(model) -> bool:
    """Can int8_linears run this model: on a CPU, not 4-bit, with torch's fbgemm int8 kernels (x86)?"""
    return (next(model.parameters()).device.type == "cpu" and all(p.is_floating_point() for p in model.parameters())
            and fbgemm_int8())


@functools.cache
def fbgemm_int8() -> bool:
    """Does this torch run fbgemm's dynamic int8 linear? (x86 builds do; torch 2.13 marks the quantized-tensor API
    deprecated, so a later torch may not.)"""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        layer = torch.nn.utils.skip_init(torch.nn.Linear, 4, 2)    # no draw from the global RNG: a run's
        torch.nn.init.ones_(layer.weight)                              # samples must not depend on whether this
        torch.nn.init.zeros_(layer.bias)                               # check ran before
        with int8_engine():
            Int8Linear(layer)(torch.ones(1, 4))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@contextmanager
def int8_engine():
    """torch's quantized engine set to fbgemm, and its deprecation warning for quantized tensors silenced."""
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            yield
    finally:
        torch.backends.quantized.engine = engine


def use_int8(setting: str, model) -> bool:
    """Sample with int8 linear layers? 'int8': yes (ValueError where int8_linears cannot run); 'policy': no;
    'auto': where it was measured faster, a base computing in fp32 on a CPU with fbgemm."""
    if setting not in SAMPLING_WEIGHTS:
        raise ValueError(f"sampling weights must be one of {' '.join(SAMPLING_WEIGHTS)}, got {setting!r}")
    if setting == "int8" and not int8_supported(model):
        raise ValueError("int8 sampling weights need a model on a CPU, not 4-bit, and torch's fbgemm kernels (x86)")
    base_dtype = frozen_dtype(model) or next(model.parameters()).dtype       # a model with no frozen weights
    return setting == "int8" or (setting == "auto" and int8_supported(model) and base_dtype == torch.float32)


class Int8Linear(torch.nn.Module):
    """A linear layer's int8 copy for sampling (torch's dynamic quantization, fbgemm kernels): activations quantized
    per call over the full 8 bits, weights per output row to 7 bits (scale max|w| / 63). fbgemm's AVX2 kernel adds
    pairs of activation x weight products in 16 bits: with 8-bit weights a pair can overflow, and a random layer's
    output was 25% off; with 7 bits it cannot (1% off). Computes in float32, returns the input's dtype."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 63).clamp_min(1e-12).double()
        q = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(q, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self.packed,
                                                  reduce_range=False).to(x.dtype)


@contextmanager
def int8_linears(model):
    """While sampling, every nn.Linear of `model` (merged LoRA layers and the LM head included) runs as an
    Int8Linear, except INT8_KEPT: the MLP's output projection reads the few huge activations of Qwen-style models,
    which one 8-bit scale per call cannot hold (the default model's drift from its fp32 self, KL per token: 0.035
    with it in int8, 0.008 without; docs/LOG.md). The original layers are back afterwards. Needs fbgemm_int8()."""
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    with int8_engine():
        try:
            for path, parent in list(model.named_modules()):
                for name, child in list(parent.named_children()):
                    parts = f"{path}.{name}".split(".")
                    if (type(child) is torch.nn.Linear and not set(parts) & set(INT8_KEPT)
                            and not any(part.startswith("lora_") for part in parts)):   # an unmerged adapter
                        setattr(parent, name, Int8Linear(child))
                        swapped.append((parent, name, child))
            yield
        finally:
            for parent, name, child in reversed(swapped):
                setattr(parent, name, child)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, *, temperature: float = 1.0,
             top_p: float = 1.0, batch_size: int = 16, desc: str | None = None,
             stats: GenerationStats | None = None, int8: bool = False) -> list[Generation]:
    """One response per prompt, in prompt order. temperature 0 = greedy. `stats` accumulates the costs. `int8`:
    sample with int8 copies of the linear layers (int8_linears; see use_int8)."""
    was_training = model.training
    model.eval()
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else
                dict(do_sample=False, temperature=None, top_p=None, top_k=None))
    sampling.update(eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), encoded[i]))   # repeats side by side
    out: list[Generation | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="seq", leave=False, dynamic_ncols=True, disable=desc is None)
    with adapters_merged(model), (int8_linears(model) if int8 else nullcontext()):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch_stats = GenerationStats()
            for i, g in zip(idx, _generate_batch(model, tokenizer, [encoded[i] for i in idx], max_new_tokens,
                                                 sampling, batch_stats)):
                out[i] = g
            if stats is not None:
                stats.add(batch_stats)
            bar.update(len(idx))
    bar.close()
    model.train(was_training)
    release_heap()
    return out  # type: ignore[return-value]


def _generate_batch(model, tokenizer, rows: list[list[int]], max_new_tokens: int, sampling: dict,
                    stats: GenerationStats) -> list[Generation]:
    """One left-padded batch: the shared prefill, then model.generate from the last prompt token, DECODE_CHUNK
    steps at a time; between chunks the finished rows leave the batch and its KV cache, so a batch whose rows
    mostly stop early does not pay full-width steps for the few that run on. `sampling` holds the sampling
    settings and the stop token ids (computed once per call of generate)."""
    finished = _stop_check(tokenizer, set(sampling["eos_token_id"]))
    batch = left_pad(rows, tokenizer.pad_token_id, next(model.parameters()).device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    width = ids.shape[1]
    t0 = time.perf_counter()
    cache, stats.prefill_tokens = prefill(model, rows, width, room=max_new_tokens)
    t1 = time.perf_counter()
    criteria = StoppingCriteriaList([EndsWithStopString(tokenizer, width)])
    responses: list[list[int]] = [[] for _ in rows]
    stopped = [False] * len(rows)
    alive = list(range(len(rows)))                  # rows still in the batch, in batch order
    while alive and ids.shape[1] - width < max_new_tokens:
        steps = min(DECODE_CHUNK, max_new_tokens - (ids.shape[1] - width))
        before = ids.shape[1]
        ids = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **sampling,
                             max_new_tokens=steps, stopping_criteria=criteria)
        stats.decode_tokens += len(alive) * (ids.shape[1] - before)
        mask = torch.nn.functional.pad(mask, (0, ids.shape[1] - before), value=1)
        keep = []
        for j, row in enumerate(alive):
            response = ids[j, width:].tolist()
            cut = next((k + 1 for k in range(len(responses[row]), len(response)) if finished(response[:k + 1])), None)
            responses[row], stopped[row] = response[:cut], cut is not None
            if cut is None:
                keep.append(j)
        if keep and len(keep) < len(alive):         # drop the finished rows, and their KV cache
            cache.batch_select_indices(torch.tensor(keep, device=ids.device))
            ids, mask = ids[keep], mask[keep]
        alive = [alive[j] for j in keep]
    stats.prefill_seconds, stats.decode_seconds = t1 - t0, time.perf_counter() - t1
    out = [Generation(prompt_ids, response, tokenizer.decode(response, skip_special_tokens=True),
                      truncated=not stop)
           for prompt_ids, response, stop in zip(rows, responses, stopped)]
    stats.useful_tokens = sum(len(g.response_ids) for g in out)
    return out


def release_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; elsewhere nothing). The KV caches of a
    sampling pass come in many sizes, and without this their freed memory stays in the process: the peak RSS of a
    long CPU run crept up by about 0.3 GiB per iteration."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def left_pad(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask with the rows right-aligned, as decoder-only generation needs."""
    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + r for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return {"input_ids": torch.tensor(ids, device=device), "attention_mask": torch.tensor(mask, device=device)}


def prefill(model, rows: list[list[int]], width: int, room: int) -> tuple[DynamicCache, int]:
    """The KV cache of every row's prompt but its last token, left-padded to `width` - 1 positions; `generate` then
    decodes from the last prompt token. Each distinct prompt is computed once and alone: no padding positions are
    computed (a batch's prompts differ in length by up to 4x), a row repeating a prompt (the N learnability
    samples) shares its cache, and the activations of one prompt at a time keep the memory peak small (a bf16
    forward over 32 prompts at once held several GiB on a CPU). The cache has `room` positions to grow into
    (GrowingLayer). Returns the cache and the positions computed."""
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer(room) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if width <= 1:                                                          # one-token prompts: nothing to cache
        return cache, 0
    device = next(model.parameters()).device
    own = {prompt: DynamicCache(config=model.config) for prompt in dict.fromkeys(tuple(r[:-1]) for r in rows)}
    for prompt, prompt_cache in own.items():                                # each distinct prompt once, alone
        if prompt:
            model(input_ids=torch.tensor([prompt], device=device), past_key_values=prompt_cache, use_cache=True,
                  logits_to_keep=1)
    shaped = next(c for prompt, c in own.items() if prompt)
    sources = [(row, width - len(r), own[tuple(r[:-1])]) for row, r in enumerate(rows) if len(r) > 1]
    for i, layer in enumerate(cache.layers):
        like = shaped.layers[i].keys
        keys = like.new_zeros(len(rows), like.shape[1], width - 1, like.shape[3])   # zeros: the masked padding
        values = torch.zeros_like(keys)
        for row, start, source in sources:                                  # right-aligned, as left_pad puts it
            keys[row, :, start:] = source.layers[i].keys[0]
            values[row, :, start:] = source.layers[i].values[0]
        layer.update(keys, values)
        for prompt, prompt_cache in own.items():    # this layer of the prompts' caches is copied: free it now
            if prompt:
                prompt_cache.layers[i].keys = prompt_cache.layers[i].values = None
    return cache, sum(map(len, own))


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes each step's keys and values into spare room at the end of its tensors, instead of
    concatenating (copying) the whole cache at every decode step; the cache it hands to attention is a view. When
    rows leave the batch, the rows kept move up within the same tensors: no second cache is allocated beside the
    first (on a GPU the KV cache is generation's largest tensor)."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room                             # positions to reserve whenever the tensors are reallocated
        self.spare: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, new = self.get_seq_length(), key_states.shape[-2]
        if (self.spare is None or self.spare[0].shape[-2] < n + new or self.spare[0].shape[0] != key_states.shape[0]
                or self.keys.numel() and self.keys.data_ptr() != self.spare[0].data_ptr()):   # e.g. rows dropped
            shape = (*key_states.shape[:2], n + new + self.room, key_states.shape[-1])
            self.spare = (key_states.new_empty(shape), value_states.new_empty(shape))
            if n:
                self.spare[0][:, :, :n], self.spare[1][:, :, :n] = self.keys, self.values
        self.spare[0][:, :, n:n + new], self.spare[1][:, :, n:n + new] = key_states, value_states
        self.keys, self.values = self.spare[0][:, :, :n + new], self.spare[1][:, :, :n + new]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices` (ascending), moved to the front of the same tensors, one layer at a time."""
        n = self.get_seq_length()
        if n == 0 or self.spare is None:
            return super().batch_select_indices(indices)
        kept = len(indices)
        for tensor in self.spare:
            tensor[:kept, :, :n] = tensor[indices, :, :n]       # the right side is a copy of this layer's kept rows
        self.spare = (self.spare[0][:kept], self.spare[1][:kept])
        self.keys, self.values = self.spare[0][:, :, :n], self.spare[1][:, :, :n]
