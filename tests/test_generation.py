"""The one generation function: stops, truncation, greedy determinism and its cost accounting."""
from __future__ import annotations

import pytest
import torch

from buffers import Task
from generation import GenerationStats, _stop_check, generate, stop_token_ids
from prompts import render
from rewards import solve_prompt


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, tokenizer


def prompts_mix(tokenizer) -> list[str]:
    """Repeats of one prompt (as for learnability), prompts sharing the template, and short unrelated ones."""
    tasks = [Task("deduction", "def f(a):\n    return a * 2", "3", "6"),
             Task("abduction", "def f(s):\n    return s[::-1]", "'ab'", "'ba'")]
    solver = [render(tokenizer, solve_prompt(t)) for t in tasks]
    return [solver[0]] * 3 + [solver[1]] * 2 + ["def f(x):", "hello", "0123456789 ()[]{}"]


def test_greedy_is_deterministic_and_in_prompt_order(tiny):
    model, tokenizer = tiny
    prompts = prompts_mix(tokenizer)
    a = generate(model, tokenizer, prompts, 16, temperature=0.0, batch_size=3)
    b = generate(model, tokenizer, prompts[::-1], 16, temperature=0.0, batch_size=3)[::-1]
    assert [g.prompt_ids for g in a] == [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    one = generate(model, tokenizer, [prompts[0]], 16, temperature=0.0, batch_size=1)[0]
    assert a[0].response_ids == a[1].response_ids == a[2].response_ids == one.response_ids
    assert [g.text for g in a] == [g.text for g in b]


def test_stops_truncation_and_costs(tiny):
    model, tokenizer = tiny
    stops = stop_token_ids(model, tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops and tokenizer.pad_token_id in stops
    stats = GenerationStats()
    torch.manual_seed(0)
    out = generate(model, tokenizer, prompts_mix(tokenizer), 6, temperature=1.0, top_p=0.9, batch_size=3,
                   stats=stats)
    for g in out:
        assert 1 <= len(g.response_ids) <= 6
        assert g.truncated == (len(g.response_ids) == 6 and g.response_ids[-1] not in stops)
        assert all(t not in stops for t in g.response_ids[:-1])      # cut after the first stop token
    assert stats.useful_tokens == sum(len(g.response_ids) for g in out) <= stats.decode_tokens
    distinct = {tuple(g.prompt_ids) for g in out}
    assert sum(map(len, distinct)) - len(distinct) <= stats.prefill_tokens < sum(len(g.prompt_ids) for g in out)
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0


def test_a_response_ends_at_its_closing_answer_tag(tiny):
    model, tokenizer = tiny
    finished = _stop_check(tokenizer, set(stop_token_ids(model, tokenizer)))
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]   # noqa: E731
    assert finished(ids("x</think><answer>```output\n1\n```</answer>"))
    assert finished(ids("x</answer>\n"))
    assert not finished(ids("x</think><answer>```output\n1\n```")) and not finished([])
    assert finished(ids("abc") + [tokenizer.convert_tokens_to_ids("<|im_end|>")])


def test_a_shared_prefill_gives_the_same_greedy_text(tiny):
    model, tokenizer = tiny
    prompts = prompts_mix(tokenizer)
    shared = GenerationStats()
    together = generate(model, tokenizer, prompts, 12, temperature=0.0, batch_size=8, stats=shared)
    alone = [generate(model, tokenizer, [p], 12, temperature=0.0, batch_size=1)[0] for p in prompts]
    assert [g.response_ids for g in together] == [g.response_ids for g in alone]
    stops = stop_token_ids(model, tokenizer)                         # and stock generate, its own cache, one row
    for g in together:
        stock = model.generate(input_ids=torch.tensor([g.prompt_ids]), do_sample=False, max_new_tokens=12,
                               eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)[0, len(g.prompt_ids):]
        assert g.response_ids == stock.tolist()
    distinct = {tuple(g.prompt_ids) for g in together}              # 3 + 2 repeats -> 2 distinct prefills
    assert shared.prefill_tokens == sum(len(p) - 1 for p in distinct)  # each alone, unpadded, less its last token


def test_adapters_run_in_the_base_dtype_while_sampling_and_are_restored():
    from generation import adapters_in_base_dtype
    net = torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.bfloat16), torch.nn.Linear(4, 4))
    net[0].requires_grad_(False)
    lora = net[1].weight
    before = lora.detach().clone()
    with adapters_in_base_dtype(net):
        assert net[1].weight.dtype == torch.bfloat16 and net[0].weight.dtype == torch.bfloat16
    assert net[1].weight is lora and lora.dtype == torch.float32 and torch.equal(lora, before)


