"""infra/fast_decode.py: the fixed-shape decode step (static cache, eager or compiled) gives the
plain loop's tokens; the decode copy, packed GQA attention and the prompt buckets, each checked
against an independent reference."""
import math
from types import SimpleNamespace

import pytest
import torch

import rollout
from helpers import make_arch_model
from infra import fast_decode
from helpers import FIELDS, NEW, check_masks, first_hit, hf_greedy, pick_eos, ragged_prompts
from test_rollout import check_sampler_matches_forward, check_shared_prefill


def static(model):
    """The fixed-shape step, eager: a static cache and a full-length mask, no compilation."""
    return fast_decode.static_step(model, compile=False)


# ----------------------------------------------------------------------------- the static cache

def test_static_step_matches_generate_without_eos(arch_model):
    ids, mask = ragged_prompts()
    ref = hf_greedy(arch_model, ids, mask, eos=None)
    r = rollout.sample(arch_model, ids, mask, NEW, temperature=0, step=static(arch_model))
    assert torch.equal(r.sequences, ref)
    assert r.truncated.all() and r.completion_mask[:, ids.size(1):].eq(1).all()


@pytest.mark.parametrize("check_every", [None, 3], ids=["static", "static-check-3"])
def test_static_step_matches_generate_with_eos(arch_model, check_every):
    """check_every: asking whether all rows have finished only every k steps runs extra steps
    after the last EOS; they must be cut off, leaving HF's sequences exactly."""
    ids, mask = ragged_prompts()
    free = rollout.sample(arch_model, ids, mask, NEW, temperature=0).sequences[:, ids.size(1):]
    eos = pick_eos(free)
    pad = 127 if 127 not in eos else 126  # pad != eos here
    ref = hf_greedy(arch_model, ids, mask, eos=eos, pad=pad)
    r = rollout.sample(arch_model, ids, mask, NEW, temperature=0, eos_token_id=eos,
                       pad_token_id=pad, step=static(arch_model), check_every=check_every)
    assert torch.equal(r.sequences, ref)  # also the same length: both stop when every row is done
    check_masks(r, mask, eos)
    steps = first_hit(r.sequences[:, ids.size(1):], eos)
    for i, step in enumerate(steps):  # after EOS: pad only
        assert r.sequences[i, ids.size(1) + step + 1:].eq(pad).all()


def test_static_step_no_padding_and_batch_of_one(qwen2_model):
    ids, mask = ragged_prompts(batch=3, pads=(0, 0, 0))
    r = rollout.sample(qwen2_model, ids, mask, NEW, temperature=0, step=static(qwen2_model))
    assert torch.equal(r.sequences, hf_greedy(qwen2_model, ids, mask, eos=None))
    one = rollout.sample(qwen2_model, ids[:1], mask[:1], NEW, temperature=0,
                         step=static(qwen2_model))
    assert torch.equal(one.sequences, r.sequences[:1])
    assert one.sequences.shape == (1, ids.size(1) + NEW) and one.truncated.tolist() == [True]


def test_static_step_seed_reproduces_rollout_and_the_plain_paths_draws(qwen2_model):
    ids, mask = ragged_prompts()

    def run(seed, step=static(qwen2_model), **kw):
        return rollout.sample(qwen2_model, ids, mask, NEW, temperature=1.0, top_p=0.9, top_k=50,
                              eos_token_id=[3, 4], generator=torch.Generator().manual_seed(seed),
                              step=step, **kw)
    a, b, c = run(0), run(0), run(1)
    for field in FIELDS:
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.sequences, c.sequences)
    # same draws on both paths, and the logits agree well enough to give the same tokens
    assert torch.equal(a.sequences, run(0, step=rollout.plain_step(qwen2_model)).sequences)
    # checking for the end every 5 steps draws for extra steps after the last EOS, never before it
    lagged = run(0, check_every=5)
    for field in FIELDS:
        assert torch.equal(getattr(a, field), getattr(lagged, field))


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_static_step_shared_prefill_equals_repeated_prompts(arch_model, temperature):
    """Each prompt prefilled once into the static cache, copied to its n rows: token for token the
    rollouts of the prompts repeated n-fold (tests/test_rollout.py checks the plain step)."""
    check_shared_prefill(arch_model, lambda: static(arch_model), temperature)


