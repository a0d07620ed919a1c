"""bench/gpu_check.py — one command for a person with one GPU: does the preset that `python azr.py` picks fit,
and how fast does it generate? A few minutes, no download.

It builds a random-weight model from a shipped config.json (default Qwen2.5-Coder-3B; --model-config for another)
with a synthetic tokenizer of the model's vocabulary, saves it to a temporary folder and loads it with the loop's
own loader (4-bit NF4 + LoRA where bitsandbytes is installed, else bf16, said so). Then, at the batch shapes of the
preset chosen for this card (azr.py --plan):

  generation  one batch of --generation-batch-size rows, each a prompt of the plan's length, through the loop's own
              generation.generate with the preset's token cap. A random model would never stop, so each decode
              step ends a response with probability 1/--mean-response (a bias on the end token's logit): rows
              finish at different lengths and leave the batch, as in a real iteration.
  anchor      the same prompts through transformers' continuous batching (model.generate_batch, paged attention)
  update      one optimizer step of azr.policy_update on one micro-batch of full-length rollouts

and prints tokens/s, useful/computed decode tokens, phase times, and each phase's peak CUDA memory next to the
plan's prediction (memory.py).

    python bench/gpu_check.py                                            # the 3B config, this GPU's preset
    python bench/gpu_check.py --model-config data/model-configs/Qwen2.5-Coder-7B
    python bench/gpu_check.py --tiny                                     # a tiny shape on a CPU, ~20 s (tests)
"""
from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import azr  # noqa: E402
import memory  # noqa: E402
import model as models  # noqa: E402
from config import PRESETS, Config  # noqa: E402
from generation import STOP_TOKENS, GenerationStats, generate  # noqa: E402

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, tie_word_embeddings=True)


