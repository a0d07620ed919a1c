"""Prompt rendering and parsing: good, messy and hostile model output; parsers never raise."""
import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buffers import Task
from prompts import (BANNED_WORDS, R1_INSTRUCTION, RESPONSE_PREFIX, Answer, Proposal, clean_program, rename_entry,
                     render, split_input_lines, tags_ok)
from rewards import (BUILTIN_TASK_TYPES, DEDUCTION, TASK_TYPES, parse_answer, parse_proposal, propose_prompt,
                     register_task_type, seed_task, solve_prompt)

CRUX = Path(__file__).resolve().parents[1] / "data/cruxeval/cruxeval.jsonl"
BANNED = ("os", "sys", "subprocess")


def wrap(body: str, think: str = "reasoning") -> str:
    return f"<think>{think}</think>\n<answer>\n{body}\n</answer>"


# ----------------------------------------------------------------------------- rendering

def test_propose_io_prompts_show_references_and_banned_words():
    refs = [seed_task("deduction"), Task("deduction", "def f(x):\n    return x * 3", "2", "6")]
    for tt in ("deduction", "abduction"):
        p = propose_prompt(tt, refs, BANNED)
        assert ("<snippet_1>\n```python\ndef f(x):\n    return x * 3\n```\n```input\n2\n```\n```output\n6\n```\n"
                "</snippet_1>") in p
        assert "even in comments: os, sys, subprocess" in p and "```input" in p and "### Reference Code Snippets" in p
        assert "<think>" not in p         # the template asks for the tags
    assert "deduce the output from the input" in propose_prompt("deduction", refs)
    assert "one possible input from a given output" in propose_prompt("abduction", refs)
    assert ", ".join(BANNED_WORDS) in propose_prompt("deduction", refs)      # the short list by default
    assert "(none)" in propose_prompt("deduction", [], ())


def test_propose_induction_prompt_uses_program():
    prog = Task("deduction", "def f(s):\n    return s[::-1]", "'ab'", "'ba'")
    p = propose_prompt("induction", [seed_task("deduction")], BANNED, program=prog, num_inputs=10)
    assert "return s[::-1]" in p and "design 10 inputs" in p and "```message" in p and "```input" in p
    assert "return a" not in p
    assert "return a" in propose_prompt("induction", [seed_task("deduction")], BANNED)   # falls back to a reference
    with pytest.raises(ValueError):
        propose_prompt("induction", [], BANNED)


def test_proposer_prompt_styles():
    refs = [seed_task("deduction"), Task("deduction", "def f(x):\n    return x * 3", "2", "6")]
    official = propose_prompt("deduction", refs)
    for tt in ("deduction", "abduction"):
        compact = propose_prompt(tt, refs, style="compact")
        assert "return x * 3" in compact and "filled in with snippet_0" in compact
        assert "<answer>\n```python\ndef f(a):\n    return a\n```\n```input\n'Hello world'\n```\n</answer>" in compact
        assert "<answer>\n```python\ndef f(...):" in propose_prompt(tt, [], style="compact")   # no reference to show
        assert len(compact) < len(official) / 2              # the point of it: a short prompt for small models
    assert "predict the output" in propose_prompt("deduction", refs, style="compact")
    assert "find an input" in propose_prompt("abduction", refs, style="compact")
    prog = Task("deduction", "def f(s, n):\n    return s * n", "'ab', 2", "'abab'")
    ind = propose_prompt("induction", refs, program=prog, num_inputs=4, style="compact")
    assert "return s * n" in ind and "```input\n'ab', 2\n```" in ind          # an example call of the right shape
    assert "your input 4\n```" in ind and "your input 5" not in ind and "```message" in ind
    with pytest.raises(ValueError, match="unknown proposer prompt"):
        propose_prompt("deduction", refs, style="long")