@pytest.mark.parametrize("temperature, check_every", [(0.0, 4), (1.0, None)])
def test_static_step_pooled_states_and_logprobs_equal_the_full_forward(arch_model, temperature,
                                                                       check_every):
    check_sampler_matches_forward(arch_model, lambda: static(arch_model), temperature, check_every)


# ----------------------------------------------------------------------------- the compiled step

@pytest.mark.slow
def test_compiled_step_shares_the_prefill_and_keeps_pooled_states_and_logprobs():
    """The compiled step (a bucket-padded prefill, CUDA-graph-ready copies of the cache): the
    repeated prompts' tokens, and the full forward's pooled states and log-probs. 12 rows
    throughout: one decode graph compiles."""
    model, graphs = make_arch_model("qwen2"), fast_decode.compilations()  # its own compiled step
    check_shared_prefill(model, lambda: fast_decode.static_step(model), 1.0, n=3)
    check_sampler_matches_forward(model, lambda: fast_decode.static_step(model), 0.0, 4, n=3)
    assert fast_decode.compilations() - graphs == 1


@pytest.mark.slow
def test_compiled_path_matches_generate_and_plain_path(arch_model):
    """static_step(model) (static cache, torch.compile): HF's greedy tokens, with EOS and ragged
    padding, and the same sampled tokens as the plain path for the same seed. The cache is padded
    to a multiple of PROMPT_BUCKET inside the step; the rollout comes back at the plain width."""
    model = arch_model  # each architecture, a fresh model: its compiled step is its own
    ids, mask = ragged_prompts()
    free = rollout.sample(model, ids, mask, NEW, temperature=0).sequences[:, ids.size(1):]
    eos = pick_eos(free)
    r = rollout.sample(model, ids, mask, NEW, temperature=0, eos_token_id=eos,
                       step=fast_decode.static_step(model))
    assert torch.equal(r.sequences, hf_greedy(model, ids, mask, eos=eos))
    check_masks(r, mask, eos)
    assert all("forward" not in vars(m) for m in model.modules())  # the model is left as it was

    def run(step=None):
        return rollout.sample(model, ids, mask, NEW, temperature=1.0, top_p=0.9, step=step,
                              generator=torch.Generator().manual_seed(3))
    compiled, plain = run(fast_decode.static_step(model)), run()
    for field in FIELDS:  # the same width too: the bucket's padding does not come back
        assert torch.equal(getattr(compiled, field), getattr(plain, field))


@pytest.mark.slow
def test_compiled_step_pads_to_a_bucket_and_compiles_once_per_bucket():
    """Full lengths (prompt + max_new_tokens) in one PROMPT_BUCKET share the compiled decode graph:
    other prompt widths in the same bucket compile nothing more, and give HF's tokens, unpadded."""
    model = make_arch_model("qwen2")  # its own compiled step
    bucket = fast_decode.PROMPT_BUCKET
    ids, mask = ragged_prompts(length=7)
    step = fast_decode.static_step(model)
    P = ids.size(1)
    full = torch.cat([mask, torch.zeros(len(ids), NEW, dtype=mask.dtype)], 1)  # sample's buffer
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    _, _, cache = step(ids, full, positions, None, P)  # the prefill makes the cache
    slots = cache.get_max_length()
    assert slots % bucket == 0 and P + NEW <= slots < P + NEW + bucket  # the next multiple
    assert static(model)(ids, full, positions, None, P)[2].get_max_length() == P + NEW

    first = rollout.sample(model, ids, mask, NEW, temperature=0,
                           step=fast_decode.static_step(model))
    assert torch.equal(first.sequences, hf_greedy(model, ids, mask, eos=None))
    graphs = fast_decode.compilations()
    for length in (5, 11):  # 15 and 21 tokens in all: the same bucket of 64 as 17
        assert (length + NEW - 1) // bucket == (P + NEW - 1) // bucket
        other, other_mask = ragged_prompts(length=length, pads=(0, 2, 3, 1))
        r = rollout.sample(model, other, other_mask, NEW, temperature=0,
                           step=fast_decode.static_step(model))
        assert torch.equal(r.sequences, hf_greedy(model, other, other_mask, eos=None))
        assert r.sequences.shape == (len(other), length + NEW)
    assert fast_decode.compilations() == graphs


