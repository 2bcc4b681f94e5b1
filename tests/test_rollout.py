"""rollout.sample, the plain decode loop: same tokens as transformers' generate, masks by position,
the intended distribution. The fixed-shape and compiled steps: tests/infra/test_fast_decode.py."""
import math
from types import SimpleNamespace

import pytest
import torch

import rollout
from helpers import FIELDS, NEW, check_masks, first_hit, hf_greedy, pick_eos, ragged_prompts


def test_greedy_matches_generate_without_eos(arch_model):
    ids, mask = ragged_prompts()
    ref = hf_greedy(arch_model, ids, mask, eos=None)
    r = rollout.sample(arch_model, ids, mask, NEW, temperature=0)
    assert torch.equal(r.sequences, ref)
    assert r.truncated.all() and r.completion_mask[:, ids.size(1):].eq(1).all()


@pytest.mark.parametrize("check_every", [None, 4], ids=["plain", "plain-check-4"])
def test_greedy_matches_generate_with_eos(arch_model, check_every):
    """check_every: asking whether all rows have finished only every k steps (the GPU default) runs
    extra steps after the last EOS; they must be cut off, leaving HF's sequences exactly."""
    ids, mask = ragged_prompts()
    free = rollout.sample(arch_model, ids, mask, NEW, temperature=0).sequences[:, ids.size(1):]
    eos = pick_eos(free)
    pad = 127 if 127 not in eos else 126  # pad != eos here; pad == eos (GPT-2 style): below
    ref = hf_greedy(arch_model, ids, mask, eos=eos, pad=pad)
    r = rollout.sample(arch_model, ids, mask, NEW, temperature=0, eos_token_id=eos,
                       pad_token_id=pad, check_every=check_every)
    assert torch.equal(r.sequences, ref)  # also the same length: both stop when every row is done
    check_masks(r, mask, eos)
    steps = first_hit(r.sequences[:, ids.size(1):], eos)
    for i, step in enumerate(steps):  # after EOS: pad only
        assert r.sequences[i, ids.size(1) + step + 1:].eq(pad).all()


def test_pad_equal_to_eos_keeps_eos_in_completion(gpt2_model):
    ids, mask = ragged_prompts()
    free = rollout.sample(gpt2_model, ids, mask, NEW, temperature=0).sequences[:, ids.size(1):]
    eos = int(free[1, 0])  # row 1 stops at once; pad is the same id (GPT-2 style)
    ref = hf_greedy(gpt2_model, ids, mask, eos=eos, pad=eos)
    r = rollout.sample(gpt2_model, ids, mask, NEW, temperature=0, eos_token_id=eos,
                       pad_token_id=eos)
    assert torch.equal(r.sequences, ref)
    check_masks(r, mask, [eos])
    P = ids.size(1)
    assert r.completion_mask[1, P] == 1 and r.completion_mask[1, P + 1:].eq(0).all()


@pytest.mark.parametrize("check_every", [None, 8])
def test_all_rows_finish_early_and_not_truncated(qwen2_model, check_every):
    ids, mask = ragged_prompts()
    free = rollout.sample(qwen2_model, ids, mask, NEW, temperature=0).sequences[:, ids.size(1):]
    eos = sorted(set(free[:, 1].tolist()))  # every row emits one of these at step 1
    r = rollout.sample(qwen2_model, ids, mask, NEW, temperature=0, eos_token_id=eos,
                       check_every=check_every)
    assert r.sequences.size(1) <= ids.size(1) + 2 and not r.truncated.any()
    check_masks(r, mask, eos)


def test_no_padding_and_batch_of_one(qwen2_model):
    ids, mask = ragged_prompts(batch=3, pads=(0, 0, 0))
    r = rollout.sample(qwen2_model, ids, mask, NEW, temperature=0)
    assert torch.equal(r.sequences, hf_greedy(qwen2_model, ids, mask, eos=None))
    one = rollout.sample(qwen2_model, ids[:1], mask[:1], NEW, temperature=0)
    assert torch.equal(one.sequences, r.sequences[:1])
    assert one.sequences.shape == (1, ids.size(1) + NEW) and one.truncated.tolist() == [True]


