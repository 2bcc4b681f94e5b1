"""rollout.sample: same tokens as transformers' generate, masks by position, the intended distribution."""
import itertools
import math
from types import SimpleNamespace

import pytest
import torch

import rollout
from conftest import VOCAB, make_arch_model

NEW = 10


def ragged_prompts(batch=4, length=7, pads=(0, 2, 5, 1), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads[:batch]):
        ids[i, :p], mask[i, :p] = 0, 0
    return ids, mask


def hf_greedy(model, ids, mask, eos, pad=0, new=NEW):
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                          eos_token_id=eos, pad_token_id=pad)


def first_hit(tokens, eos):
    """(B,) step of each row's first token in `eos` (len(row) if none), from a (B, T) greedy run."""
    hits = torch.isin(tokens, torch.tensor(eos))
    return [int(row.nonzero()[0]) if row.any() else tokens.size(1) for row in hits]


def pick_eos(tokens):
    """EOS ids (one or two tokens the greedy run does emit) that stop rows at different steps and
    leave at least one row running to the end, so stopping and truncation are both exercised."""
    candidates = sorted(set(tokens[:, 1:].flatten().tolist()))
    best, best_score = None, 0
    for eos in itertools.chain(([c] for c in candidates), (list(p) for p in itertools.combinations(candidates, 2))):
        steps = first_hit(tokens, eos)
        if max(steps) < tokens.size(1) or min(steps) == tokens.size(1):
            continue  # need some row never stopping and some row stopping
        score = len(set(steps))
        if score > best_score:
            best, best_score = eos, score
    assert best is not None and best_score >= 2, tokens
    return best


def check_masks(r, prompt_mask, eos):
    """Masks by position: completion_mask covers generated tokens up to and including the first EOS."""
    P = prompt_mask.size(1)
    assert r.completion_mask[:, :P].eq(0).all()
    assert torch.equal(r.attention_mask[:, :P], prompt_mask)
    comp = r.sequences[:, P:]
    for i, step in enumerate(first_hit(comp, eos)):
        n = min(step + 1, comp.size(1))  # tokens kept: up to and including EOS
        assert r.completion_mask[i, P:P + n].eq(1).all() and r.completion_mask[i, P + n:].eq(0).all()
        assert torch.equal(r.attention_mask[i, P:], r.completion_mask[i, P:])
        assert bool(r.truncated[i]) == (step == comp.size(1))


@pytest.mark.parametrize("static", [False, True], ids=["plain", "static"])
def test_greedy_matches_generate_without_eos(arch_model, static):
    ids, mask = ragged_prompts()
    ref = hf_greedy(arch_model, ids, mask, eos=None)
    r = rollout.sample(arch_model, ids, mask, NEW, temperature=0, static_cache=static)
    assert torch.equal(r.sequences, ref)
    assert r.truncated.all() and r.completion_mask[:, ids.size(1):].eq(1).all()


@pytest.mark.parametrize("static,check_every", [(False, None), (True, None), (False, 4), (True, 3)],
                         ids=["plain", "static", "plain-check-4", "static-check-3"])