@pytest.mark.slow
def test_compiled_path_under_autocast_samples_from_a_fresh_copy():
    """The compiled step under autocast samples from the low-precision copy, refreshed at every
    rollout: after the master changes, the same step's tokens are the plain path's tokens of the
    changed master. The step is made outside autocast, as train.py and evaluate.py make it: the
    copy still takes the autocast dtype of the rollout."""
    model = make_arch_model("qwen2")  # its own copy and compiled step; modified below
    ids, mask = ragged_prompts()
    step = fast_decode.static_step(model)  # made once, outside autocast

    def both():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            compiled = rollout.sample(model, ids, mask, NEW, temperature=0, step=step)
            plain = rollout.sample(model, ids, mask, NEW, temperature=0)
        return compiled.sequences, plain.sequences

    compiled, plain = both()
    assert torch.equal(compiled, plain)
    dtype, low, pairs, _ = fast_decode._copies[model]
    assert dtype == torch.bfloat16 and pairs
    with torch.no_grad():
        for m in model.modules():
            if type(m) is torch.nn.Linear:
                m.weight.mul_(-1.5)  # a different model: different greedy tokens
    changed, plain_changed = both()
    assert fast_decode._copies[model][1] is low  # the same copy (a compiled graph keeps addresses)
    assert all(torch.equal(c.weight, m.weight.to(torch.bfloat16)) for c, m in pairs)
    assert not torch.equal(plain_changed, plain) and torch.equal(changed, plain_changed)


@pytest.mark.slow
def test_decode_copy_and_its_compiled_step_go_with_the_master():
    """The copy and its compiled step are held for the master only: gone once the master is."""
    import gc
    import weakref

    model = make_arch_model("qwen2")
    low, step = fast_decode.sampling_model(model, compile=True)
    assert low is not model and step is not low
    assert fast_decode.sampling_model(model, compile=True) == (low, step)
    copy_ref, step_ref = weakref.ref(low), weakref.ref(step)
    del model, low, step
    gc.collect()
    assert copy_ref() is None and step_ref() is None


def test_sampling_model_of_the_eager_path_is_the_model_itself():
    model = make_arch_model("qwen2")  # never compiled anywhere
    assert fast_decode.sampling_model(model, compile=False) == (model, model)
    assert model not in fast_decode._copies  # nothing made, nothing held


# ----------------------------------------------------------------------------- the decode copy

def test_decode_copy_computes_what_autocast_computes(arch_model):
    """Under autocast, the copy with bf16 Linear weights gives bit-identical logits to the fp32
    master (autocast rounds the master's weights to the same bf16 values); everything else is
    shared."""
    model = arch_model
    low, pairs = fast_decode.decode_copy(model, torch.bfloat16)
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
        assert torch.equal(low(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
    same, no_pairs = fast_decode.decode_copy(model)  # no dtype: nothing copied at all
    assert not no_pairs and all(p is q for p, q in zip(model.parameters(), same.parameters()))
    assert model.config._attn_implementation == "sdpa"  # the master's attention is left alone


@pytest.mark.parametrize("groups", [1, 3])
def test_packed_gqa_attention_matches_float64_attention(groups):
    """One query token per row against a padded cache, on the key/value heads: the same as
    expanding the cache to every query head, softmax(q k^T / sqrt(D) + mask) v, computed by hand
    in float64."""
    g = torch.Generator().manual_seed(0)
    B, KV, L, D = 3, 2, 9, 8
    H = KV * groups
    q, k, v = (torch.randn(B, n, t, D, generator=g) for n, t in ((H, 1), (KV, L), (KV, L)))
    visible = torch.ones(B, 1, 1, L, dtype=torch.bool)
    visible[0, ..., :4] = False  # left padding
    visible[1, ..., 7:] = False  # cache slots not written yet (static cache)
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True)
    out, _ = fast_decode.packed_gqa_attention(module, q, k, v, visible, scaling=D ** -0.5)
    kx, vx = (x.double().repeat_interleave(groups, dim=1) for x in (k, v))  # (B, H, L, D)
    scores = (q.double() @ kx.transpose(-1, -2)) / D ** 0.5  # (B, H, 1, L)
    ref = scores.masked_fill(~visible, -math.inf).softmax(-1) @ vx  # (B, H, 1, D)
    assert out.shape == (B, 1, H, D)
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