def test_seed_reproduces_rollout(qwen2_model):
    """(The same draws on the fixed-shape path: tests/infra/test_fast_decode.py.)"""
    ids, mask = ragged_prompts()

    def run(seed, **kw):
        return rollout.sample(qwen2_model, ids, mask, NEW, temperature=1.0, top_p=0.9, top_k=50,
                              eos_token_id=[3, 4], generator=torch.Generator().manual_seed(seed),
                              **kw)
    a, b, c = run(0), run(0), run(1)
    for field in FIELDS:
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.sequences, c.sequences)
    # checking for the end every 5 steps draws for extra steps after the last EOS, never before it
    lagged = run(0, check_every=5)
    for field in FIELDS:
        assert torch.equal(getattr(a, field), getattr(lagged, field))


def test_no_new_tokens_returns_the_prompts(qwen2_model):
    """max_new_tokens=0 (the no-rationale baseline): the prompts as they are, nothing generated,
    nothing truncated, and no forward run at all."""
    ids, mask = ragged_prompts()

    def no_forward(*args, **kwargs):
        raise AssertionError("max_new_tokens=0 ran the model")
    r = rollout.sample(qwen2_model, ids, mask, 0, step=no_forward)
    assert torch.equal(r.sequences, ids) and torch.equal(r.attention_mask, mask)
    assert r.completion_mask.shape == ids.shape and r.completion_mask.eq(0).all()
    assert r.truncated.dtype == torch.bool and r.truncated.tolist() == [False] * len(ids)


def test_step_is_the_forward_of_every_step(qwen2_model):
    """The loop runs whatever `step` it is handed (default: plain_step(model)); a step wrapping it
    sees the prefill (no cache, the prompt width), then one token and one column more each step."""
    ids, mask = ragged_prompts()
    plain, seen = rollout.plain_step(qwen2_model), []

    def step(input_ids, step_mask, position_ids, cache, width):
        seen.append((input_ids.shape[1], cache is None, width, step_mask.shape[1]))
        return plain(input_ids, step_mask, position_ids, cache, width)
    r = rollout.sample(qwen2_model, ids, mask, NEW, temperature=0, step=step)
    default = rollout.sample(qwen2_model, ids, mask, NEW, temperature=0)
    assert torch.equal(r.sequences, default.sequences)
    P, L = ids.size(1), ids.size(1) + NEW
    assert seen == [(P, True, P, L)] + [(1, False, P + t, L) for t in range(1, NEW)]


def test_diverged_weights_fail_at_the_prefill():
    model = FixedLogits(torch.tensor([0.0, float("nan"), 1.0]))
    ids = torch.full((2, 3), 1)
    with pytest.raises(FloatingPointError, match="not finite"):
        rollout.sample(model, ids, torch.ones_like(ids), 4)


def test_concat_right_pads_to_the_longest_and_keeps_row_order():
    def ro(width, fill, truncated):
        B = len(truncated)
        seqs = torch.full((B, width), fill)
        ones = torch.ones((B, width), dtype=torch.long)
        return rollout.Rollout(seqs, ones, ones.clone(), torch.tensor(truncated))
    a, b = ro(5, 7, [True]), ro(3, 8, [False, True])
    out = rollout.concat([a, b], pad_token_id=9)
    assert out.sequences.tolist() == [[7] * 5, [8, 8, 8, 9, 9], [8, 8, 8, 9, 9]]
    for mask in (out.attention_mask, out.completion_mask):
        assert mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert out.truncated.tolist() == [True, False, True]
    assert torch.equal(rollout.concat([a]).sequences, a.sequences)  # one chunk: as it was


# ----------------------------------------------------------------------------- computed once

def shared_vs_repeated(model, make_step, temperature, n=3):
    """-> (the prompts repeated n-fold, sampled as n=1; each prompt once, n=n), the same seed and
    an EOS that stops some rows early. Multinomial draws over the (B*n, V) rows in the same order,
    so identical logits give identical tokens."""
    ids, mask = ragged_prompts()
    free = rollout.sample(model, ids, mask, NEW, temperature=0)  # (plain: no other shape compiles)
    eos = pick_eos(free.sequences[:, ids.size(1):])

    def run(prompts, prompt_mask, k):
        return rollout.sample(model, prompts, prompt_mask, NEW, temperature=temperature, top_p=0.95,
                              eos_token_id=eos, generator=torch.Generator().manual_seed(0), n=k,
                              step=make_step())
    return run(ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), 1), run(ids, mask, n)