def test_greedy_matches_generate_with_eos(arch_model, static, check_every):
    """check_every: asking whether all rows have finished only every k steps (the GPU default) runs
    extra steps after the last EOS; they must be cut off, leaving HF's sequences exactly."""
    ids, mask = ragged_prompts()
    free = rollout.sample(arch_model, ids, mask, NEW, temperature=0).sequences[:, ids.size(1):]
    eos = pick_eos(free)
    pad = 127 if 127 not in eos else 126  # pad != eos here; pad == eos (GPT-2 style) is tested below
    ref = hf_greedy(arch_model, ids, mask, eos=eos, pad=pad)
    r = rollout.sample(arch_model, ids, mask, NEW, temperature=0, eos_token_id=eos, pad_token_id=pad,
                       static_cache=static, check_every=check_every)
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
    r = rollout.sample(gpt2_model, ids, mask, NEW, temperature=0, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(r.sequences, ref)
    check_masks(r, mask, [eos])
    P = ids.size(1)
    assert r.completion_mask[1, P] == 1 and r.completion_mask[1, P + 1:].eq(0).all()


@pytest.mark.parametrize("check_every", [None, 8])
def test_all_rows_finish_early_and_not_truncated(qwen2_model, check_every):
    ids, mask = ragged_prompts()
    free = rollout.sample(qwen2_model, ids, mask, NEW, temperature=0).sequences[:, ids.size(1):]
    eos = sorted(set(free[:, 1].tolist()))  # every row emits one of these at step 1
    r = rollout.sample(qwen2_model, ids, mask, NEW, temperature=0, eos_token_id=eos, check_every=check_every)
    assert r.sequences.size(1) <= ids.size(1) + 2 and not r.truncated.any()
    check_masks(r, mask, eos)


def test_no_padding_and_batch_of_one(qwen2_model):
    ids, mask = ragged_prompts(batch=3, pads=(0, 0, 0))
    for static in (False, True):
        r = rollout.sample(qwen2_model, ids, mask, NEW, temperature=0, static_cache=static)
        assert torch.equal(r.sequences, hf_greedy(qwen2_model, ids, mask, eos=None))
        one = rollout.sample(qwen2_model, ids[:1], mask[:1], NEW, temperature=0, static_cache=static)
        assert torch.equal(one.sequences, r.sequences[:1])
        assert one.sequences.shape == (1, ids.size(1) + NEW) and one.truncated.tolist() == [True]


@pytest.mark.parametrize("static", [False, True], ids=["plain", "static"])
def test_seed_reproduces_rollout(qwen2_model, static):
    ids, mask = ragged_prompts()
    run = lambda seed, st=static: rollout.sample(  # noqa: E731
        qwen2_model, ids, mask, NEW, temperature=1.0, top_p=0.9, top_k=50, eos_token_id=[3, 4],
        generator=torch.Generator().manual_seed(seed), static_cache=st)
    a, b, c = run(0), run(0), run(1)
    for field in ("sequences", "attention_mask", "completion_mask", "truncated"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.sequences, c.sequences)
    # same draws on both paths, and the logits agree well enough to give the same tokens
    assert torch.equal(a.sequences, run(0, st=not static).sequences)
    # checking for the end every 5 steps draws for extra steps after the last EOS, never before it
    lagged = rollout.sample(qwen2_model, ids, mask, NEW, temperature=1.0, top_p=0.9, top_k=50, eos_token_id=[3, 4],
                            generator=torch.Generator().manual_seed(0), static_cache=static, check_every=5)
    for field in ("sequences", "attention_mask", "completion_mask", "truncated"):
        assert torch.equal(getattr(a, field), getattr(lagged, field))


# ----------------------------------------------------------------------------- the fast path

def test_onednn_linear_matches_float64_linear():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    x = torch.randn(5, 3, 32, generator=g)
    for inp, bias in [(x, b), (x, None), (x.transpose(0, 1), b), (x[:, 0], b)]:  # 3-D, no bias, strided, 2-D
        ref = torch.nn.functional.linear(inp.double(), w.double(), None if bias is None else bias.double())
        out = rollout.onednn_linear(inp, w, bias)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_onednn_linears_patches_fp32_linears_and_restores(qwen2_model):
    model = qwen2_model
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert linears and all("forward" not in vars(m) for m in linears)
    own = lambda x: x  # noqa: E731  a forward somebody else installed: must survive untouched
    linears[0].forward = own
    try:
        with pytest.raises(KeyError):  # restored even when the block fails
            with rollout.onednn_linears(model):
                assert linears[0].forward is own
                assert all(vars(m)["forward"].__func__ is rollout._onednn_forward for m in linears[1:])
                m = linears[1]
                x = torch.randn(2, m.in_features)
                ref = torch.nn.functional.linear(x.double(), m.weight.double(),
                                                 None if m.bias is None else m.bias.double())
                torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)
                raise KeyError
        assert linears[0].forward is own and all("forward" not in vars(m) for m in linears[1:])
        with rollout.onednn_linears(model, enabled=False):
            assert all("forward" not in vars(m) for m in linears[1:])
        with rollout.onednn_linears(model.to(torch.float64)):  # only fp32 weights are routed
            assert all("forward" not in vars(m) for m in linears[1:])
    finally:
        del linears[0].forward
        model.float()


