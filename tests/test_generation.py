"""The one generation function: same greedy text as plain `model.generate`, no computed token wasted."""
from __future__ import annotations

import pytest
import torch

from buffers import Task
from generation import GenerationStats, generate, generate_padded, stop_token_ids
from prompts import render, solve_prompt


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, tokenizer


def prompts_mix(tokenizer) -> list[str]:
    """Learnability-like repeats of one prompt, prompts sharing the template, and short unrelated ones."""
    tasks = [Task("deduction", "def f(a):\n    return a * 2", "3", "6"),
             Task("abduction", "def f(s):\n    return s[::-1]", "'ab'", "'ba'")]
    solver = [render(tokenizer, solve_prompt(t)) for t in tasks]
    return [solver[0]] * 4 + [solver[1]] * 3 + ["def f(x):", "hello", "0123456789 ()[]{}"]


def test_greedy_matches_model_generate(tiny):
    model, tokenizer = tiny
    prompts = prompts_mix(tokenizer)
    ours = generate(model, tokenizer, prompts, 24, temperature=0.0, batch_size=4)
    reference = generate_padded(model, tokenizer, prompts, 24, temperature=0.0, batch_size=1)   # no padding at all
    assert [g.response_ids for g in ours] == [g.response_ids for g in reference]
    assert [g.text for g in ours] == [g.text for g in reference]
    assert [g.truncated for g in ours] == [g.truncated for g in reference]


def test_no_decode_step_is_wasted_and_shared_prefixes_count_once(tiny):
    model, tokenizer = tiny
    prompts = prompts_mix(tokenizer)
    ours, padded = GenerationStats(), GenerationStats()
    torch.manual_seed(0)
    out = generate(model, tokenizer, prompts, 24, temperature=1.0, batch_size=16, stats=ours)
    generate_padded(model, tokenizer, prompts, 24, temperature=1.0, batch_size=16, stats=padded)
    assert ours.useful_tokens == sum(len(g.response_ids) for g in out) == ours.decode_tokens
    assert ours.prefill_tokens < sum(len(g.prompt_ids) for g in out) < padded.prefill_tokens
    assert padded.decode_tokens >= padded.useful_tokens


def test_stops_and_truncation(tiny):
    model, tokenizer = tiny
    stops = stop_token_ids(model, tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops and tokenizer.pad_token_id in stops
    torch.manual_seed(0)
    for g in generate(model, tokenizer, prompts_mix(tokenizer), 6, temperature=1.0, top_p=0.9, batch_size=3):
        assert 1 <= len(g.response_ids) <= 6
        assert g.truncated == (len(g.response_ids) == 6 and g.response_ids[-1] not in stops)
        assert all(t not in stops for t in g.response_ids[:-1])      # cut after the first stop token


def test_a_response_ends_at_its_closing_answer_tag(tiny):
    from generation import _stop_check
    model, tokenizer = tiny
    finished = _stop_check(tokenizer, set(stop_token_ids(model, tokenizer)))
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]   # noqa: E731
    assert finished(ids("x</think><answer>```output\n1\n```</answer>"))
    assert finished(ids("x</answer>\n"))
    assert not finished(ids("x</think><answer>```output\n1\n```")) and not finished([])
    assert finished(ids("abc") + [tokenizer.convert_tokens_to_ids("<|im_end|>")])
