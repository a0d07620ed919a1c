"""Buffers: seeds, dedup, FIFO eviction, sampling, solver batches, JSONL round trip."""
import json
import random
from dataclasses import asdict
from pathlib import Path

import pytest

from buffers import Buffers, Task, TaskBuffer, normalize_program
from rewards import BUILTIN_TASK_TYPES, IDENTITY_PROGRAM, seed_task

CRUX = Path(__file__).resolve().parents[1] / "data/cruxeval/cruxeval.jsonl"


def mk(i: int, task_type: str = "deduction") -> Task:
    return Task(task_type, f"def f(x):\n    return x + {i}", input=str(i), output=str(2 * i), iteration=i)


def test_seeds_are_identity_on_hello_world():
    b = Buffers(BUILTIN_TASK_TYPES, seed=seed_task)
    assert b.sizes() == {tt: 1 for tt in BUILTIN_TASK_TYPES}
    for tt in ("deduction", "abduction"):
        t = b[tt].tasks[0]
        assert (t.program, t.input, t.output, t.iteration) == (IDENTITY_PROGRAM, "'Hello world'", "'Hello world'", -1)
    ind = seed_task("induction")
    assert ind.program == IDENTITY_PROGRAM and ind.inputs == ind.outputs and len(ind.inputs) >= 6 and ind.message
    assert len(set(ind.inputs)) == len(ind.inputs)
    assert Buffers(BUILTIN_TASK_TYPES).sizes() == {tt: 0 for tt in BUILTIN_TASK_TYPES}


def test_dedup_normalised_program_and_input():
    buf = TaskBuffer("deduction")
    a = Task("deduction", "def f(x):\n    return x+1", "1", "2")
    same = Task("deduction", "def f(x):  # comment\n\n    return (x + 1)\n", " 1 ", "2")
    other_input = Task("deduction", "def f(x):\n    return x+1", "2", "3")
    assert buf.add([a, same]) == 1            # within-batch duplicate
    assert buf.add([same]) == 0               # duplicate of the buffer
    assert buf.add([other_input]) == 1
    assert len(buf) == 2 and a in buf and same in buf
    assert normalize_program("def f(:") == "def f(:"   # unparseable: raw text, no raise
    pair = Task("deduction", "def f(x, y):\n    return x", "1,[2,3]", "1")
    assert buf.add([pair, Task("deduction", pair.program, " 1 , [2, 3] ", "1")]) == 1   # input layout ignored
    assert buf.add([Task("deduction", pair.program, "1, [3, 2]", "1")]) == 1          # a different input


def test_induction_key_uses_all_inputs():
    buf = TaskBuffer("induction")
    t1 = Task("induction", IDENTITY_PROGRAM, inputs=["1", "2"], outputs=["1", "2"])
    t2 = Task("induction", IDENTITY_PROGRAM, inputs=["1", "3"], outputs=["1", "3"])
    assert buf.add([t1, t2, t1]) == 2


def test_fifo_eviction_never_drops_new_tasks():
    buf = TaskBuffer("deduction", capacity=3)
    assert buf.add([mk(0), mk(1), mk(2)]) == 3
    assert buf.add([mk(3)]) == 1
    assert [t.iteration for t in buf.tasks] == [1, 2, 3] and buf.evicted == 1
    assert mk(0) not in buf
    assert buf.add([mk(0)]) == 1               # an evicted task may come back
    assert [t.iteration for t in buf.tasks] == [2, 3, 0]
    assert buf.add([mk(i) for i in range(10, 15)]) == 5   # batch larger than capacity: its last 3 kept
    assert [t.iteration for t in buf.tasks] == [12, 13, 14]
    with pytest.raises(ValueError):
        TaskBuffer("deduction", capacity=0)


def test_sample_references_uniform_without_replacement():
    buf = TaskBuffer("deduction")
    buf.add([mk(i) for i in range(10)])
    rng = random.Random(0)
    refs = buf.sample_references(6, rng)
    assert len(refs) == 6 and len({t.iteration for t in refs}) == 6
    assert len(buf.sample_references(50, rng)) == 10
    assert buf.sample_references(0, rng) == [] and TaskBuffer("x").sample_references(3, rng) == []
    counts = [0] * 10
    for _ in range(3000):
        for t in buf.sample_references(2, rng):
            counts[t.iteration] += 1
    assert min(counts) > 450 and max(counts) < 750   # expected 600 each