@pytest.mark.parametrize("onednn", [True, False], ids=["oneDNN", "BLAS"])
def test_compiled_path_matches_generate_and_plain_path(arch_model, onednn, monkeypatch):
    """compile=True (static cache, torch.compile, on CPU with or without oneDNN linears, whichever
    this machine times faster): HF's greedy tokens, with EOS and ragged padding, and the same sampled
    tokens as the plain path for the same seed."""
    monkeypatch.setattr(rollout, "onednn_pays", lambda model, rows: onednn)  # both, whatever this CPU prefers
    model = arch_model  # each architecture, a fresh model: its compiled step is its own
    ids, mask = ragged_prompts()
    free = rollout.sample(model, ids, mask, NEW, temperature=0).sequences[:, ids.size(1):]
    eos = pick_eos(free)
    r = rollout.sample(model, ids, mask, NEW, temperature=0, eos_token_id=eos, compile=True)
    assert torch.equal(r.sequences, hf_greedy(model, ids, mask, eos=eos))
    check_masks(r, mask, eos)
    assert all("forward" not in vars(m) for m in model.modules())  # the model is left as it was
    run = lambda **kw: rollout.sample(model, ids, mask, NEW, temperature=1.0, top_p=0.9,  # noqa: E731
                                      generator=torch.Generator().manual_seed(3), **kw).sequences
    assert torch.equal(run(compile=True), run())


def test_decode_copy_computes_what_autocast_computes(arch_model):
    """Under autocast, the copy with bf16 Linear weights gives bit-identical logits to the fp32 master
    (autocast rounds the master's weights to the same bf16 values); everything else is shared."""
    model = arch_model
    low, pairs = rollout.decode_copy(model, torch.bfloat16)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert len(pairs) == len(linears) > 0
    for copy_linear, master in pairs:
        assert copy_linear.weight.dtype == torch.bfloat16 and not copy_linear.weight.requires_grad
        assert torch.equal(copy_linear.weight, master.weight.to(torch.bfloat16))
    copied = {id(p) for m, _ in pairs for p in m.parameters()}
    for p, q in zip(model.parameters(), low.parameters()):  # the rest is the master's own tensor
        assert id(q) in copied or q is p
    ids, mask = ragged_prompts()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(low(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits)
    same, no_pairs = rollout.decode_copy(model)  # no dtype: nothing copied at all
    assert not no_pairs and all(p is q for p, q in zip(model.parameters(), same.parameters()))
    assert model.config._attn_implementation == "sdpa"  # the master's attention is left alone


@pytest.mark.parametrize("groups", [1, 3])
def test_packed_gqa_attention_matches_float64_attention(groups):
    """One query token per row against a padded cache, on the key/value heads: the same as expanding
    the cache to every query head, softmax(q k^T / sqrt(D) + mask) v, computed by hand in float64."""
    g = torch.Generator().manual_seed(0)
    B, KV, L, D = 3, 2, 9, 8
    H = KV * groups
    q, k, v = (torch.randn(B, n, t, D, generator=g) for n, t in ((H, 1), (KV, L), (KV, L)))
    visible = torch.ones(B, 1, 1, L, dtype=torch.bool)
    visible[0, ..., :4] = False  # left padding
    visible[1, ..., 7:] = False  # cache slots not written yet (static cache)
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True)
    out, _ = rollout.packed_gqa_attention(module, q, k, v, visible, scaling=D ** -0.5)
    kx, vx = (x.double().repeat_interleave(groups, dim=1) for x in (k, v))  # (B, H, L, D)
    scores = (q.double() @ kx.transpose(-1, -2)) / D ** 0.5  # (B, H, 1, L)
    ref = scores.masked_fill(~visible, -math.inf).softmax(-1) @ vx  # (B, H, 1, D)
    assert out.shape == (B, 1, H, D)
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_compiled_path_under_autocast_samples_from_a_fresh_copy():
    """compile=True under autocast samples from the low-precision copy, refreshed at every call: after
    the master changes, its tokens are the plain path's tokens of the changed master."""
    model = make_arch_model("qwen2")  # its own copy and compiled step; modified below
    ids, mask = ragged_prompts()

    def both():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            compiled = rollout.sample(model, ids, mask, NEW, temperature=0, compile=True)
            plain = rollout.sample(model, ids, mask, NEW, temperature=0)
        return compiled.sequences, plain.sequences

    compiled, plain = both()
    assert torch.equal(compiled, plain)
    dtype, low, pairs, _ = rollout._copies[model]
    assert dtype == torch.bfloat16 and pairs
    with torch.no_grad():
        for m in model.modules():
            if type(m) is torch.nn.Linear:
                m.weight.mul_(-1.5)  # a different model: different greedy tokens
    changed, plain_changed = both()
    assert rollout._copies[model][1] is low  # the same copy (a compiled graph keeps its addresses)
    assert all(torch.equal(c.weight, m.weight.to(torch.bfloat16)) for c, m in pairs)
    assert not torch.equal(plain_changed, plain) and torch.equal(changed, plain_changed)


