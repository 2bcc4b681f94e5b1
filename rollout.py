"""Batched sampling from a causal LM with a KV cache: the rollouts of GRACE.

One call of `sample` takes a batch of left-padded prompts and returns the prompts with their
completions. The model's forward (and its KV cache) comes from transformers; the decode loop, the
masks, the positions and the sampling are written out here so every step can be read:

    prefill:  run each distinct prompt once, fill the cache, keep the last position's logits;
              the prompt's n rows go on from copies of that cache
    decode:   pick a token per row from those logits, feed it back as a length-1 input, repeat

A row that emits EOS is finished: from then on it emits `pad_token_id` and its new positions are
masked out (attention_mask 0, completion_mask 0). The loop stops once every row has finished.
On the way it keeps what the embedding and the policy gradient need, so nothing runs twice: a
running sum of the last hidden states over the pooled positions (`pool_start`; one step more feeds
the last token back) and the log-probs of the sampled tokens (`logprob_temperature`).

The forward of one step is handed in (`step`). By default it is the model's own forward on a
DynamicCache that grows by one position a step (`plain_step`); infra/fast_decode.py hands in a
compiled forward on a preallocated cache instead. The loop below is the one that runs either way.
The caller should put the model in eval mode (dropout off); `sample` leaves train/eval alone.
"""
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    sequences: torch.Tensor  # (B, P+T) prompt, then completion; pad_token_id after a row's EOS
    attention_mask: torch.Tensor  # (B, P+T) 1 on real prompt tokens and completion tokens to EOS
    completion_mask: torch.Tensor  # (B, P+T) 1 on generated tokens up to and including EOS
    truncated: torch.Tensor  # (B,) bool: reached max_new_tokens without EOS
    pooled: torch.Tensor | None = None  # (B, H) float32 sum of last hidden states, pooled positions
    logprobs: torch.Tensor | None = None  # (B, P+T) float32 log-probs of generated tokens, else 0


# ----------------------------------------------------------------------------- token choice (pure)