def test_solver_batch_new_first_then_top_up():
    buf = TaskBuffer("deduction")
    old = [mk(i) for i in range(5)]
    new = [mk(i) for i in range(100, 103)]
    buf.add(old + new)
    rng = random.Random(1)
    batch = buf.solver_batch(new, 6, rng)
    assert batch[:3] == new and len(batch) == 6
    assert len({t.key() for t in batch}) == 6          # top-up without replacement, no repeat of new ones
    assert buf.solver_batch(new, 2, rng) == new[:2]
    small = TaskBuffer("deduction")
    small.add([mk(0)])
    assert len(small.solver_batch([], 4, rng)) == 4    # with replacement once exhausted
    assert TaskBuffer("deduction").solver_batch([], 4, rng) == []


def test_round_trip_lossless(tmp_path):
    b = Buffers(BUILTIN_TASK_TYPES, capacity=50, seed=seed_task)
    b["deduction"].add([mk(i) for i in range(5)])
    weird = Task("induction", "def f(s):\n    return s[::-1]  # ünïcode ✓\n", inputs=["'a\\nb'", "'é'", '"\\"q\\""'],
                 outputs=["'b\\na'", "'é'", "'\"q\"'"], message="reverse\ttabs\nnewline", iteration=7)
    b["induction"].add([weird])
    b["abduction"].evicted = 3
    path = tmp_path / "buffers.jsonl"
    b.save(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert "_meta" in json.loads(lines[0]) and len(lines) == 1 + sum(b.sizes().values())
    c = Buffers.load(path)
    assert c.sizes() == b.sizes() and c.capacity == 50 and c["abduction"].evicted == 3
    for tt in BUILTIN_TASK_TYPES:
        assert c[tt].tasks == b[tt].tasks
    b.save(path)                                 # overwrite in place works
    assert Buffers.load(path)["induction"].tasks[-1] == weird


def test_task_dict_round_trip_ignores_unknown_keys():
    t = mk(3)
    d = asdict(t)
    assert Task.from_dict(d) == t
    assert Task.from_dict({**d, "future_field": 1}) == t


def test_custom_task_type_buffer():
    b = Buffers(("deduction", "mytype"), seed=lambda tt: mk(0, tt))
    assert b.sizes() == {"deduction": 1, "mytype": 1} and b["mytype"].tasks[0].task_type == "mytype"


def test_cruxeval_triplets_dedup_and_round_trip(tmp_path):
    rows = [json.loads(line) for line in CRUX.read_text().splitlines()[:200]]
    tasks = [Task("deduction", r["code"], r["input"], r["output"]) for r in rows]
    b = Buffers(BUILTIN_TASK_TYPES, capacity=150)
    assert b["deduction"].add(tasks + tasks[:20]) == len({t.key() for t in tasks})
    assert len(b["deduction"]) == 150 and b["deduction"].tasks[-1] == tasks[-1]
    b.save(tmp_path / "x.jsonl")
    assert Buffers.load(tmp_path / "x.jsonl")["deduction"].tasks == b["deduction"].tasks


SEEDS_DIR = Path(__file__).resolve().parents[1] / "data/azr-seeds"


def test_read_seed_file_official_formats(tmp_path):
    from buffers import SeedFileError, read_seed_file
    triplets = read_seed_file(SEEDS_DIR / "3b_coder_seed_io.jsonl")
    assert len(triplets) == 2 * 256 and {t.task_type for t in triplets} == {"deduction", "abduction"}
    assert triplets[0].program == triplets[1].program and triplets[0].input == triplets[1].input
    induction = read_seed_file(SEEDS_DIR / "3b_coder_code_f_seed_io.jsonl")
    assert len(induction) == 256 and all(t.task_type == "induction" and t.inputs for t in induction)
    for text, message in [("", "holds no tasks"), ('{"snippet": "def f(a): return a"}\n', "missing field 'input'"),
                          ("not json\n", "line 1: not an AZR seed task"),
                          ('{"snippet": "x", "inputs": "1"}\n', "inputs must be a list of strings")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(SeedFileError, match=message):
            read_seed_file(bad)
    with pytest.raises(SeedFileError, match="cannot read seed file"):
        read_seed_file(tmp_path / "missing.jsonl")