def test_decode_copy_and_its_compiled_step_go_with_the_master():
    """The copy and its compiled step are held for the master only: gone once the master is."""
    import gc
    import weakref

    model = make_arch_model("qwen2")
    low, step = rollout.sampling_model(model, compile=True)
    assert low is not model and step is not low and rollout.sampling_model(model, compile=True) == (low, step)
    copy_ref, step_ref = weakref.ref(low), weakref.ref(step)
    del model, low, step
    gc.collect()
    assert copy_ref() is None and step_ref() is None


# ----------------------------------------------------------------------------- the distribution

class FixedLogits(torch.nn.Module):
    """A stand-in LM whose next-token logits are always `logits` (V,), with the forward interface
    rollout.sample uses."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("fixed", logits)

    def forward(self, input_ids, attention_mask, position_ids, cache=None, use_cache=True, logits_to_keep=0):
        B = input_ids.size(0)
        return SimpleNamespace(logits=self.fixed.expand(B, 1, -1), cache=cache)


LOGITS = torch.tensor([2.0, 1.1, 0.4, -0.3, 1.6, -1.2, 0.8, 0.1, -2.0, 0.55])
N = 40_000  # rows, one token each


def empirical(temperature, top_k=0, top_p=1.0, seed=0):
    model = FixedLogits(LOGITS.to(torch.bfloat16))  # bf16 model logits: sampling must still be float32
    ids = torch.full((N, 1), 5)
    r = rollout.sample(model, ids, torch.ones_like(ids), 1, temperature=temperature, top_k=top_k, top_p=top_p,
                       generator=torch.Generator().manual_seed(seed))
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
    # greedy on bf16 logits as they come: the float64 argmax, ties (bf16 has many) to the first index
    g = torch.Generator().manual_seed(0)
    coarse = (torch.randn(64, 1000, generator=g) * 2).round().to(torch.bfloat16)  # integers: ties in every row
    assert torch.equal(rollout.next_token(coarse, temperature=0), coarse.double().argmax(-1))
    out = rollout.filter_logits(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), top_k=2)
    assert torch.isinf(out[0, [0, 2]]).all() and torch.equal(out[0, [1, 3]], torch.tensor([3.0, 2.0]))
