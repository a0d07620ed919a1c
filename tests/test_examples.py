"""Every example's entry point runs one tiny iteration on the tiny model; the custom task type is checked end to end
without a model; the shell recipes parse."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from buffers import Buffers, Task

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PY_EXAMPLES = ["ablations", "proposer_reward_variants", "custom_task_type"]
ABLATIONS = {"deduction-only": ("task_types", ["deduction"]),
             "no-induction": ("task_types", ["deduction", "abduction"]),
             "no-references": ("num_references", 0), "solver-only": ("train_proposer", False),
             "force-accept-warmup": ("lenient_answers", True)}


@pytest.fixture(autouse=True)
def restore_registry():
    """custom_task_type registers 'typeof' in rewards.TASK_TYPES: undo it so other tests see the defaults."""
    import rewards
    saved = dict(rewards.TASK_TYPES)
    yield
    rewards.TASK_TYPES.clear()
    rewards.TASK_TYPES.update(saved)


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny(model_dir: Path, run_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--output-dir", str(run_dir), "--preset", "cpu-demo", "--iterations", "1",
            "--tasks-per-iteration", "2", "--learnability-samples", "2", "--seed-buffer-size", "1",
            "--max-new-tokens-propose", "8", "--max-new-tokens-solve", "8", "--generation-batch-size", "8",
            "--micro-batch-size", "8", "--lora-r", "4", "--no-gradient-checkpointing", "--samples-per-group", "1",
            "--sandbox-timeout", "2"]


def test_every_example_is_tested_and_documented():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(PY_EXAMPLES)
    for path in list(EXAMPLES.glob("*.py")) + list(EXAMPLES.glob("*.sh")):
        head = path.read_text().splitlines()[:3]
        assert any(len(line) > 30 for line in head), f"{path.name} lacks an explanation at its top"


def check_run(run: Path) -> dict:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1] and (run / "checkpoint" / "adapter").is_dir()
    return json.loads((run / "config.json").read_text())


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_each_ablation_runs_one_tiny_iteration(name, tiny_model_dir, tmp_path):
    assert load("ablations").main([name] + tiny(tiny_model_dir, tmp_path / "run")) == 0
    key, value = ABLATIONS[name]
    assert check_run(tmp_path / "run")[key] == value


def test_ablations_documented_and_bad_name(capsys):
    ablations = load("ablations")
    assert set(ablations.ABLATIONS) == set(ABLATIONS)
    for name, flags in ablations.ABLATIONS.items():
        assert f"    {name:<22}{' '.join(flags)}\n" in ablations.__doc__
    assert ablations.main(["no-such-ablation"]) == 2 and "unknown ablation" in capsys.readouterr().err
    assert ablations.main(["--list"]) == 0 and "deduction-only" in capsys.readouterr().out


def test_proposer_reward_variants_run_each(tiny_model_dir, tmp_path):
    import azr
    variants = load("proposer_reward_variants")
    assert variants.main(tiny(tiny_model_dir, tmp_path / "run")) == 0
    configs = [check_run(tmp_path / "run" / name) for name in variants.VARIANTS]
    assert [c["proposer_extreme_reward"] for c in configs] == [0.0, -0.5, -0.5, -0.5]
    assert azr.PROPOSER_REWARD_TERMS == []                  # the terms are removed after each run


def test_reward_terms_on_tiny_tasks():
    """The example's diversity and complexity terms, and the loop adding a registered term to the learnability
    reward of a scored proposal only."""
    import azr
    from config import Config
    from rewards import ValidationResult
    variants = load("proposer_reward_variants")
    a = Task("deduction", "def f(x):\n    return x * 2", "3", "6")
    same_layout = Task("deduction", "def f(x):\n    return (x*2)  # c", "3", "6")
    far = Task("deduction", "def f(s):\n    return ''.join(sorted(set(s)))", "'hello'", "'ehlo'")
    mid = Task("deduction", "def f(x):\n    return x * 3", "3", "9")
    assert variants.diversity(a, [same_layout]) == 0.0                 # same tokens: nothing new
    assert variants.diversity(a, []) == 1.0 and variants.diversity(a, [far, same_layout]) == 0.0
    assert 0.0 < variants.diversity(a, [mid]) < variants.diversity(a, [far]) <= 1.0
    assert 0.0 <= variants.diversity(Task("deduction", "def f(:", "(", ""), [a]) <= 1.0   # unparseable: no raise
    assert 0.0 < variants.complexity(a, []) < variants.complexity(far, []) <= 1.0
    assert variants.complexity(Task("deduction", "def f(:"), []) == 0.0
    huge = Task("deduction", "def f(x):\n" + "".join(f"    x = x + {i}\n" for i in range(200)) + "    return x")
    assert variants.complexity(huge, []) == 1.0

    buffers = Buffers(["deduction"])
    buffers["deduction"].add([mid])
    proposals = [azr.Rollout("deduction", "propose", "", [], [1], "", well_formatted=ok,
                             validation=ValidationResult(a)) for ok in (True, False)]
    attempts = [azr.Rollout("deduction", "solve", "", [], [1], "", correct=ok) for ok in (True, False)]
    azr.PROPOSER_REWARD_TERMS[:] = variants.VARIANTS["diversity"][1]
    try:
        azr.learnability(proposals, attempts, buffers, Config(learnability_samples=2))
    finally:
        azr.PROPOSER_REWARD_TERMS.clear()
    assert proposals[0].reward == pytest.approx(0.5 + 0.5 * variants.diversity(a, [mid]))
    assert proposals[1].reward == -1.0                       # not well formatted: not scored, no term


def test_custom_task_type_runs_one_tiny_iteration(tiny_model_dir, tmp_path):
    assert load("custom_task_type").main(tiny(tiny_model_dir, tmp_path / "run")) == 0
    assert check_run(tmp_path / "run")["task_types"] == ["deduction", "typeof"]


def test_example_script_runs_as_a_program(tiny_model_dir, tmp_path):
    """The __main__ path: sys.path set up by the script itself, exit code from azr.main, flags passed through."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "ablations.py"), "deduction-only",
                           *tiny(tiny_model_dir, tmp_path / "run")], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "it   1" in proc.stdout
    proc = subprocess.run([sys.executable, str(EXAMPLES / "ablations.py"), "deduction-only", "--iterations", "0"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 2 and "--iterations" in proc.stderr


def test_custom_task_type_end_to_end_without_a_model():
    """The registered 'typeof' mode: parse a proposal, validate it in the sandbox, build the solver prompt, judge."""
    load("custom_task_type")
    from rewards import (check_answers, parse_answer, parse_proposal, propose_prompt, seed_task, solve_prompt,
                         validate_proposals)
    from sandbox import Sandbox

    buffers = Buffers(["deduction", "typeof"], seed=seed_task)
    assert buffers["typeof"].tasks[0].output == "str"
    assert "(none)" not in propose_prompt("typeof", buffers["typeof"].tasks)
    text = ("<think>Mixed types.</think><answer>```python\ndef f(xs):\n    return {x: len(str(x)) for x in xs}\n```\n"
            "```input\n[1, 'ab']\n```</answer>")
    proposals = [parse_proposal("typeof", text),
                 parse_proposal("typeof", "<think>x</think><answer>```python\ndef f(a):\n    return a\n```\n"
                                          "```input\n3\n```</answer>"),
                 parse_proposal("typeof", "<think>x</think><answer>```python\nclass A:\n    def __repr__(self):\n"
                                          "        return '1'\ndef f(a):\n    return A()\n```\n"
                                          "```input\n3\n```</answer>")]
    with Sandbox(workers=1) as sb:
        results = validate_proposals(sb, "typeof", proposals, iteration=1, strict=True)
        assert results[0].valid and results[0].task.output == "dict"
        assert not results[1].valid and "trivial" in results[1].reason
        lax = validate_proposals(sb, "typeof", proposals, iteration=1)      # the default admits, and says why
        assert lax[1].valid and "trivial" in lax[1].reason and not lax[2].valid
        assert not results[2].valid and "literal" in results[2].reason
        task = results[0].task
        assert "```input\n[1, 'ab']\n```" in solve_prompt(task)
        answers = [parse_answer("typeof", f"<think>t</think><answer>```output\n{a}\n```</answer>")
                   for a in ("dict", "<class 'dict'>", "list", "{1: 1, 'ab': 2}")]
        assert check_answers(sb, [task] * 4, answers) == [True, True, False, False]


@pytest.mark.parametrize("script", ["gpu_24gb.sh", "multi_gpu.sh", "learning_curve.sh"])
def test_shell_recipes_parse(script):
    assert subprocess.run(["bash", "-n", str(EXAMPLES / script)]).returncode == 0
