"""Shared fixtures: a tiny random Qwen2 model with a small trained tokenizer, so tests need no download."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules

from buffers import Task  # noqa: E402
from prompts import render  # noqa: E402
from rewards import propose_prompt, seed_task, solve_prompt  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5's chat template, shortened (no tools): a default system message, then <|im_start|>role\n...<|im_end|>
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS = [
    "def f(a):\n    return a\n",
    "def f(x, y):\n    return x + y\n",
    "def f(s: str) -> str:\n    return s[::-1]\n",
    "def f(nums):\n    total = 0\n    for n in nums:\n        if n % 2 == 0:\n            total += n\n"
    "    return total\n",
    "def f(d):\n    return {k: v for k, v in sorted(d.items())}\n",
    "def f(text):\n    words = text.split()\n    return ' '.join(w.capitalize() for w in words)\n",
    "assert f('Hello world') == 'Hello world'\n",
    "<think>The function returns its input unchanged.</think><answer>```output\n'Hello world'\n```</answer>",
    "<think>Let me trace the loop.</think><answer>```input\n[1, 2, 3], 4\n```</answer>",
    "```python\ndef f(lst):\n    return [i * 2 for i in lst if i > 0]\n```\n```input\n[1, -2, 3]\n```",
    "You are a helpful assistant. Given the program and the input, predict the output.",
    "Design a program and an input; the program must be deterministic. Message: sort the numbers.",
    "import math\nprint(math.sqrt(16), len('abc'), list(range(10)), True, False, None)\n",
    "0123456789 ()[]{}:;,.'\"=+-*/%<>!&|^~#@ \\n \\t",
]


def build_tiny_model(path: Path, vocab_size: int = 1024, seed: int = 0) -> Path:
    """Train a byte-level BPE tokenizer (~1 s) and save it with a random 2-layer Qwen2 model into `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random Qwen2ForCausalLM + tokenizer with a chat template (eos <|im_end|>, pad <|endoftext|>)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


# ----------------------------------------------------------------------------------------------------------
# A random tiny model writes gibberish, so no proposal would ever be valid and the buffers could not grow.
# formatted_tiny_dir first teaches the tiny model the answer format with a few seconds of supervised
# fine-tuning on a handful of well-formed responses to the real prompts; from then on everything is real.

PROGRAMS = [
    ("def f(a):\n    return a * 2", "3"),
    ("def f(a):\n    return a[::-1]", "'abc'"),
    ("def f(a, b):\n    return a + b", "1, 2"),
    ("def f(a):\n    return len(a)", "[1, 2, 3]"),
    ("def f(a):\n    return sorted(a)", "[3, 1, 2]"),
    ("def f(a):\n    return a.upper()", "'hi'"),
]


def well_formed_examples() -> list[tuple[str, str]]:
    """(prompt, response) pairs: one well-formed response per role and task type, over a few programs."""
    seeds = {t: seed_task(t) for t in ("deduction", "abduction", "induction")}
    pairs = []
    for program, inp in PROGRAMS:
        block = f"```python\n{program}\n```\n```input\n{inp}\n```"
        for t in ("deduction", "abduction"):
            prompt = propose_prompt(t, [seeds[t]])
            pairs.append((prompt, f"A small program.</think><answer>{block}</answer>"))
        inputs = "\n".join(f"```input\n{i}\n```" for i in ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10"))
        task = Task("deduction", program, inp, "")
        prompt = propose_prompt("induction", [seeds["induction"]], program=task)
        pairs.append((prompt, f"Numbers.</think><answer>{inputs}\n```message\nDoubles it.\n```</answer>"))
        pairs.append((solve_prompt(Task("deduction", program, inp, "6")),
                      "Trace it.</think><answer>```output\n6\n```</answer>"))
        pairs.append((solve_prompt(Task("abduction", program, inp, "6")),
                      "Invert it.</think><answer>```input\n3\n```</answer>"))
        pairs.append((solve_prompt(seeds["induction"]),
                      f"Pattern.</think><answer>```python\n{program}\n```</answer>"))
    return pairs


@pytest.fixture(scope="session")
def formatted_tiny_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model taught the answer format: each well-formed response becomes one added token, and a
    short supervised fine-tuning teaches which response tokens fit which prompt (seconds on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("formatted_tiny")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pairs = well_formed_examples()
    tokenizer.add_tokens(sorted({response for _, response in pairs}))
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    rows = [(tokenizer(render(tokenizer, prompt), add_special_tokens=False)["input_ids"],
             tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            for prompt, response in pairs]
    torch.manual_seed(0)
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        batch = rng.sample(rows, 8)
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, r) in enumerate(batch):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
            mask[i, :len(p) + len(r)] = 1
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
