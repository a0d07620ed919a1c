"""The TRR++ update computes the gradient of the plain per-sequence forward, in float32, however it batches.

token_logps runs a micro-batch as one row, each prefix its sequences share once, and the LM head in chunks;
these tests hold it to the straightforward computation: each sequence alone through the whole model, log-softmax
over the full logits.
"""
from __future__ import annotations

import random

import pytest
import torch

import azr
import model as models
from config import Config


def reference_logps(policy, sample: azr.Rollout, temperature: float) -> torch.Tensor:
    """The plain path: one sequence, the whole model, the full logits, log-softmax."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    logits = policy(input_ids=ids).logits[0, len(sample.prompt_ids) - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(sample.response_ids)[:, None]).squeeze(-1)


def batch_of_rollouts(vocab: int) -> list[azr.Rollout]:
    """Prompts that share nothing, a prefix, or everything; responses of different lengths; both advantage signs."""
    rng = random.Random(0)
    common = [rng.randrange(vocab) for _ in range(12)]
    prompts = [common + [rng.randrange(vocab) for _ in range(5)],                   # shares 12 tokens with the next
               common + [rng.randrange(vocab) for _ in range(9)],
               common[:7], common[:7],                                              # identical prompts
               [rng.randrange(vocab) for _ in range(15)],
               [rng.randrange(vocab) for _ in range(3)]]
    return [azr.Rollout("deduction", "solve", "", p, [rng.randrange(vocab) for _ in range(n)], "",
                        advantage=a) for p, n, a in zip(prompts, (9, 3, 6, 11, 1, 7), (1.0, -0.5, 0.8, -1.2, 0.3, 2.0))]


def fp32_policy(model_dir, gradient_checkpointing: bool):
    torch.manual_seed(0)
    policy, tokenizer = models.load_policy(str(model_dir), lora_r=4, lora_alpha=8, load_in_4bit=False, device="cpu",
                                           dtype="fp32", gradient_checkpointing=gradient_checkpointing)
    with torch.no_grad():                     # B = 0 would leave A without gradient
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return policy, tokenizer


def lora_grads(policy) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in policy.parameters() if p.requires_grad])


@pytest.mark.parametrize("gradient_checkpointing, micro_batch_size, chunk, checkpoint_above",
                         [(False, 6, 1024, 0), (False, 2, 4, 0), (True, 3, 5, 0), (False, 1, 4, 24)])
def test_the_update_gradient_equals_the_plain_forward_gradient(tiny_model_dir, monkeypatch, gradient_checkpointing,
                                                               micro_batch_size, chunk, checkpoint_above):
    """One policy_update step's LoRA gradient equals the gradient of the same loss over the plain path, with and
    without gradient checkpointing (for all micro-batches, or only those over checkpoint_above positions), whether
    micro-batches pack many sequences or few, and whether the LM head runs in one chunk or many."""
    monkeypatch.setattr(azr, "LOGITS_CHUNK_TOKENS", chunk)
    policy, tokenizer = fp32_policy(tiny_model_dir, gradient_checkpointing)
    samples = batch_of_rollouts(len(tokenizer))
    tokens = sum(len(s.response_ids) for s in samples)
    policy.train()
    loss = sum(-(reference_logps(policy, s, 0.7) * s.advantage).sum() for s in samples) / tokens   # ratio 1
    loss.backward()
    expected = lora_grads(policy)
    policy.zero_grad(set_to_none=True)
    cfg = Config(mini_batches=1, micro_batch_size=micro_batch_size, temperature=0.7, max_grad_norm=1e9,
                 learning_rate=1e-3, checkpoint_above_positions=checkpoint_above)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    azr.policy_update(policy, optimizer, samples, cfg, azr.Timer(), random.Random(0))
    got = lora_grads(policy)
    assert expected.abs().max() > 1e-4                                  # a real gradient, not zeros
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_only_micro_batches_over_the_position_cap_recompute_their_activations(tiny_model_dir, monkeypatch):
    """With checkpoint_above_positions the long micro-batches run with activation checkpointing and the short ones
    without; afterwards the base is as before (no checkpointing, no input-gradient hook)."""
    policy, tokenizer = fp32_policy(tiny_model_dir, gradient_checkpointing=False)
    base = policy.get_base_model()
    seen: list[tuple[int, bool]] = []
    backward = azr.micro_batch_backward

    def spy(policy, batch, *args):
        seen.append((azr.packed_positions(batch), base.is_activation_checkpointing))
        return backward(policy, batch, *args)

    monkeypatch.setattr(azr, "micro_batch_backward", spy)
    cfg = Config(mini_batches=1, micro_batch_size=1, temperature=0.7, checkpoint_above_positions=24)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    azr.policy_update(policy, optimizer, batch_of_rollouts(len(tokenizer)), cfg, azr.Timer(), random.Random(0))
    assert {on for _, on in seen} == {True, False}
    assert all(on == (positions > 24) for positions, on in seen)
    assert not base.is_activation_checkpointing and not getattr(base, "_require_grads_hooks", None)


def test_packed_positions_count_the_token_tree_nodes():
    samples = batch_of_rollouts(1000)
    for k in range(1, len(samples) + 1):
        tree = azr.TokenTree([s.prompt_ids + s.response_ids for s in samples[:k]])
        assert azr.packed_positions(samples[:k]) == len(torch.cat(tree.paths).unique())   # nodes, not padding
    assert azr.packed_positions(samples[2:4]) == len(samples[2].prompt_ids) + len(samples[2].response_ids) \
        + len(samples[3].response_ids)                                                    # identical prompts


def test_token_logps_equal_the_plain_forward_and_share_the_prompt_prefix(tiny_model_dir):
    """Log-probs and entropies as the plain path gives them; the shared prefix runs through the model once."""
    policy, tokenizer = fp32_policy(tiny_model_dir, gradient_checkpointing=False)
    samples = batch_of_rollouts(len(tokenizer))[:4]
    positions = []
    policy.get_base_model().get_input_embeddings().register_forward_hook(
        lambda module, args, out: positions.append(args[0].numel()))
    with torch.no_grad():
        logp, entropy = azr.token_logps(policy, samples, 1.0)
        expected = torch.cat([reference_logps(policy, s, 1.0) for s in samples])
        logits = torch.cat([policy(input_ids=torch.tensor([s.prompt_ids + s.response_ids])).logits[
            0, len(s.prompt_ids) - 1:-1] for s in samples[:4]])
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-5)
    plain_entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(entropy, plain_entropy, rtol=1e-5, atol=1e-5)
    # one row: each distinct prefix of the four sequences once (the first two share 12 tokens, the last two 7),
    # padded up to a multiple of ALIGN_NODES
    sequences = [s.prompt_ids + s.response_ids for s in samples]
    distinct = len({tuple(seq[:k]) for seq in sequences for k in range(1, len(seq) + 1)})
    assert distinct <= sum(map(len, sequences)) - 12 - 6
    assert positions[0] == distinct + (-distinct % azr.ALIGN_NODES)


def test_the_update_never_holds_a_whole_micro_batch_of_logits(tiny_model_dir, monkeypatch):
    """The LM head sees at most LOGITS_CHUNK_TOKENS positions at a time, each chunk's backward runs before the next
    chunk's forward and nothing is recomputed, so [micro-batch, response, vocab] float32 logits never exist."""
    monkeypatch.setattr(azr, "LOGITS_CHUNK_TOKENS", 4)
    policy, tokenizer = fp32_policy(tiny_model_dir, gradient_checkpointing=False)
    events = []
    head = policy.get_base_model().get_output_embeddings()
    def record(module, args, out):
        events.append(("forward", out.shape[:-1].numel()))
        args[0].register_hook(lambda grad: events.append(("backward", 0)))     # the gradient reaching the chunk
    head.register_forward_hook(record)
    cfg = Config(mini_batches=1, micro_batch_size=6, learning_rate=1e-3)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    azr.policy_update(policy, optimizer, batch_of_rollouts(len(tokenizer)), cfg, azr.Timer(), random.Random(0))
    rows = [n for kind, n in events if kind == "forward"]
    assert max(rows) <= 4 and sum(rows) == 37      # 37 response tokens, each through the head once
    assert [kind for kind, _ in events] == ["forward", "backward"] * len(rows)


def test_micro_batches_pack_shared_prefixes_within_the_padded_budget():
    """A micro-batch holds at most size x the longest sequence's positions, counting a shared prefix once: sequences
    that share most of their tokens go together, and the budget of `size` padded sequences is never exceeded."""
    prompt = list(range(100))
    samples = [azr.Rollout("deduction", "propose", "", prompt, [1000 + k] * 10, "") for k in range(5)]   # 110 each
    samples += [azr.Rollout("deduction", "solve", "", [7] * 60, [8] * 50, "")]                         # 110, alone
    batches = azr.micro_batches(samples, list(range(len(samples))), 2)
    positions = [len({tuple(seq[:k]) for i in b for seq in [samples[i].prompt_ids + samples[i].response_ids]
                      for k in range(1, len(seq) + 1)}) for b in batches]
    assert sorted(map(sorted, batches)) == [[0, 1, 2, 3, 4], [5]]      # 100 + 5 x 10 = 150 <= 2 x 110
    assert max(positions) <= 2 * 110
    assert len(azr.micro_batches(samples, list(range(len(samples))), 1)) == 6   # each fills 110 alone