def filter_logits(logits, top_k=0, top_p=1.0):
    """Set to -inf every logit outside the top-k / nucleus support. logits: (B, V) float32.

    top_k keeps the k largest logits (ties with the k-th are kept too, as in transformers).
    top_p keeps the smallest set of most likely tokens whose probability mass reaches p; the most
    likely token is always kept. Applied after top-k, on its renormalised distribution.
    """
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens, (B, V)
        drop = mass_before >= top_p  # the set had already reached p without this token
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def next_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row from last-position logits (B, V) -> (B,) long.

    Sampling is in float32, whatever the model's dtype: bf16 logits are too coarse for a softmax
    over a large vocabulary. temperature 0 is greedy (argmax, as generate(do_sample=False)), on the
    logits as they come: widening to float32 is exact and keeps their order; it would only cost.
    Otherwise torch.multinomial draws with `generator` (a torch.Generator on the logits' device), so
    a seed gives the same tokens again.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- the loop

def plain_step(model):
    """The default decode step: step(ids, mask, positions, cache, width) -> (logits (B, V) of the
    last position, hidden (B, W, H) last-layer states of the W input positions, cache).

    The model's forward with a KV cache. At the prefill cache is None and the model makes its own
    DynamicCache (returned as out.cache), which then grows by one position a step; the model sees
    the first `width` columns of the mask, the positions written so far. The prefill's mask has n
    rows per prompt (B*n, L): each prompt runs once; the cache comes back with n copies of it.
    hidden_states[-1]: the final norm's output (tied to last_hidden_state), no other layer's kept.
    """
    def step(input_ids, mask, position_ids, cache, width):
        n = len(mask) // len(input_ids)  # rows per prompt: more than 1 only at a shared prefill
        out = model(input_ids=input_ids, attention_mask=mask[::n, :width],
                    position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1,
                    output_hidden_states=-1)
        if n > 1:  # prompt i's keys and values -> rows i*n .. i*n+n-1
            out.cache.batch_repeat_interleave(n)
        return out.logits[:, -1], out.hidden_states[-1], out.cache
    return step


# no_grad, not inference_mode: the sequences feed a later training forward, and inference-mode
# tensors cannot be saved for backward (the embedding lookup saves its indices).
@torch.no_grad()
def sample(model, input_ids, attention_mask, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
           eos_token_id=None, pad_token_id=0, generator=None, *, n=1, step=None, check_every=None,
           pool_start=None, logprob_temperature=None):
    """Sample up to `max_new_tokens` tokens, n rows per left-padded prompt (B, P). -> Rollout of
    B*n rows, prompt-major (prompt i -> rows i*n .. i*n+n-1): the draws of B*n repeated prompts.

    eos_token_id: an int, a list of ints (chat models end turns with several), or None (never stop
    early). step: the forward of one decode step (default `plain_step(model)`; see fast_decode).
    check_every: decode steps between checks that every row has finished (each check is a host
    sync). None: 1 on CPU, where a sync costs nothing; 16 on GPU. Steps run after the last EOS are
    cut off: this call's result is the same, but the generator has drawn for them.
    pool_start (B,): also sum the last hidden states of attended positions from this column on
    (.pooled). logprob_temperature: also keep log softmax(logits / T) of each sampled token
    (.logprobs), unfiltered by top-k / top-p: what policy.token_logprobs scores.
    """
    B, P = input_ids.shape
    N, device = B * n, input_ids.device
    if n > 1:
        input_ids, attention_mask = (x.repeat_interleave(n, 0) for x in (input_ids, attention_mask))
    if max_new_tokens == 0:  # nothing to write: the prompts alone (the no-rationale baseline);
        no = torch.zeros_like(attention_mask)  # no forward, so nothing pooled (pooled None)
        return Rollout(input_ids, attention_mask, no, no[:, 0].bool(),  # (N,) none truncated
                       logprobs=None if logprob_temperature is None else no.float())
    step = step or plain_step(model)
    check_every = check_every or (1 if device.type == "cpu" else 16)
    eos = torch.tensor([] if eos_token_id is None else
                       [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                       dtype=torch.long, device=device)
    # Tokens and masks live in buffers of the final length L, written one column a step.
    L = P + max_new_tokens
    seqs = torch.full((N, L), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((N, L), dtype=attention_mask.dtype, device=device)
    seqs[:, :P], mask[:, :P] = input_ids, attention_mask
    alive = torch.zeros((N, L), dtype=torch.bool, device=device)  # generated and not after EOS
    logprobs = None if logprob_temperature is None else torch.zeros(N, L, device=device)

    # Positions count real tokens only, so left padding does not shift them (pad slots get 0 and
    # are masked anyway).
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (N, P)
    # prefill: each prompt once (rows 0, n, 2n, ...); its n rows draw from copies of its logits
    logits, hidden, cache = step(input_ids[::n], mask, position_ids[::n], None, P)  # (B, V)
    if not torch.isfinite(logits).all():  # diverged weights: say so here, not in multinomial
        raise FloatingPointError("the model's logits are not finite (NaN/inf): "
                                 "its weights have diverged")
    logits, pooled = logits.repeat_interleave(n, 0), None  # (N, V)
    if pool_start is not None:  # the prompt's states from pool_start on (where(): pads may be NaN)
        keep = mask[::n, :P].bool() & (torch.arange(P, device=device) >= pool_start[:, None])
        pooled = torch.where(keep[..., None], hidden.float(), 0.0).sum(1).repeat_interleave(n, 0)
    position = attention_mask.long().sum(-1, keepdim=True)  # (N, 1) next token's position

    finished = torch.zeros(N, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        token = next_token(logits, temperature, top_k, top_p, generator)  # (N,)
        token = token.masked_fill(finished, pad_token_id)
        seqs[:, P + t], alive[:, P + t] = token, ~finished
        mask[:, P + t] = (~finished).to(mask.dtype)  # EOS itself stays visible; what follows not
        if logprobs is not None:
            x = logits.float() / logprob_temperature  # (N, V)
            lp = x.gather(-1, token[:, None]).squeeze(-1) - x.logsumexp(-1)
            logprobs[:, P + t] = torch.where(finished, 0.0, lp)
        finished = finished | torch.isin(token, eos)
        # The host sync that lets the batch stop early, every check_every steps.
        if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and bool(finished.all())):
            break
        logits, hidden, cache = step(token[:, None], mask, position, cache, P + t + 1)  # (N, V)
        pooled = None if pooled is None else pooled + torch.where(
            alive[:, P + t, None], hidden[:, -1].float(), 0.0)  # the state of the token fed back
        position = position + 1
    if pooled is not None and bool(alive[:, P + t].any()):  # the last token, never fed back yet
        _, hidden, _ = step(token[:, None], mask, position, cache, P + t + 1)
        pooled = pooled + torch.where(alive[:, P + t, None], hidden[:, -1].float(), 0.0)

    # Generated length: up to the last step any row was still alive (its EOS), or max_new_tokens.
    T = int((torch.arange(1, max_new_tokens + 1, device=device) * alive[:, P:].any(0)).max())
    return Rollout(sequences=seqs[:, :P + T], attention_mask=mask[:, :P + T],
                   completion_mask=alive[:, :P + T].to(mask.dtype), truncated=~finished,
                   pooled=pooled, logprobs=None if logprobs is None else logprobs[:, :P + T])


def concat(rollouts, pad_token_id=0):
    """Rollouts of the same prompts' width, sampled in chunks of rows, as one: each is right-padded
    to the longest completion (pad tokens, masks and log-probs 0), then rows stacked in order."""
    width = max(r.sequences.size(1) for r in rollouts)

    def cat(name, value=None):  # value None: a field without a time axis (or None)
        parts = [getattr(r, name) for r in rollouts]
        if value is not None and parts[0] is not None:
            parts = [torch.nn.functional.pad(x, (0, width - x.size(1)), value=value) for x in parts]
        return None if parts[0] is None else torch.cat(parts)
    return Rollout(cat("sequences", pad_token_id), cat("attention_mask", 0),
                   cat("completion_mask", 0), cat("truncated"), cat("pooled"), cat("logprobs", 0))