def test_the_stop_string_criterion_stops_exactly_the_rows_whose_text_ends_in_it(tiny):
    from generation import EndsWithStopString
    _, tokenizer = tiny
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]   # noqa: E731
    prompt = ids("question </answer>")                      # the prompt's own tag does not count
    stop = EndsWithStopString(tokenizer, len(prompt))
    ended = lambda text: stop(torch.tensor([prompt + ids(text)]), None).tolist() == [True]   # noqa: E731
    assert ended("x</think><answer>1</answer>") and ended("x</answer>")
    assert not ended("x</think><answer>1</ans") and not ended("a > b") and not ended("")


def test_finished_rows_leave_the_batch_between_chunks(tiny, monkeypatch):
    """Rows that stop leave the batch at the next chunk boundary: the same greedy tokens (float32) as decoding the
    whole batch to the end, for fewer decode positions."""
    import generation

    model, tokenizer = tiny
    prompts = prompts_mix(tokenizer)
    free = generate(model, tokenizer, prompts, 24, temperature=0.0, batch_size=8)
    # a token that some responses write early and others never: made a stop token, rows end at different steps
    firsts = [{t: g.response_ids.index(t) for t in set(g.response_ids)} for g in free]
    stop = next(t for t in sorted({t for f in firsts for t in f})
                if any(f.get(t, 99) < 6 for f in firsts) and any(t not in f for f in firsts))
    monkeypatch.setattr(model.generation_config, "eos_token_id", [stop])
    runs = {}
    for chunk in (4, 24):
        monkeypatch.setattr(generation, "DECODE_CHUNK", chunk)
        stats = GenerationStats()
        runs[chunk] = (generate(model, tokenizer, prompts, 24, temperature=0.0, batch_size=8, stats=stats), stats)
    (chunked, few), (whole, full) = runs[4], runs[24]
    assert [g.response_ids for g in chunked] == [g.response_ids for g in whole]
    assert [g.truncated for g in chunked] == [g.truncated for g in whole] and not all(g.truncated for g in whole)
    assert any(g.response_ids[-1] == stop and len(g.response_ids) <= 6 for g in whole)
    assert full.decode_tokens == len(prompts) * 24 and few.useful_tokens == full.useful_tokens
    assert few.decode_tokens < full.decode_tokens


def test_merged_adapters_sample_the_same_model_and_are_put_back(tiny_model_dir):
    """While sampling, each LoRA layer runs as one merged weight with its adapter off: the same logits (float32) as
    the adapter computed alongside; afterwards the base weights, adapters and requires_grad flags are as before."""
    import model as models
    from generation import adapters_merged

    policy, tokenizer = models.load_policy(str(tiny_model_dir), lora_r=4, lora_alpha=8, load_in_4bit=False,
                                           device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)                                  # a trained adapter: B != 0
    for p in policy.get_input_embeddings().parameters():
        p.requires_grad_(True)                                      # any flag pattern is restored,
    next(p for n, p in policy.named_parameters() if "lora_A" in n).requires_grad_(False)   # a frozen adapter too
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}
    weights = {n: p.detach().clone() for n, p in policy.named_parameters()}
    ids = torch.tensor([tokenizer("def f(a):\n    return a", add_special_tokens=False)["input_ids"]])
    policy.eval()
    with torch.no_grad():
        adapted = policy(input_ids=ids).logits
        with adapters_merged(policy):
            merged = policy(input_ids=ids).logits
        after = policy(input_ids=ids).logits
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags
    assert all(torch.equal(p, weights[n]) for n, p in policy.named_parameters())
    assert torch.equal(after, adapted)                              # the adapter is back on
    with torch.no_grad(), policy.disable_adapter():                 # (PEFT's own switch sets the flags anew)
        plain = policy(input_ids=ids).logits
    assert torch.allclose(merged, adapted, atol=1e-4) and not torch.allclose(plain, adapted, atol=1e-2)


