"""generation.py — the one sampling function of the project: self-play rollouts, seeding and evaluation.

`generate` samples one response per rendered prompt (prompts.render) with its own decode loop over the model's
KV cache, built for a CPU where every computed token counts:

- Prompts are sorted by their token ids, so prompts that share a prefix (the template and task instructions;
  the N learnability samples of one task are the same prompt) land in the same batch.
- Within a batch, each group of prompts that shares a prefix has it computed once and its cache copied to the
  group's rows; then the rest of the group's prompts is computed together (the padding is hidden by the mask).
- A row that has finished (stop token or token cap) leaves the batch at once: no step is spent on padding or on
  finished sequences.

What is sampled does not change: temperature, top-p (transformers' own TopPLogitsWarper) and the stop tokens are
those of `model.generate` with top_k=0; temperature 0 means greedy. A response ends at the model's EOS, at either
Qwen end marker (`<|im_end|>` ends a chat turn, `<|endoftext|>` a document; the plain R1 template can end in
either), or once its text ends in `</answer>` (the R1 template has no end-of-turn token, and a small model
would otherwise write on into new "Assistant:" turns until the token cap). `generate_padded` is plain batched
`model.generate`, kept as the reference the benchmark compares with.
This module is the place a faster engine (vLLM on a GPU) would plug in: it only has to return Generations.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
STOP_STRINGS = ("</answer>",)    # an answer is complete there; a small model would go on writing new turns
MIN_SHARED_PREFIX = 16      # shorter common prefixes are computed per row


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]      # up to and including the stop token
    text: str                    # the response, special tokens dropped
    truncated: bool              # hit max_new_tokens without a stop token


@dataclass
class GenerationStats:
    """What generation cost: tokens computed in prefill and decode, and the tokens kept in responses."""
    prefill_tokens: int = 0      # prompt positions computed (a shared prefix counts once per batch; padding counts)
    decode_tokens: int = 0       # decode positions computed (row-steps)
    useful_tokens: int = 0       # response tokens returned
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

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


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, *, temperature: float = 1.0,
             top_p: float = 1.0, batch_size: int = 16, desc: str | None = None,
             stats: GenerationStats | None = None) -> list[Generation]:
    """One response per prompt, in prompt order. temperature 0 = greedy. `stats` accumulates the costs."""
    was_training = model.training
    model.eval()
    stops = set(stop_token_ids(model, tokenizer))
    finished = _stop_check(tokenizer, stops)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: encoded[i])       # shared prefixes side by side
    out: list[Generation | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="seq", leave=False, dynamic_ncols=True, disable=desc is None)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            responses = _decode([encoded[i] for i in idx], model, tokenizer.pad_token_id, finished, max_new_tokens,
                                temperature, top_p, stats)
            for i, response in zip(idx, responses):
                out[i] = Generation(encoded[i], response, tokenizer.decode(response, skip_special_tokens=True),
                                    truncated=not finished(response))
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return out  # type: ignore[return-value]


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


def _decode(rows: list[list[int]], model, pad_id: int, finished, max_new_tokens: int, temperature: float,
            top_p: float, stats: GenerationStats | None) -> list[list[int]]:
    """Sample a response for each prompt of one batch (see the module docstring)."""
    from transformers import TopPLogitsWarper

    device = next(model.parameters()).device
    cost = GenerationStats()
    t0 = time.perf_counter()
    cache, mask, logits = _prefill(rows, model, pad_id, device, cost)
    t1 = time.perf_counter()
    warp = TopPLogitsWarper(top_p) if top_p < 1.0 else None
    active = list(range(len(rows)))            # rows still generating, in cache order
    responses: list[list[int]] = [[] for _ in rows]
    next_position = mask.sum(-1)
    for _ in range(max_new_tokens):
        if temperature > 0:
            scores = logits / temperature
            scores = warp(None, scores) if warp is not None else scores
            tokens = torch.multinomial(torch.softmax(scores, -1), 1)[:, 0]
        else:
            tokens = logits.argmax(-1)
        keep = []
        for k, (row, token) in enumerate(zip(active, tokens.tolist())):
            responses[row].append(token)
            if not finished(responses[row]) and len(responses[row]) < max_new_tokens:
                keep.append(k)
        if not keep:
            break
        if len(keep) < len(active):            # finished rows leave the batch and its cache
            select = torch.tensor(keep, device=device)
            cache.batch_select_indices(select)
            mask, tokens, next_position = mask[select], tokens[select], next_position[select]
            active = [active[k] for k in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], 1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1].float()
        next_position = next_position + 1
        cost.decode_tokens += len(active)
    cost.decode_tokens += len(rows)            # the first token of every row came from the prefill's logits
    cost.useful_tokens = sum(len(r) for r in responses)
    cost.prefill_seconds, cost.decode_seconds = t1 - t0, time.perf_counter() - t1
    if stats is not None:
        stats.add(cost)
    return responses


def _prefill(rows: list[list[int]], model, pad_id: int, device, cost: GenerationStats):
    """The prompts' KV cache, attention mask and last-position logits, rows in the given order. Each group of
    rows that shares a prefix has it computed once (a batch of one) and copied to its rows, then the rest of its
    rows in one left-padded batch; the groups' caches are then left-padded to one width and stacked. A row is laid
    out [pad][shared prefix][pad][rest of its prompt]; the mask hides the pads."""
    from transformers import DynamicCache

    parts = []                                 # per group: (cache, mask, logits)
    for shared, members in _prefix_groups(rows):
        cache = DynamicCache()
        if shared:
            model(input_ids=torch.tensor([rows[members[0]][:shared]], device=device), past_key_values=cache,
                  use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(len(members))
            cost.prefill_tokens += shared
        rest = [rows[i][shared:] for i in members]
        span = max(len(r) for r in rest)
        ids = torch.tensor([[pad_id] * (span - len(r)) + r for r in rest], device=device)
        mask = torch.tensor([[1] * shared + [0] * (span - len(r)) + [1] * len(r) for r in rest], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()
        cost.prefill_tokens += ids.numel()
        parts.append((cache, mask, logits))
    width = max(mask.shape[1] for _, mask, _ in parts)
    cache = DynamicCache()
    for layer in range(len(parts[0][0].layers)):
        keys = torch.cat([_left_pad(c.layers[layer].keys, width) for c, _, _ in parts])
        values = torch.cat([_left_pad(c.layers[layer].values, width) for c, _, _ in parts])
        cache.update(keys, values, layer)
    mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for _, m, _ in parts])
    logits = torch.cat([lg for _, _, lg in parts])
    order = [i for _, members in _prefix_groups(rows) for i in members]     # batch rows follow the groups
    back = torch.tensor(sorted(range(len(order)), key=lambda k: order[k]), device=device)
    cache.batch_select_indices(back)
    return cache, mask[back], logits[back]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """A (rows, heads, length, dim) cache tensor, zero-padded on the left to `width` positions."""
    return torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0))


def _prefix_groups(rows: list[list[int]]) -> list[tuple[int, list[int]]]:
    """Neighbouring rows (sorted, so shared prefixes are neighbours) grouped by the prefix they share:
    (shared length, row indices). A row joins the group before it if it shares at least MIN_SHARED_PREFIX tokens
    and at least half of the group's shared prefix (identical prompts stay together, and a group does not shrink
    to a short common preamble). The shared part leaves at least one token of each row to compute."""
    groups: list[tuple[int, list[int]]] = []
    for i, row in enumerate(rows):
        if groups:
            shared, members = groups[-1]
            first = rows[members[0]]
            common = next((k for k, (a, b) in enumerate(zip(first, row)) if a != b), min(len(first), len(row)))
            common = min(common, len(row) - 1, len(first) - 1)
            if common >= MIN_SHARED_PREFIX and (len(members) == 1 or 2 * common >= shared):
                groups[-1] = (min(common, shared) if len(members) > 1 else common, members + [i])
                continue
        groups.append((0, [i]))
    return groups


@torch.no_grad()
def generate_padded(model, tokenizer, prompts: list[str], max_new_tokens: int, *, temperature: float = 1.0,
                    top_p: float = 1.0, batch_size: int = 16, stats: GenerationStats | None = None) -> list[Generation]:
    """Plain batched `model.generate` (left padding; finished rows keep computing): the benchmark's reference."""
    was_training = model.training
    model.eval()
    stops = stop_token_ids(model, tokenizer)
    finished = _stop_check(tokenizer, set(stops))
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else
                dict(do_sample=False, temperature=None, top_p=None, top_k=None))
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[Generation | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt").to(device)
        t0 = time.perf_counter()
        sequences = model.generate(**batch, **sampling, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                   pad_token_id=tokenizer.pad_token_id, stop_strings=list(STOP_STRINGS),
                                   tokenizer=tokenizer)
        width = batch["input_ids"].shape[1]
        for row, i in enumerate(idx):
            response = sequences[row, width:].tolist()
            cut = next((j + 1 for j in range(len(response)) if finished(response[:j + 1])), None)
            response = response[:cut] if cut else response
            out[i] = Generation(encoded[i], response, tokenizer.decode(response, skip_special_tokens=True),
                                truncated=cut is None)
        if stats is not None:
            stats.add(GenerationStats(prefill_tokens=batch["input_ids"].numel(),
                                      decode_tokens=len(idx) * (sequences.shape[1] - width),
                                      useful_tokens=sum(len(out[i].response_ids) for i in idx),
                                      decode_seconds=time.perf_counter() - t0))
    model.train(was_training)
    return out  # type: ignore[return-value]