def build_model(config: dict, folder: Path, device: str):
    """A random-weight model of `config`, saved to `folder`, and a word-level tokenizer covering its vocabulary
    (kept in memory: a Qwen2 folder's tokenizer would load as Qwen2's byte-level BPE)."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(config["vocab_size"] - len(STOP_TOKENS))}
    vocab.update({token: len(vocab) + i for i, token in enumerate(STOP_TOKENS)})
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=STOP_TOKENS[0], pad_token=STOP_TOKENS[1],
                                        padding_side="left")
    cfg = AutoConfig.for_model(**{**config, "eos_token_id": vocab[STOP_TOKENS[0]],
                                  "pad_token_id": vocab[STOP_TOKENS[1]], "bos_token_id": None})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def stop_after(policy, eos: int, mean_length: int):
    """Make each sampled token the end token with probability 1/mean_length (temperature 1), until the returned
    handle is removed."""
    def hook(module, inputs, logits):
        logits = logits.clone()
        others = logits.float().logsumexp(-1)
        logits[..., eos] = (others - torch.log(torch.tensor(mean_length - 1.0))).to(logits.dtype)
        return logits
    return policy.get_base_model().get_output_embeddings().register_forward_hook(hook)


def measured(device: str, phase, *args):
    """Run phase(*args); return its result, seconds and peak CUDA memory (None on a CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = phase(*args)
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return result, time.perf_counter() - t0, peak


def continuous_batching(policy, prompts: list[list[int]], cap: int, small: bool):
    """The same prompts through transformers' continuous batching, with the adapter merged (as generate does).
    It sizes its paged cache from the free memory; `small` gives it a few pages instead (a CPU)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from generation import adapters_merged
    config = GenerationConfig(max_new_tokens=cap, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                              eos_token_id=policy.generation_config.eos_token_id,
                              pad_token_id=policy.generation_config.pad_token_id)
    policy.eval()
    with torch.no_grad(), adapters_merged(policy):
        paged = ContinuousBatchingConfig(num_blocks=4 * len(prompts), max_batch_tokens=1024) if small else None
        out = policy.get_base_model().generate_batch(inputs=prompts, generation_config=config,
                                                     continuous_batching_config=paged, warmup=not small)
    return sum(len(o.generated_tokens) for o in out.values())


def gib(x: float | None) -> str:
    return "   -  " if x is None else f"{x / memory.GIB:6.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", default=str(memory.MODEL_CONFIGS / "Qwen2.5-Coder-3B"),
                    help="folder with a config.json, or the file (default: the shipped Qwen2.5-Coder-3B)")
    ap.add_argument("--gpu-memory-gib", type=float, help="plan for this card instead of the GPU found")
    ap.add_argument("--mean-response", type=int, default=512, help="mean response length in tokens (a random "
                    "model does not stop by itself)")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape on this machine (CPU included), ~20 s")
    args = ap.parse_args(argv)
    device = models.pick_device()
    config = memory.read_config(args.model_config)
    four_bit = device == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
    if args.tiny:
        config = {**config, **TINY}
        cfg = Config(**{**PRESETS["cpu-demo"], "generation_batch_size": 4, "micro_batch_size": 2,
                        "max_new_tokens_propose": 24, "max_new_tokens_solve": 24, "num_references": 0})
        card, preset = args.gpu_memory_gib, "tiny"
    else:
        card = args.gpu_memory_gib or (azr.cuda_free_gib() if device == "cuda" else None)
        if card is None:
            print("gpu_check: no CUDA GPU here; give --gpu-memory-gib N to plan for one, or --tiny", file=sys.stderr)
            return 2
        preset = azr.fitting_preset({}, card)
        cfg = Config(**PRESETS[preset])
    cfg = Config(**{**cfg.__dict__, "load_in_4bit": four_bit, "dtype": "bf16" if device == "cuda" else "fp32",
                    "mini_batches": 1})
    shape = memory.Shape.from_config(config)
    cap = max(cfg.max_new_tokens_propose, cfg.max_new_tokens_solve)
    plan = azr.memory_plan(cfg, shape)
    weights = ("4-bit NF4" if four_bit else "bf16 (bitsandbytes not installed: no 4-bit)" if device == "cuda"
               else cfg.dtype)
    print(f"gpu_check: {device}, preset {preset}, {shape.layers} layers x {shape.hidden}, {weights} + LoRA, "
          f"{cfg.generation_batch_size} rows x ({plan.prompt_tokens} + up to {cap} tokens), micro-batch "
          f"{cfg.micro_batch_size}\n{plan.table(card)}", flush=True)
    if card is not None and not plan.fits(card):
        print(f"gpu_check: the plan does not fit {card:.1f} GiB", file=sys.stderr)
        return 2
    if importlib.util.find_spec("peft") is None or importlib.util.find_spec("trl") is None:
        print("gpu_check: the update needs peft and trl: pip install -r requirements.txt", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as folder:
        t0 = time.perf_counter()
        tokenizer = build_model(config, Path(folder), device)
        policy, _ = models.load_policy(folder, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, device=device,
                                               dtype=cfg.dtype, load_in_4bit=four_bit,
                                               gradient_checkpointing=cfg.gradient_checkpointing)
        print(f"gpu_check: random model built and loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    return run_phases(policy, tokenizer, cfg, plan, device, args.mean_response, cap)


def run_phases(policy, tokenizer, cfg: Config, plan: memory.Plan, device: str, mean_response: int, cap: int) -> int:
    """Generation, the continuous-batching anchor and one update step, each measured."""
    stopping = stop_after(policy, tokenizer.eos_token_id, min(mean_response, cap))
    rng = random.Random(0)
    vocab = len(tokenizer) - len(STOP_TOKENS)
    prompts = [[rng.randrange(vocab) for _ in range(plan.prompt_tokens)] for _ in range(cfg.generation_batch_size)]
    texts = [" ".join(f"t{i}" for i in p) for p in prompts]
    stats = GenerationStats()
    generated, seconds, peak = measured(device, lambda: generate(
        policy, tokenizer, texts, cap, temperature=1.0, batch_size=cfg.generation_batch_size, stats=stats))
    rows = [("generation (generation.generate)", seconds, peak, plan.generation_peak)]
    useful = sum(len(g.response_ids) for g in generated)
    print(f"gpu_check: generation: {useful} tokens in {seconds:.1f}s = {useful / seconds:.0f} tokens/s; "
          f"useful/computed decode tokens {useful}/{stats.decode_tokens} = "
          f"{useful / max(stats.decode_tokens, 1):.2f}", flush=True)
    try:
        cb_tokens, cb_seconds, cb_peak = measured(device, continuous_batching, policy, prompts, cap,
                                                     device != "cuda")
        rows.append(("generation (transformers generate_batch)", cb_seconds, cb_peak, None))
        print(f"gpu_check: continuous batching: {cb_tokens} tokens in {cb_seconds:.1f}s = "
              f"{cb_tokens / cb_seconds:.0f} tokens/s", flush=True)
    except Exception as e:                   # an anchor only: the check goes on without it
        print(f"gpu_check: continuous batching failed here: {type(e).__name__}: {str(e)[:200]}", flush=True)
    stopping.remove()
    samples = [azr.Rollout("deduction", "solve", "", p, [rng.randrange(vocab) for _ in range(cap)], "",
                           advantage=(-1.0) ** i) for i, p in enumerate(prompts[:cfg.micro_batch_size])]
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    timer = azr.Timer()
    _, seconds, peak = measured(device, azr.policy_update, policy, optimizer, samples, cfg, timer, random.Random(0))
    rows.append((f"update ({cfg.micro_batch_size} x {plan.prompt_tokens + cap} tokens, one step)", seconds, peak,
                 plan.update_peak))
    print(f"\n{'phase':<56} {'seconds':>8} {'peak GiB':>9} {'plan GiB':>9}")
    for name, secs, measured_peak, planned in rows:
        print(f"{name:<56} {secs:8.1f} {gib(measured_peak):>9} {gib(planned):>9}")
    if device != "cuda":
        print("gpu_check: no CUDA GPU: times only, no memory figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