def test_induction_input_block_may_hold_one_input_per_line():
    assert split_input_lines("'a'\n\n'b'") == ["'a'", "'b'"]
    assert split_input_lines("1, 2\n3, 4") == ["1, 2", "3, 4"]
    assert split_input_lines("[1,\n 2]") == ["[1,\n 2]"]                        # one input over two lines
    assert split_input_lines("{'a': 1,\n 'b': 2}") == ["{'a': 1,\n 'b': 2}"]
    assert split_input_lines("'x',\n'y'") == ["'x',\n'y'"]                      # two arguments of one call
    assert split_input_lines("  7  ") == ["7"] and split_input_lines("\n") == []
    text = "<think>t</think><answer>```input\n1\n2\n```\n```input\n[3,\n 4]\n```\n```message\nm\n```</answer>"
    p = parse_proposal("induction", text, program="def f(a):\n    return a")
    assert p.inputs == ["1", "2", "[3,\n 4]"] and p.well_formatted and p.message == "m"


def test_solve_prompts():
    d = Task("deduction", "def f(x):\n    return x + 1", "41", "42")
    p = solve_prompt(d)
    assert "```input\n41\n```" in p and "```output" in p and "42" not in p
    a = Task("abduction", "def f(x):\n    return x + 1", "41", "42")
    p = solve_prompt(a)
    assert "```output\n42\n```" in p and "41" not in p and "```input" in p
    ind = Task("induction", "def f(x):\n    return x * 7", inputs=[str(i) for i in range(10)],
               outputs=[str(7 * i) for i in range(10)], message="multiplies")
    p = solve_prompt(ind, num_shown=5)
    assert "Input: f(4)\nOutput: 28" in p and "f(5)" not in p and "63" not in p
    assert "multiplies" in p and "return x * 7" not in p and "```python" in p


def test_prompts_on_cruxeval_triplets():
    rows = [json.loads(line) for line in CRUX.read_text().splitlines()[:6]]
    refs = [Task("deduction", r["code"], r["input"], r["output"]) for r in rows]
    p = propose_prompt("deduction", refs, BANNED)
    assert all(r["code"] in p for r in rows) and p.count("</snippet_") == 6
    s = solve_prompt(refs[0])
    assert rows[0]["input"] in s and rows[0]["output"] not in s


