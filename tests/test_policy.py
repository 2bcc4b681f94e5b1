"""policy.py against independent references: float64 forwards, hand-written pooling, HF save and
load."""
import copy
import json

import pytest
import torch

import policy
from helpers import SHARED_DATA, VOCAB

TEXTS = ["A man is playing a guitar.", "a",
         "Why is the sky blue? Because air scatters short waves."]


def ragged_batch(B=3, P=9, seed=0):
    """Random ids, left-padded to different lengths, and a completion mask over the last 4
    tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    for i in range(B):
        mask[i, : 2 * i] = 0  # row i has 2*i pad tokens on the left
    ids[mask == 0] = 0
    completion = torch.zeros_like(mask)
    completion[:, -4:] = 1
    return ids, mask, completion


def reference_logprobs(model, ids, mask, temperature=1.0):
    """log_softmax of a plain full forward, in float64: (B, T), entry t log p(ids[t] | ids[<t])."""
    m64 = copy.deepcopy(model).double()
    logits = m64(input_ids=ids, attention_mask=mask,
                 position_ids=policy.position_ids_from(mask)).logits
    logp = (logits[:, :-1] / temperature).log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros(ids.shape[0], 1, dtype=torch.float64), logp], dim=1)


# ------------------------------------------------------------------------- tiny model and loading

def test_tiny_is_deterministic_per_seed_and_small(tiny):
    model, tokenizer = tiny
    again, _ = policy.load("tiny", seed=0)
    other, _ = policy.load("tiny", seed=1)
    sd, sd2, sd3 = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not all(torch.equal(sd[k], sd3[k]) for k in sd)
    n = sum(p.numel() for p in model.parameters())
    assert 1e5 < n < 1e6, n
    assert not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_tiny_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    policy.load("tiny", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_round_trips_through_save_and_from_pretrained(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # ids must survive the round trip on text the tokenizer never saw (unicode, digits, spacing)
    texts = TEXTS + ["Ünïcödé — 漢字 123,456.7  tabs\tand\nnewlines <think>x</think>"]
    sts = SHARED_DATA / "stsbenchmark" / "dev.jsonl"  # real sentences, where the data is present
    if sts.exists():
        texts += [json.loads(line)["sentence1"] for line in sts.read_text().splitlines()[:200]]
    for t in texts:
        assert loaded_tok(t)["input_ids"] == tokenizer(t)["input_ids"], t
        assert loaded_tok.decode(tokenizer(t)["input_ids"]) == t
    ids, mask, _ = policy.build_prompts(tokenizer, TEXTS)
    ids2, mask2, _ = policy.build_prompts(loaded_tok, TEXTS)
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)
    # and policy.load of the folder is the same model, left-padded
    m3, t3 = policy.load(str(tmp_path))
    assert t3.padding_side == "left"
    with torch.no_grad():
        assert torch.equal(m3(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


def test_load_errors_name_the_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        policy.load(str(tmp_path / "no-such-folder"))
    with pytest.raises(FileNotFoundError, match="nobody/no-such-model"):
        policy.load("nobody/no-such-model")  # offline in tests: must fail at once, with the name
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        policy.load(str(tmp_path / "empty"))


def test_load_sets_pad_token_when_missing(tiny, tmp_path):
    model, tokenizer = tiny
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, loaded = policy.load(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token


# ----------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("chat", [True, False])
def test_build_prompts_left_pads_and_marks_the_text(tiny, chat):
    _, tokenizer = tiny
    tok = copy.deepcopy(tokenizer)
    if not chat:
        tok.chat_template = None  # the plain fallback format
    ids, mask, start = policy.build_prompts(tok, TEXTS)
    assert ids.shape == mask.shape and start.shape == (len(TEXTS),)
    for i, text in enumerate(TEXTS):
        n_pad = int((mask[i] == 0).sum())
        assert mask[i, :n_pad].sum() == 0 and mask[i, n_pad:].all()  # all padding on the left
        assert (ids[i, :n_pad] == tok.pad_token_id).all()
        pooled = tok.decode(ids[i, start[i]:])
        # pooling begins at the text's first token (byte-level BPE may glue the space before it on)
        assert pooled.startswith(text) or (not chat and pooled.startswith(" " + text))
        assert policy.DEFAULT_SYSTEM_PROMPT not in pooled  # ... after the system prompt
        head = tok.decode(ids[i, n_pad:start[i]])
        assert policy.DEFAULT_SYSTEM_PROMPT in head  # the system prompt ends before the pool, and
        # the pool starts right after the user header
        assert head.endswith("<|im_start|>user\n") if chat else head.rstrip(" ").endswith("Text:")


def test_build_prompts_truncates_the_text_to_fit(tiny):
    _, tokenizer = tiny
    ids, mask, start, cut = policy.build_prompts(tokenizer, ["word " * 300, "short"],
                                                 max_length=160, return_truncated=True)
    assert ids.shape[1] <= 160 and cut.tolist() == [True, False]
    assert tokenizer.decode(ids[0, start[0]:]).startswith("word word")
    assert tokenizer.decode(ids[0]).rstrip().endswith("assistant")  # the template's end survives
    with pytest.raises(ValueError, match="too short"):
        policy.build_prompts(tokenizer, ["x"], max_length=10)


# ----------------------------------------------------------------------------- pooling

def embed(model, ids, mask, pool):
    """The embedding of given sequences: the mean of the last hidden states over the pool."""
    with torch.no_grad():
        return policy.mean_pool(policy.hidden_states(model, ids, mask), pool)


def test_mean_pool_of_hidden_states_equals_float64_hand_pooling(arch_model):
    ids, mask, _ = ragged_batch()
    pool_start = torch.tensor([2, 4, 6])  # inside each row's real tokens
    pool = policy.pool_mask_from(mask, pool_start)
    got = embed(arch_model, ids, mask, pool)
    assert got.dtype == torch.float32 and got.shape == (3, arch_model.config.hidden_size)
    m64 = copy.deepcopy(arch_model).double()
    with torch.no_grad():
        hs = m64(input_ids=ids, attention_mask=mask, position_ids=policy.position_ids_from(mask),
                 output_hidden_states=True).hidden_states[-1]  # (B, T, H) float64
    for i in range(3):
        rows = [hs[i, t] for t in range(ids.shape[1]) if mask[i, t] and t >= pool_start[i]]
        mean = sum(rows) / len(rows)
        assert torch.allclose(got[i].double(), mean / mean.norm(), atol=1e-5)


def test_padding_and_system_prompt_never_enter_the_pool(tiny):
    model, tokenizer = tiny
    ids, mask, start = policy.build_prompts(tokenizer, TEXTS)
    pool = policy.pool_mask_from(mask, start)
    assert not (pool & (mask == 0)).any()
    # poison every position outside the pool: the pooled mean must not change
    hidden = policy.hidden_states(model, ids, mask).detach()
    poisoned = hidden.clone()
    poisoned[~pool] = float("nan")
    assert torch.equal(policy.mean_pool(poisoned, pool), policy.mean_pool(hidden, pool))
    # a text's embedding does not depend on how much padding its batch needs
    alone = []
    for t in TEXTS:
        one_ids, one_mask, one_start = policy.build_prompts(tokenizer, [t])
        alone.append(embed(model, one_ids, one_mask, policy.pool_mask_from(one_mask, one_start)))
    batched = embed(model, ids, mask, pool)
    assert torch.allclose(torch.cat(alone), batched, atol=1e-5)


# ----------------------------------------------------------------------------- token_logprobs

@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_token_logprobs_equal_float64_log_softmax(arch_model, temperature):
    ids, mask, completion = ragged_batch()
    got = policy.token_logprobs(arch_model, ids, mask, completion, temperature=temperature)
    ref = reference_logprobs(arch_model, ids, mask, temperature)
    assert got.dtype == torch.float32 and got.shape == ids.shape
    on = completion.bool()
    assert torch.allclose(got[on].double(), ref[on], atol=1e-5)
    assert (got[~on] == 0).all()  # unmasked positions are exactly 0
    full = torch.ones_like(completion)  # every position (the first has no prefix: 0)
    got_full = policy.token_logprobs(arch_model, ids, mask, full)
    real = mask.bool().clone()
    real[:, 0] = False
    real &= torch.roll(mask.bool(), 1, dims=1)  # a token after padding has no real prefix
    ref_full = reference_logprobs(arch_model, ids, mask)
    assert torch.allclose(got_full[real].double(), ref_full[real], atol=1e-5)


def post_processing_model(arch):
    """A random tiny causal LM whose forward changes the output layer's logits after it."""
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = {"gemma2": lambda: Gemma2Config(final_logit_softcapping=0.5, head_dim=8, **common),
           "cohere": lambda: CohereConfig(logit_scale=0.25, **common),
           "granite": lambda: GraniteConfig(logits_scaling=8.0, **common)}[arch]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # logits large enough that a missing cap or scale changes the log-probs
        model.get_output_embeddings().weight.mul_(20.0)
    return model


