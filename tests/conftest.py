"""Shared fixtures: a tiny random Qwen2 model with a small trained tokenizer, so tests need no download."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules

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
    "def f(nums):\n    total = 0\n    for n in nums:\n        if n % 2 == 0:\n            total += n\n    return total\n",
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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the real default model (minutes on CPU); deselect with -m 'not slow'")