def check_shared_prefill(model, make_step, temperature, n=3):
    repeated, shared = shared_vs_repeated(model, make_step, temperature, n)
    for field in FIELDS:
        assert torch.equal(getattr(shared, field), getattr(repeated, field)), field
    rows = shared.sequences.view(-1, n, shared.sequences.size(1))  # (B, n, L)
    differ = [not torch.equal(group[0], group[1]) for group in rows]
    assert all(differ) if temperature else not any(differ)  # each row draws on its own copy


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_shared_prefill_equals_repeated_prompts(arch_model, temperature):
    """Each prompt prefilled once, its n rows continuing from copies of its KV cache: token for
    token the rollouts of the prompts repeated n-fold."""
    check_shared_prefill(arch_model, lambda: rollout.plain_step(arch_model), temperature)


def check_sampler_matches_forward(model, make_step, temperature, check_every=None, n=2):
    """Rollout.pooled and .logprobs against policy's full forward over the finished rollouts: the
    masked sum of its last hidden states, and token_logprobs (unfiltered, under logits / 0.7)."""
    import policy

    ids, mask = ragged_prompts()  # left padding (0, 2, 5, 1)
    free = rollout.sample(model, ids, mask, NEW, temperature=0)
    eos = pick_eos(free.sequences[:, ids.size(1):])  # greedy: some rows stop early, some run out
    start = torch.tensor([1, 3, 6, 2])  # pooling starts inside each prompt
    r = rollout.sample(model, ids, mask, NEW, temperature=temperature, top_k=20, top_p=0.8,
                       eos_token_id=eos, generator=torch.Generator().manual_seed(1), n=n,
                       step=make_step(), check_every=check_every, pool_start=start,
                       logprob_temperature=0.7)
    if not temperature:
        assert r.truncated.any() and not r.truncated.all()
    hidden = policy.hidden_states(model, r.sequences, r.attention_mask)  # (N, L, H)
    pool = policy.pool_mask_from(r.attention_mask, start.repeat_interleave(n))
    torch.testing.assert_close(r.pooled, torch.where(pool[..., None], hidden, 0.0).sum(1),
                               rtol=1e-5, atol=1e-5)
    want = policy.token_logprobs(model, r.sequences, r.attention_mask, r.completion_mask, 0.7)
    torch.testing.assert_close(r.logprobs, want, rtol=1e-5, atol=1e-5)
    assert r.logprobs[r.completion_mask == 0].eq(0).all()


@pytest.mark.parametrize("temperature, check_every", [(0.0, None), (0.0, 4), (1.0, None)],
                         ids=["greedy", "greedy-check-4", "seeded"])
def test_sampler_pooled_states_and_logprobs_equal_the_full_forward(arch_model, temperature,
                                                                    check_every):
    """check_every 4 runs steps after the last EOS: they must add nothing."""
    check_sampler_matches_forward(arch_model, lambda: rollout.plain_step(arch_model), temperature,
                                  check_every)


def test_concat_stacks_pooled_and_pads_logprobs(qwen2_model):
    ids, mask = ragged_prompts()
    kw = dict(temperature=0, pool_start=torch.zeros(2, dtype=torch.long), logprob_temperature=1.0)
    a = rollout.sample(qwen2_model, ids[:2], mask[:2], NEW, **kw)
    b = rollout.sample(qwen2_model, ids[2:], mask[2:], NEW - 3, **kw)
    out = rollout.concat([a, b])
    assert torch.equal(out.pooled, torch.cat([a.pooled, b.pooled]))
    assert torch.equal(out.logprobs[:2], a.logprobs) and out.logprobs[2:, -3:].eq(0).all()
    assert torch.equal(out.logprobs[2:, :-3], b.logprobs) and a.logprobs[:, -3:].ne(0).all()
    assert rollout.concat([rollout.Rollout(ids, mask, mask, mask[:, 0].bool())]).pooled is None


# ----------------------------------------------------------------------------- the distribution