@pytest.mark.parametrize("arch", ["gemma2", "cohere", "granite"])
def test_token_logprobs_follow_each_architectures_logit_post_processing(arch):
    model = post_processing_model(arch)
    ids, mask, completion = ragged_batch()
    got = policy.token_logprobs(model, ids, mask, completion, temperature=0.7)
    ref = torch.zeros(ids.shape, dtype=torch.float64)
    for i in range(len(ids)):  # row by row, no padding (Gemma 2's float64 eager path NaNs on pads)
        real = mask[i].bool()
        ref[i, real] = reference_logprobs(model, ids[i:i + 1, real], mask[i:i + 1, real],
                                          temperature=0.7)[0]
    on = completion.bool()
    assert torch.allclose(got[on].double(), ref[on], atol=1e-5)
    # and the cap / scale matters here: the output layer alone would be far off
    h = policy.hidden_states(model, ids, mask)
    raw = (model.get_output_embeddings()(h)[:, :-1].double() / 0.7).log_softmax(-1)
    raw = raw.gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert (raw[on[:, 1:]] - ref[:, 1:][on[:, 1:]]).abs().max() > 0.1


def test_logit_check_ignores_padding_after_an_early_eos(arch_model):
    """Row 0 ended long before the others: its last columns are masked padding. The once-per-model
    logit check must not trip on them, and the log-probs stay exact."""
    ids, mask, _ = ragged_batch(P=30)
    mask[0, 10:] = 0  # row 0 stopped after 10 tokens; 20 masked columns follow
    completion = torch.zeros_like(mask)
    completion[:, 5:] = mask[:, 5:]
    got = policy.token_logprobs(arch_model, ids, mask, completion)
    on = completion.bool()
    assert torch.isfinite(got).all()
    ref = reference_logprobs(arch_model, ids, mask)
    assert torch.allclose(got[on].double(), ref[on], atol=1e-5)


