"""Task buffers for the Absolute Zero Reasoner: validated (program, input, output) triplets per task type.

Policies (stated, tested):
- Dedup: a task is an exact duplicate of another when its key matches: normalised program
  (`ast.unparse(ast.parse(program))`, so whitespace/comments/quote style do not matter; raw stripped
  text when it does not parse) plus the normalised input (`normalize_input`, so `1,2` == `1, 2`; induction:
  the tuple of normalised inputs). Duplicates are skipped.
- Capacity and eviction: FIFO, oldest first. A new task is never dropped because the buffer is full;
  the oldest tasks (seeds first, as they are oldest) are evicted to make room. If a single `add` call
  brings more new tasks than the capacity, only its last `capacity` tasks are kept.
- Save/load: one JSONL file for all task types; first line is a header
  `{"_meta": {"task_types": [...], "capacity": N}}`, then one task per line in buffer order. It is written
  inside the checkpoint, which runlog.save_checkpoint builds beside the old one and swaps in atomically.
"""
from __future__ import annotations

import ast
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class Task:
    task_type: str
    program: str
    input: str = ""            # deduction/abduction: argument text, call is f(<input>)
    output: str = ""           # repr of f(input) as returned by the sandbox
    inputs: list[str] = field(default_factory=list)    # induction: first num_shown shown, the rest held out
    outputs: list[str] = field(default_factory=list)   # induction: their outputs (repr strings)
    message: str = ""          # induction: the proposer's message
    iteration: int = -1        # iteration that created it (-1 = seed)

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def key(self) -> tuple:
        """Dedup key: task type, normalised program, and the normalised input(s)."""
        if self.inputs:
            return (self.task_type, normalize_program(self.program), tuple(normalize_input(s) for s in self.inputs))
        return (self.task_type, normalize_program(self.program), normalize_input(self.input))


def normalize_program(program: str) -> str:
    """ast.unparse of the parsed program (drops comments, normalises layout); stripped text if it does not parse."""
    try:
        return ast.unparse(ast.parse(program))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return program.strip()


def normalize_input(text: str) -> str:
    """ast.dump of the call's arguments (so '1,2' == '1, 2'); stripped text if it does not parse."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        return ast.dump(ast.Tuple(elts=call.args + [k.value for k in call.keywords], ctx=ast.Load())) \
            + repr([k.arg for k in call.keywords])
    except Exception:
        return text.strip()


class SeedFileError(ValueError):
    """A seed file is missing or malformed; the message is one line, meant for the user."""


def read_seed_file(path: str | Path) -> list[Task]:
    """Tasks from a seed file in the official AZR JSONL formats, not yet validated: each `snippet`/`input`/`output`
    triplet becomes a deduction and an abduction task, each `snippet`/`inputs`/`outputs`/`message` row an induction
    task. Outputs are recomputed when the tasks are validated in the sandbox."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SeedFileError(f"cannot read seed file {path}: {getattr(e, 'strerror', None) or e}") from None
    tasks: list[Task] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            program = row["snippet"]
            if "inputs" in row:
                if not isinstance(row["inputs"], list) or not all(isinstance(i, str) for i in row["inputs"]):
                    raise TypeError("inputs must be a list of strings")
                tasks.append(Task("induction", program, inputs=row["inputs"], message=str(row.get("message") or "")))
            else:
                tasks += [Task(t, program, input=row["input"]) for t in ("deduction", "abduction")]
            if not isinstance(program, str) or not all(isinstance(t.input, str) for t in tasks[-2:]):
                raise TypeError("snippet and input must be strings")
        except (ValueError, KeyError, TypeError) as e:
            reason = f"missing field {e}" if isinstance(e, KeyError) else str(e).split("\n")[0]
            raise SeedFileError(f"seed file {path}, line {n}: not an AZR seed task ({reason})") from None
    if not tasks:
        raise SeedFileError(f"seed file {path} holds no tasks")
    return tasks


class TaskBuffer:
    """Validated tasks of one type, oldest first; FIFO eviction at capacity; exact-duplicate removal."""

    def __init__(self, task_type: str, capacity: int = 10_000):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.task_type = task_type
        self.capacity = capacity
        self.tasks: list[Task] = []
        self._keys: set[tuple] = set()
        self.evicted = 0       # total tasks evicted so far (for logging)

    def __len__(self) -> int:
        return len(self.tasks)

    def __contains__(self, task: Task) -> bool:
        return task.key() in self._keys

    def add(self, tasks: Iterable[Task]) -> int:
        """Append tasks not already present (also dedups within `tasks`); evict the oldest when full.
        Returns the number added."""
        new = []
        for t in tasks:
            k = t.key()
            if k in self._keys:
                continue
            self._keys.add(k)
            new.append(t)
        self.tasks.extend(new)
        overflow = len(self.tasks) - self.capacity
        if overflow > 0:
            for t in self.tasks[:overflow]:
                self._keys.discard(t.key())
            del self.tasks[:overflow]
            self.evicted += overflow
        return len(new)

    def sample_references(self, k: int, rng: random.Random) -> list[Task]:
        """k tasks uniformly without replacement (fewer if the buffer is smaller)."""
        return rng.sample(self.tasks, min(max(k, 0), len(self.tasks)))

    def solver_batch(self, new_tasks: list[Task], size: int, rng: random.Random) -> list[Task]:
        """This iteration's new tasks first (up to size), then topped up uniformly from the whole buffer
        (without replacement while possible, then with replacement). Empty only if there is nothing at all."""
        batch = list(new_tasks[:size])
        if len(batch) >= size or not self.tasks:
            return batch
        taken = {t.key() for t in batch}
        pool = [t for t in self.tasks if t.key() not in taken]
        need = size - len(batch)
        batch += rng.sample(pool, min(need, len(pool)))
        while len(batch) < size:
            batch.append(rng.choice(self.tasks))
        return batch


class Buffers:
    """One TaskBuffer per task type, dict-like."""

    def __init__(self, task_types: Iterable[str], capacity: int = 10_000,
                 seed: Callable[[str], Task] | None = None):
        """Empty buffers, or each holding seed(task_type) (the loop passes rewards.seed_task)."""
        self.capacity = capacity
        self.buffers: dict[str, TaskBuffer] = {tt: TaskBuffer(tt, capacity) for tt in task_types}
        if seed is not None:
            for tt, buf in self.buffers.items():
                buf.add([seed(tt)])

    def __getitem__(self, task_type: str) -> TaskBuffer:
        return self.buffers[task_type]

    def __iter__(self):
        return iter(self.buffers)

    def sizes(self) -> dict[str, int]:
        return {tt: len(b) for tt, b in self.buffers.items()}

    def save(self, path: Path) -> None:
        """JSONL: header line, then every task in buffer order."""
        meta = {"task_types": list(self.buffers), "capacity": self.capacity,
                "evicted": {tt: b.evicted for tt, b in self.buffers.items()}}
        rows = [{"_meta": meta}] + [asdict(t) for buf in self.buffers.values() for t in buf.tasks]
        Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Buffers:
        """Inverse of save."""
        meta, *rows = [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
        out = cls(meta["_meta"]["task_types"], capacity=meta["_meta"]["capacity"])
        for row in rows:
            out.buffers[row["task_type"]].add([Task.from_dict(row)])
        for tt, n in meta["_meta"]["evicted"].items():
            out.buffers[tt].evicted = n
        return out