def _tokenizer(with_template: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>")
    if with_template:
        t.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return t


def test_render_templates():
    prompt = "## Task: hello\n```python\ndef f(a):\n    return a\n```"
    r1 = render(_tokenizer(True), prompt, "r1")
    assert r1 == f"{R1_INSTRUCTION} User: {prompt}\nAssistant: <think>\n" and r1.endswith(RESPONSE_PREFIX)
    chat = render(_tokenizer(True), prompt, "chat")
    assert chat == (f"<|im_start|>system\n{R1_INSTRUCTION}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
                    f"<|im_start|>assistant\n<think>\n")
    assert render(_tokenizer(False), prompt, "chat") == r1 == render(None, prompt)   # no chat template: r1
    with pytest.raises(ValueError):
        render(None, prompt, "alpaca")


def test_rename_entry_follows_azr():
    assert rename_entry("def g(x):\n    return g(x - 1) if x else 0") == "def f(x):\n    return f(x - 1) if x else 0"
    assert rename_entry("import math\ndef solve(a):\n    return obj.solve(a)") == \
        "import math\ndef f(a):\n    return obj.solve(a)"           # attributes keep their name
    for unchanged in ("def g(x):\n    return 1\ndef h(y):\n    return 2",    # two functions: which one?
                      "def f(x):\n    return x", "f = 1\ndef g(x):\n    return f", "def g(:"):
        assert rename_entry(unchanged) == unchanged
    p = parse_proposal("deduction", wrap("```python\ndef solve(n):\n    return n + 1\n```\n```input\n1\n```"))
    assert p.program == "def f(n):\n    return n + 1" and p.well_formatted


def test_bare_answers_inside_answer_tags():
    # the response continues the prefilled <think>: no opening tag of its own, AZR's bare <answer>literal</answer>
    a = parse_answer("deduction", RESPONSE_PREFIX + "trace...\n</think>\n<answer>[1, 2]</answer>")
    assert a.text == "[1, 2]" and a.well_formatted and a.error is None
    a = parse_answer("abduction", RESPONSE_PREFIX + "x</think><answer> 'ab', 3 </answer>")
    assert a.text == "'ab', 3" and a.well_formatted
    assert parse_answer("deduction", "<think>x</think><answer>   </answer>").error          # empty is not an answer
    a = parse_answer("deduction", "<think>x</think><answer>4</answer><answer>5</answer>")   # the last answer counts
    assert a.text == "5" and a.well_formatted
    assert parse_answer("induction", "x</think><answer>def f(a): return a</answer>").error   # programs need a block
    a = parse_answer("deduction", "<think>x</think><answer>\n```output\n7\n```\n</answer>")   # the fenced form first
    assert a.text == "7" and a.well_formatted


# ----------------------------------------------------------------------------- proposal parsing

GOOD_IO = wrap("```python\ndef f(x, y):\n    return x * y\n```\n```input\n3, 'ab'\n```")


def test_parse_io_proposal_good():
    for tt in ("deduction", "abduction"):
        p = parse_proposal(tt, GOOD_IO)
        assert p == Proposal(program="def f(x, y):\n    return x * y", input="3, 'ab'", well_formatted=True)


def test_input_block_is_never_the_program():
    text = wrap("```input\ndef f(x):\n    return x\n```\n```output\n1\n```")
    p = parse_proposal("deduction", text)
    assert p.program == "" and p.error and "python" in p.error
    p = parse_proposal("deduction", wrap("```\ndef f(x):\n    return x\n```\n```input\n1\n```"))
    assert p.error and p.program == ""                 # untagged fence is not a program either
    p = parse_proposal("deduction", wrap("```input\n5\n```\n```python\ndef f(x):\n    return x\n```"))
    assert p.program.startswith("def f") and p.input == "5" and not p.error


def test_last_block_inside_answer_wins_and_fallback_to_whole_text():
    text = ("<think>draft:\n```python\ndef f(x):\n    return 0\n```\n```input\n0\n```</think>"
            "<answer>```python\ndef f(x):\n    return 1\n```\n```python\ndef f(x):\n    return 2\n```\n```input\n7\n```"
            "</answer>")
    p = parse_proposal("deduction", text)
    assert p.program.endswith("return 2") and p.input == "7" and p.well_formatted
    bare = "```python\ndef f(x):\n    return 3\n```\n```input\n4\n```"
    p = parse_proposal("abduction", bare)
    assert p.program.endswith("return 3") and p.input == "4" and not p.error and not p.well_formatted
    # several <answer> regions: the last one is used; AZR's check only reads the start, so it is well formatted
    two = wrap("```python\ndef f(x):\n    return 5\n```\n```input\n5\n```") + "<answer>```python\ndef f(x):\n" \
        "    return 6\n```\n```input\n6\n```</answer>"
    p = parse_proposal("deduction", two)
    assert p.program.endswith("return 6") and p.well_formatted


def test_missing_parts_give_reasons():
    assert parse_proposal("deduction", "").error
    assert parse_proposal("deduction", wrap("```python\ndef f(x):\n    return x\n```")).error == "no ```input block"
    p = parse_proposal("deduction", wrap("```python\ndef f(x):\n    return x\n```\n```input\n\n```"))
    assert p.error == "no ```input block"
    assert parse_proposal("unknown", GOOD_IO).error
    assert parse_proposal("deduction", None).error        # type: ignore[arg-type]


def test_clean_program_drops_top_level_calls():
    src = ("import math\n\ndef f(x):\n    '''doc'''\n    print(x)\n    return math.floor(x)\n"
           "print(f(2.5))\nassert f(1) == 1\nif __name__ == '__main__':\n    f(3)\n")
    out = clean_program(src)
    assert "print(f(2.5))" not in out and "assert" not in out and "__main__" not in out
    assert "import math" in out and "print(x)" in out and "doc" in out and "return math.floor(x)" in out
    keep = "def f(x):\n    return x  # kept comment"
    assert clean_program(keep) == keep
    assert clean_program("def f(:\n") == "def f(:"
    test_code = ("K = 3\ndef f(a):\n    return a * K\nx = 'John', {'age': 20}\nresult = f(x)\n"
                 "def helper(y):\n    return y\nclass C:\n    pass\n")
    assert clean_program(test_code) == ("K = 3\n\ndef f(a):\n    return a * K\n\ndef helper(y):\n    return y\n\n"
                                        "class C:\n    pass")


def test_parse_induction_proposal():
    blocks = "\n".join(f"```input\n{i}, 'a'\n```" for i in range(10))
    text = wrap(blocks + "\n```message\nRepeats a string.\n```")
    p = parse_proposal("induction", text, program="def f(n, s):\n    return s * n")
    assert p.inputs == [f"{i}, 'a'" for i in range(10)] and p.message == "Repeats a string."
    assert p.program == "def f(n, s):\n    return s * n" and p.well_formatted and p.error is None
    p = parse_proposal("induction", "```input\n1\n```\n```input\n\n```\n```input\n2\n```")
    assert p.inputs == ["1", "2"] and p.message == "" and not p.well_formatted and p.error is None
    assert parse_proposal("induction", wrap("```message\nhi\n```")).error == "no ```input blocks"


# ----------------------------------------------------------------------------- answer parsing

def test_parse_answer_good():
    assert parse_answer("deduction", wrap("```output\n[1, 2]\n```")) == Answer("[1, 2]", True)
    assert parse_answer("abduction", wrap("```input\n'a', 3\n```")) == Answer("'a', 3", True)
    a = parse_answer("induction", wrap("```python\ndef f(x):\n    return x\nprint(f(1))\n```"))
    assert a == Answer("def f(x):\n    return x", True)
    # generation started after the template's "<think>": the parsers see it in front of the response
    prefixed = RESPONSE_PREFIX + "reason</think><answer>```output\n1\n```</answer>"
    assert parse_answer("deduction", prefixed).well_formatted
    assert not parse_answer("deduction", "reason</think><answer>```output\n1\n```</answer>").well_formatted


def test_parse_answer_strict_format():
    a = parse_answer("deduction", "```output\n5\n```")
    assert a.text == "5" and not a.well_formatted and a.error is None       # extracted, but a format error
    a = parse_answer("deduction", "<think>x</think><answer>5</answer>")       # bare inside the tags (AZR's form)
    assert a.error is None and a.well_formatted and a.text == "5"
    a = parse_answer("deduction", wrap("```input\n5\n```"))                  # wrong block kind
    assert a.error and a.text == ""
    a = parse_answer("deduction", wrap("```output\n5\n```") + " trailing")    # AZR's check reads the start
    assert a.text == "5" and a.well_formatted
    a = parse_answer("deduction", "<think>a</think>x<answer>```output\n5\n```</answer>")
    assert a.text == "5" and not a.well_formatted
    assert not parse_answer("abduction", "<answer>```input\n1\n```</answer>").well_formatted   # no </think>


def test_parse_answer_lenient():
    assert parse_answer("deduction", "42", lenient=True) == Answer("42", True)
    assert parse_answer("deduction", "<answer> 'x' </answer>", lenient=True) == Answer("'x'", True)
    assert parse_answer("deduction", "<think>hmm</think> [1, 2]", lenient=True).text == "[1, 2]"
    assert parse_answer("abduction", "```\n3, 4\n```", lenient=True).text == "3, 4"
    unclosed = "<answer>```python\ndef f(x):\n    return x"
    assert parse_answer("induction", unclosed, lenient=True).text.startswith("def f")
    assert parse_answer("deduction", "```output\n7\n```", lenient=True) == Answer("7", True)
    empty = parse_answer("deduction", "", lenient=True)
    assert empty.well_formatted and empty.text == "" and empty.error
    assert parse_answer("nope", "x").error


def test_tags_ok():
    """AZR's check: the response, with its "<think>" prefix, starts <think>...</think> <answer>...</answer>."""
    assert tags_ok("<think>a</think><answer>b</answer>")
    assert tags_ok("  <think>\na </think>\n<answer>b</answer>\n")
    assert tags_ok("<think>a</think><answer>b</answer> and then more")
    assert not tags_ok("a </think>\n<answer>b</answer>")          # no <think> at the start
    assert not tags_ok("<answer>b</answer>")
    assert not tags_ok("<think>a</think>x<answer>b</answer>")       # text between think and answer
    assert not tags_ok("<think>a</think><answer>b")
    assert not tags_ok("x<think>a</think><answer>b</answer>")


HOSTILE = [
    "", "```", "``````", "```python", "```python\n", "<answer>", "</answer><answer>", "<think><think></think>",
    "<answer>```python\ndef f(:\n```</answer>", "```input\n" * 50, "\x00\ud7ff\uffff" * 10, "<answer>" * 100,
    "```python\n```input\n```output\n```", "<answer>```output\n```</answer>", "\r\n```output\r\n1\r\n```\r\n",
    "<think>" + "x" * 10000, "```py\n" + "(" * 500 + "\n```\n```input\n1\n```",
    "```python\n" + "def f(x):\n" + "    if x:\n" * 120 + "        return 1\n```\n```input\n1\n```",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_never_raises(text):
    for tt in BUILTIN_TASK_TYPES:
        assert isinstance(parse_proposal(tt, text), Proposal)
        assert isinstance(parse_proposal(tt, text, program="def f(a):\n    return a"), Proposal)
        for lenient in (False, True):
            assert isinstance(parse_answer(tt, text, lenient), Answer)


_pieces = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "```", "```python\n", "```input\n",
                           "```output\n", "```message\n", "```py\n", "\n", "def f(x):\n    return x\n", "1, 2",
                           "'é'", "(", "    ", "print(f(1))\n", "if __name__ == '__main__':\n"])