def test_token_logprobs_refuse_a_model_whose_logits_they_cannot_reproduce():
    from helpers import make_arch_model

    model = make_arch_model("qwen2")
    model.config.logits_scaling = 3.0  # output_logits would divide; this model's forward does not
    ids, mask, completion = ragged_batch()
    with pytest.raises(NotImplementedError, match="post-processes its logits"):
        policy.token_logprobs(model, ids, mask, completion)


def test_chunked_logprobs_and_gradients_equal_unchunked(tiny):
    model, tokenizer = tiny
    ids, mask, _ = policy.build_prompts(tokenizer, TEXTS)
    completion = torch.zeros_like(mask)
    completion[:, -7:] = 1
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(0))

    def run(chunk):
        model.zero_grad()
        with torch.enable_grad():
            lp = policy.token_logprobs(model, ids, mask, completion, chunk_size=chunk)
            (lp * weights).sum().backward()
        return lp.detach(), [p.grad.clone() for p in model.parameters()]

    lp_small, g_small = run(2)  # many chunks, checkpointed
    lp_big, g_big = run(10**6)  # one chunk
    assert torch.allclose(lp_small, lp_big, atol=1e-6)
    # float32 sum order
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(g_small, g_big))
    assert any(g.abs().sum() > 0 for g in g_small)
    model.zero_grad(set_to_none=True)