class FixedLogits(torch.nn.Module):
    """A stand-in LM whose next-token logits are always `logits` (V,), with the forward interface
    rollout.sample uses."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("fixed", logits)

    def forward(self, input_ids, attention_mask, position_ids, cache=None, use_cache=True,
                logits_to_keep=0, output_hidden_states=None):
        B, W = input_ids.shape
        return SimpleNamespace(logits=self.fixed.expand(B, 1, -1), cache=cache,
                               hidden_states=(torch.zeros(B, W, 1),))


LOGITS = torch.tensor([2.0, 1.1, 0.4, -0.3, 1.6, -1.2, 0.8, 0.1, -2.0, 0.55])
N = 40_000  # rows, one token each


def empirical(temperature, top_k=0, top_p=1.0, seed=0):
    model = FixedLogits(LOGITS.to(torch.bfloat16))  # bf16 logits: sampling must still be float32
    ids = torch.full((N, 1), 5)
    r = rollout.sample(model, ids, torch.ones_like(ids), 1, temperature=temperature, top_k=top_k,
                       top_p=top_p, generator=torch.Generator().manual_seed(seed))
    assert r.sequences.shape == (N, 2) and r.completion_mask[:, 1].eq(1).all()
    return torch.bincount(r.sequences[:, 1], minlength=len(LOGITS)).double() / N


def expected(temperature, support=None):
    """softmax(logits / T) in float64, renormalised on `support` (a list of token ids)."""
    x = LOGITS.double() / temperature
    keep = torch.zeros(len(x), dtype=torch.bool)
    keep[support if support is not None else list(range(len(x)))] = True
    return torch.where(keep, x, torch.tensor(-math.inf, dtype=torch.float64)).softmax(0)


def assert_close(freq, p):
    # Each frequency is a mean of N Bernoulli(p) draws: sd = sqrt(p(1-p)/N) (<= 0.0025 at N=40k).
    # 5 sd per token keeps a false alarm below 1e-5 per token; a wrong temperature or support
    # shifts some frequency by far more. Outside the support the count must be exactly 0.
    assert (freq[p == 0] == 0).all(), (freq, p)
    tol = 5 * (p * (1 - p) / N).sqrt() + 1e-4
    assert ((freq - p).abs() <= tol).all(), (freq, p)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_follows_tempered_softmax(temperature):
    assert_close(empirical(temperature), expected(temperature))


def by_hand_order(temperature):
    x = (LOGITS.double() / temperature).tolist()
    return sorted(range(len(x)), key=lambda i: -x[i])


def test_top_k_support_and_renormalised_probs():
    for k in (1, 3, 6):
        support = by_hand_order(0.8)[:k]
        assert_close(empirical(0.8, top_k=k), expected(0.8, support))


def test_top_p_support_and_renormalised_probs():
    T = 1.0
    p_full = expected(T)
    for top_p in (0.3, 0.62, 0.9):
        support, mass = [], 0.0
        for i in by_hand_order(T):  # smallest set of the most likely tokens reaching top_p
            support.append(i)
            mass += float(p_full[i])
            if mass >= top_p:
                break
        assert abs(mass - top_p) > 1e-3  # not a float-rounding borderline case
        assert_close(empirical(T, top_p=top_p), expected(T, support))
    # a tiny p keeps just the most likely token
    assert_close(empirical(T, top_p=1e-6), expected(T, by_hand_order(T)[:1]))


def test_top_k_then_top_p():
    T, k, top_p = 0.7, 4, 0.8
    order = by_hand_order(T)[:k]
    p_k = expected(T, order)
    support, mass = [], 0.0
    for i in order:
        support.append(i)
        mass += float(p_k[i])
        if mass >= top_p:
            break
    assert_close(empirical(T, top_k=k, top_p=top_p), expected(T, support))


def test_greedy_on_fixed_logits_and_filter_logits():
    assert empirical(0).eq(torch.eye(len(LOGITS))[int(LOGITS.argmax())].double()).all()
    # greedy on bf16 logits as they come: the float64 argmax, ties (bf16 has many) to the first
    g = torch.Generator().manual_seed(0)
    # integers: ties in every row
    coarse = (torch.randn(64, 1000, generator=g) * 2).round().to(torch.bfloat16)
    assert torch.equal(rollout.next_token(coarse, temperature=0), coarse.double().argmax(-1))
    out = rollout.filter_logits(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), top_k=2)
    assert torch.isinf(out[0, [0, 2]]).all()
    assert torch.equal(out[0, [1, 3]], torch.tensor([3.0, 2.0]))