_text = st.one_of(st.text(max_size=300), st.lists(st.one_of(_pieces, st.text(max_size=8)), max_size=30).map("".join))


@settings(max_examples=300, deadline=None)
@given(_text, st.sampled_from(BUILTIN_TASK_TYPES), st.booleans())
def test_property_parsers_never_raise(text, tt, lenient):
    p = parse_proposal(tt, text)
    assert isinstance(p, Proposal) and (p.error is None or isinstance(p.error, str))
    a = parse_answer(tt, text, lenient)
    assert isinstance(a, Answer) and isinstance(a.text, str)
    if lenient:
        assert a.well_formatted
    if a.well_formatted and not lenient:
        assert tags_ok(text)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="`<>", blacklist_categories=("Cs",)), min_size=1,
               max_size=40).filter(lambda s: s.strip() == s and s))
def test_property_round_trip_output_block(value):
    a = parse_answer("deduction", wrap(f"```output\n{value}\n```"))
    assert a.text == value.strip() and a.well_formatted


def test_register_fourth_task_type():
    def propose(tt, refs, banned, program, n):
        return "propose a riddle"

    def solve(task, num_shown):
        return f"solve {task.input}"

    def parse_p(tt, text, program=""):
        return Proposal(program="def f(a):\n    return a", input=text.strip(), well_formatted=True)

    def parse_a(text, lenient=False):
        return Answer(text.strip(), True)
    riddle = dataclasses.replace(DEDUCTION, name="riddle", propose=propose, compact=None, solve=solve,
                                 parse_proposal=parse_p, parse_answer=parse_a, seed=lambda: Task("riddle", "p", "x"))
    try:
        register_task_type(riddle)
        for style in ("official", "compact"):      # no compact prompt: the official one
            assert propose_prompt("riddle", [], (), style=style) == "propose a riddle"
        assert solve_prompt(seed_task("riddle")) == "solve x"
        assert parse_proposal("riddle", " 1 ").input == "1" and parse_answer("riddle", " y ").text == "y"
    finally:
        TASK_TYPES.pop("riddle", None)