def test_stop_token_ids_prefer_generation_config(tiny):
    model, tokenizer = tiny
    m = copy.deepcopy(model)
    assert policy.stop_token_ids(m, tokenizer) == tokenizer.eos_token_id
    m.generation_config.eos_token_id = [2, 0]  # chat models list several; id 0 is a valid one
    assert policy.stop_token_ids(m, tokenizer) == [2, 0]
    m.generation_config.eos_token_id = 0
    assert policy.stop_token_ids(m, tokenizer) == 0
    m.generation_config.eos_token_id = None
    assert policy.stop_token_ids(m, tokenizer) == tokenizer.eos_token_id


@pytest.mark.slow  # ~4.5 s: four encodes of tiny-lm, new shapes each
def test_sampling_in_chunks_of_rows_changes_nothing():
    """sample_rows (bounding the KV cache) gives the rollouts and embeddings of sampling all rows
    at once: rows whose completions end at different steps are right-padded to the longest."""
    model, tokenizer = policy.load("tiny-lm")  # greedy rationales ending (EOS) at different steps
    texts = TEXTS + ["Another sentence, longer than the others, to pad the batch.", "b"]
    whole = policy.encode(model, tokenizer, texts, max_new_tokens=12)
    lengths = whole.rollout.completion_mask.sum(-1)
    assert lengths.min() < lengths.max()
    assert whole.rollout.truncated.any() and not whole.rollout.truncated.all()
    for rows in (1, 2, 4):
        part = policy.encode(model, tokenizer, texts, max_new_tokens=12, sample_rows=rows)
        for field in ("sequences", "attention_mask", "completion_mask", "truncated"):
            assert torch.equal(getattr(part.rollout, field), getattr(whole.rollout, field)), \
                (rows, field)
        torch.testing.assert_close(part.embeddings, whole.embeddings, rtol=0, atol=1e-6)


def test_encode_without_new_tokens_pools_the_prompt_alone(tiny):
    """max_new_tokens=0, the no-rationale baseline: the rollout is the prompts themselves (nothing
    generated, none truncated) and the embedding pools the text of the prompt."""
    model, tokenizer = tiny
    enc = policy.encode(model, tokenizer, TEXTS, max_new_tokens=0)
    ids, mask, start = policy.build_prompts(tokenizer, TEXTS)
    pool = policy.pool_mask_from(mask, start)
    assert torch.equal(enc.rollout.sequences, ids)
    assert torch.equal(enc.rollout.attention_mask, mask)
    assert enc.rollout.completion_mask.eq(0).all() and not enc.rollout.truncated.any()
    assert torch.equal(enc.pool_mask, pool) and not enc.prompts_cut.any()
    torch.testing.assert_close(enc.embeddings, embed(model, ids, mask, pool), rtol=0, atol=1e-6)


def test_encode_samples_with_the_step_it_is_given(tiny):
    """step= is rollout.sample's decode step (a copy of the weights may sample, as fsdp's does):
    every step of the rollout goes through it; the rollouts and embeddings are the default's."""
    import rollout

    model, tokenizer = tiny
    sampler, calls = copy.deepcopy(model), []
    plain = rollout.plain_step(sampler)

    def step(*args):
        calls.append(args[3] is None)  # True at the prefill
        return plain(*args)
    default = policy.encode(model, tokenizer, TEXTS, max_new_tokens=5)
    given = policy.encode(model, tokenizer, TEXTS, max_new_tokens=5, step=step,
                          device=torch.device("cpu"))
    # at most 5 decode steps, one of them (or one more) feeding the last token back for its state
    assert calls[0] and not any(calls[1:]) and 1 < len(calls) <= 6
    for field in ("sequences", "attention_mask", "completion_mask", "truncated"):
        assert torch.equal(getattr(given.rollout, field), getattr(default.rollout, field)), field
    assert torch.equal(given.embeddings, default.embeddings)