def test_rows_leaving_the_cache_move_up_in_place_and_decoding_goes_on_without_a_new_buffer():
    """GrowingLayer.batch_select_indices keeps the rows asked for, in order, inside the tensors it already holds:
    no second cache beside the first, and the next steps write into the same room."""
    from generation import GrowingLayer
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    layer, plain = GrowingLayer(room=8), DynamicLayer()
    first = torch.randn(5, 2, 3, 4), torch.randn(5, 2, 3, 4)
    layer.update(*first)
    plain.update(*first)
    buffer = layer.spare[0].data_ptr()
    keep = torch.tensor([0, 2, 4])
    layer.batch_select_indices(keep)
    plain.batch_select_indices(keep)
    for _ in range(3):                                  # decode steps after the drop
        step = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
        keys, values = layer.update(*step)
        expected = plain.update(*step)
        assert torch.equal(keys, expected[0]) and torch.equal(values, expected[1])
    assert layer.spare[0].data_ptr() == buffer and keys.data_ptr() == buffer


def test_an_int8_linear_computes_the_float_layer_within_its_rounding():
    from generation import Int8Linear, int8_engine

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    with int8_engine():
        out = Int8Linear(layer)(x)
    exact = layer(x).detach()
    assert out.shape == exact.shape and out.dtype == x.dtype
    assert (out - exact).norm() / exact.norm() < 0.02                  # 8-bit weights and activations
    with int8_engine():
        assert Int8Linear(layer)(x.bfloat16()).dtype == torch.bfloat16


def test_int8_sampling_swaps_every_linear_but_the_mlp_output_and_puts_them_back(tiny_model_dir):
    """Inside int8_linears every nn.Linear of a merged LoRA policy (and the LM head) is an Int8Linear except the
    MLP's output projections; the logits stay close to the float model's; afterwards the modules and logits are
    exactly as before."""
    import model as models
    from generation import INT8_KEPT, Int8Linear, adapters_merged, int8_linears

    policy, tokenizer = models.load_policy(str(tiny_model_dir), lora_r=4, lora_alpha=8, load_in_4bit=False,
                                           device="cpu", dtype=torch.float32)
    before = {n: type(m) for n, m in policy.named_modules()}
    ids = torch.tensor([tokenizer("def f(a):\n    return a", add_special_tokens=False)["input_ids"]])
    policy.eval()
    with torch.no_grad(), adapters_merged(policy):
        merged = policy(input_ids=ids).logits
        with int8_linears(policy):
            kinds = {n: type(m) for n, m in policy.named_modules()}
            int8 = policy(input_ids=ids).logits
        assert torch.equal(policy(input_ids=ids).logits, merged)
    assert {n: type(m) for n, m in policy.named_modules()} == before
    swapped = {n for n, k in kinds.items() if k is Int8Linear}
    linears = {n for n, k in before.items() if k is torch.nn.Linear and "lora_" not in n}
    assert swapped == {n for n in linears if not set(n.split(".")) & set(INT8_KEPT)}
    assert "lm_head" in {n.rsplit(".", 1)[-1] for n in swapped}
    assert any(set(n.split(".")) & set(INT8_KEPT) for n in linears - swapped)
    assert (int8 - merged).norm() / merged.norm() < 0.05


def test_int8_sampling_generates_greedy_text_like_the_float_model(tiny):
    model, tokenizer = tiny
    prompts = prompts_mix(tokenizer)
    a = generate(model, tokenizer, prompts, 12, temperature=0.0, batch_size=4, int8=True)
    b = generate(model, tokenizer, prompts, 12, temperature=0.0, batch_size=4, int8=True)
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    assert all(g.response_ids for g in a)
    assert all(type(m) is not __import__("generation").Int8Linear for m in model.modules())


def test_sampling_weights_auto_is_int8_for_a_float32_cpu_model_only(tiny, monkeypatch):
    import generation
    from generation import use_int8

    model, _ = tiny
    assert use_int8("auto", model) is generation.fbgemm_int8()          # x86 torch builds: True
    assert use_int8("policy", model) is False
    with pytest.raises(ValueError, match="sampling weights must be one of"):
        use_int8("int4", model)
    model.to(torch.bfloat16)
    try:
        assert use_int8("auto", model) is False                         # measured only for fp32 bases
    finally:
        model.to(torch.float32)
    monkeypatch.setattr(generation, "fbgemm_int8", lambda: False)       # a torch without the int8 kernels
    assert use_int8("auto", model) is False
    with pytest.raises(ValueError, match="fbgemm"):
        use_int8("int8", model)