@pytest.mark.parametrize("new, normalize", [(6, True), (6, False), (0, True)])
def test_sampler_embeddings_and_old_logprobs_equal_the_full_forward(tiny, new, normalize):
    """pool_from="sampler" (each prompt prefilled once, the pooled sum and log-probs kept while
    sampling) against "forward" (prompts repeated n-fold, a second forward over the rollouts): the
    same rollouts token for token, and the same embeddings and old log-probs in float32. Texts of
    different lengths (left padding), rows stopping at EOS and rows cut at max_new_tokens,
    sampled in chunks of 2 prompts (sample_rows 6 = 2 groups of 3)."""
    from helpers import FIELDS, pick_eos

    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]  # its EOS is changed below
    texts = TEXTS + ["Tea.", "Two dogs run on the beach at dawn, chasing a red ball."]
    kw = dict(n=3, max_new_tokens=new, temperature=1.0, top_p=0.9, normalize=normalize,
              logprob_temperature=0.8, sample_rows=6)

    def run(pool_from):
        return policy.encode(model, tokenizer, texts, generator=torch.Generator().manual_seed(0),
                             pool_from=pool_from, **kw)
    if new:  # EOS ids that the rollouts emit: some rows stop early, others run to the end
        P = policy.build_prompts(tokenizer, texts)[0].size(1)
        model.generation_config.eos_token_id = pick_eos(run("forward").rollout.sequences[:, P:])
    ref, ours = run("forward"), run("sampler")
    for field in FIELDS:
        assert torch.equal(getattr(ours.rollout, field), getattr(ref.rollout, field)), field
    if new:
        assert ours.rollout.truncated.any() and not ours.rollout.truncated.all()
    assert torch.equal(ours.pool_mask, ref.pool_mask)
    torch.testing.assert_close(ours.embeddings, ref.embeddings, rtol=1e-5, atol=1e-6)
    norms = ours.embeddings.norm(dim=-1)
    assert (norms - 1).abs().max() < 1e-5 if normalize else (norms - 1).abs().max() > 1e-3
    torch.testing.assert_close(ours.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)


def test_rationale_stats_count_tokens_before_eos_and_blank_texts_as_empty():
    """One definition for training's metrics and evaluation's summary, checked on rollouts built by
    hand: tokens before the stop token, and empty = nothing but whitespace once decoded."""
    import rollout
    from infra import diagnostics

    _, tok = policy.load("tiny-lm")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    word = tok("hello there", add_special_tokens=False)["input_ids"]
    blank = tok(" \n ", add_special_tokens=False)["input_ids"]
    T, prompt = 8, [5, 6]
    assert 0 < len(word) < T and 0 < len(blank) < T
    # (completion, truncated)
    rows = [(word + [eos], False), ([eos], False), (blank + [eos], False), ((word * T)[:T], True)]
    seqs = torch.full((len(rows), 2 + T), pad)
    completion = torch.zeros_like(seqs)
    for i, (c, _) in enumerate(rows):
        seqs[i, :2], seqs[i, 2:2 + len(c)] = torch.tensor(prompt), torch.tensor(c)
        completion[i, 2:2 + len(c)] = 1
    attention = completion.clone()
    attention[:, :2] = 1
    ro = rollout.Rollout(seqs, attention, completion, torch.tensor([t for _, t in rows]))
    texts, tokens, empty = diagnostics.rationale_stats(tok, ro)
    assert tokens.tolist() == [len(word), 0, len(blank), T]
    assert empty.tolist() == [False, True, True, False]
    assert texts[0] == "hello there" and texts[1] == "" and not texts[2].strip()
