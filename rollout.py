"""Batched sampling from a causal LM with a KV cache: the rollouts of GRACE.

One call of `sample` takes a batch of left-padded prompts and returns the prompts with their
completions. The model's forward (and its KV cache) comes from transformers; the decode loop, the
masks, the positions and the sampling are written out here so every step can be read:

    prefill:  run the whole prompt once, fill the cache, keep only the last position's logits
    decode:   pick a token per row from those logits, feed it back as a length-1 input, repeat

A row that emits EOS is finished: from then on it emits `pad_token_id` and its new positions are
masked out (attention_mask 0, completion_mask 0). The loop stops once every row has finished.

Two ways through the same loop:
- plain (default): a DynamicCache that grows by one position a step; the mask grows with it.
- static_cache=True: a cache and a mask preallocated at their final length, so every decode step
  has the same shapes. That is what `compile=True` needs (torch.compile of the decode forward; on
  CUDA in "reduce-overhead" mode, i.e. CUDA graphs; on CPU the linear layers may also run through
  oneDNN, see `onednn_linears`). The plain path is the one to read first.

What a compiled GPU decode step should cost: one read of the weights (2 bytes/parameter in bf16),
the bandwidth floor bench/rollout.py measures against. Three things kept it far above that, each
removed (see `sampling_model`): autocast re-casting every fp32 master weight inside the graph at
every step, transformers expanding the KV cache per query head inside the graph, and a host sync
per step to ask whether every row has finished (on GPU the loop now asks every 16 steps).

The caller should put the model in eval mode (dropout off); `sample` leaves train/eval alone.
"""
from contextlib import contextmanager
import copy
from dataclasses import dataclass
import time
import types
import weakref

import torch
import torch.nn.functional as F
from transformers.cache_utils import StaticCache


@dataclass
class Rollout:
    sequences: torch.Tensor  # (B, P+T) prompt, then completion; pad_token_id after a row's EOS
    attention_mask: torch.Tensor  # (B, P+T) 1 on real prompt tokens and on completion tokens up to EOS
    completion_mask: torch.Tensor  # (B, P+T) 1 on generated tokens up to and including EOS
    truncated: torch.Tensor  # (B,) bool: reached max_new_tokens without EOS


def concat(rollouts, pad_token_id=0):
    """Rollouts of the same prompts' width, sampled in chunks of rows, as one: each is right-padded to
    the longest completion (pad tokens, masks 0), then rows are stacked in order."""
    width = max(r.sequences.size(1) for r in rollouts)
    pad = lambda x, value: torch.nn.functional.pad(x, (0, width - x.size(1)), value=value)  # noqa: E731
    return Rollout(sequences=torch.cat([pad(r.sequences, pad_token_id) for r in rollouts]),
                   attention_mask=torch.cat([pad(r.attention_mask, 0) for r in rollouts]),
                   completion_mask=torch.cat([pad(r.completion_mask, 0) for r in rollouts]),
                   truncated=torch.cat([r.truncated for r in rollouts]))


# ----------------------------------------------------------------------------- sampling (pure)

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

    Sampling is in float32, whatever the model's dtype: bf16 logits are too coarse for a softmax over
    a large vocabulary. temperature 0 is greedy (argmax, as generate(do_sample=False)), on the logits
    as they come: widening to float32 is exact and keeps their order, so it would only cost a pass.
    Otherwise torch.multinomial draws with `generator` (a torch.Generator on the logits' device), so
    a seed gives the same tokens again.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- the loop

# no_grad, not inference_mode: the sequences feed a later training forward, and inference-mode
# tensors cannot be saved for backward (the embedding lookup saves its indices).
@torch.no_grad()
def sample(model, input_ids, attention_mask, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
           eos_token_id=None, pad_token_id=0, generator=None, *, static_cache=False, compile=False,
           check_every=None):
    """Sample up to `max_new_tokens` tokens per row after left-padded prompts (B, P). -> Rollout.

    eos_token_id: an int, a list of ints (chat models end turns with several), or None (never stop
    early). static_cache: preallocated cache and mask (fixed shapes); compile: torch.compile the
    decode step (implies static_cache; on CPU also oneDNN linears where they are faster), run on
    the model's `decode_copy` (see `sampling_model`). Every path gives the same tokens for the same
    seed, up to float rounding (attention over the padded static cache, oneDNN's summation order),
    which can flip a near-tie between two tokens. The compiled step is specialised to its shapes:
    each new (batch, prompt length + max_new_tokens) compiles again, so pad prompts to a few fixed
    lengths before a long run on this path.
    check_every: decode steps between checks that every row has finished (each check is a host sync).
    None: 1 on CPU, where a sync costs nothing; 16 on GPU. Steps run after the last EOS are cut off:
    this call's result is the same, but the generator has drawn for them (later draws differ).
    """
    static_cache = static_cache or compile
    model, forward = sampling_model(model, compile)  # forward: the decode step, compiled or not
    check_every = check_every or (1 if input_ids.device.type == "cpu" else 16)
    B, P = input_ids.shape
    device = input_ids.device
    eos = torch.tensor([] if eos_token_id is None else
                       [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                       dtype=torch.long, device=device)
    # Tokens and masks live in buffers of the final length, written one column a step; the plain
    # path hands the model the mask's filled prefix, the static path the whole (fixed-shape) mask.
    L = P + max_new_tokens
    seqs = torch.full((B, L), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, L), dtype=attention_mask.dtype, device=device)
    seqs[:, :P], mask[:, :P] = input_ids, attention_mask
    alive = torch.zeros((B, L), dtype=torch.bool, device=device)  # generated and not after EOS

    # Plain: cache=None lets the model make its own DynamicCache (returned as out.cache), which
    # grows by one position a step. Static: allocated once at the final length.
    cache = StaticCache(config=model.config, max_cache_len=L) if static_cache else None
    # compile: on CPU the linears may run through oneDNN for the whole call (prefill and decode).
    with onednn_linears(model, enabled=compile and onednn_pays(model, B)):
        # Positions count real tokens only, so left padding does not shift them (pad slots get 0 and
        # are masked anyway). A static cache takes the full-length mask: zeros past the prompt.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
        out = model(input_ids=input_ids, attention_mask=mask if static_cache else attention_mask,
                    position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]  # (B, V)
        if not torch.isfinite(logits).all():  # diverged weights: say so here, not as a multinomial error later
            raise FloatingPointError("the model's logits are not finite (NaN/inf): its weights have diverged")
        cache = out.cache
        position = attention_mask.long().sum(-1, keepdim=True)  # (B, 1) next token's position

        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            token = next_token(logits, temperature, top_k, top_p, generator)  # (B,)
            token = token.masked_fill(finished, pad_token_id)
            seqs[:, P + t], alive[:, P + t] = token, ~finished
            mask[:, P + t] = (~finished).to(mask.dtype)  # EOS itself stays visible; what follows is not
            finished = finished | torch.isin(token, eos)
            # The host sync that lets the batch stop early, every check_every steps.
            if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and bool(finished.all())):
                break
            step_mask = mask if static_cache else mask[:, :P + t + 1]  # plain: mask grows with the cache
            if compile and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
            out = forward(input_ids=token[:, None], attention_mask=step_mask, position_ids=position,
                          cache=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]  # (B, V); used before the next step (CUDA graphs reuse the buffer)
            position = position + 1

    # Generated length: up to the last step any row was still alive (its EOS), or max_new_tokens.
    T = int((torch.arange(1, max_new_tokens + 1, device=device) * alive[:, P:].any(0)).max()) if max_new_tokens else 0
    return Rollout(sequences=seqs[:, :P + T], attention_mask=mask[:, :P + T],
                   completion_mask=alive[:, :P + T].to(mask.dtype), truncated=~finished)


def compilations():
    """How many graphs torch.compile has built in this process (a run should build a handful, not one per step)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ----------------------------------------------------------------------------- the model a compiled step runs

def sampling_model(model, compile):
    """-> (the module to sample from, its decode step): `model` twice on the plain path; on the compiled
    path its `decode_copy` and that copy compiled, made once per model, the copy refreshed at every
    call (the master changes between calls, never within).

    Two things the compiled decode step would otherwise do at every token that eager code does not:
    - under autocast (fp32 master weights, bf16 compute: train.py on GPU) re-cast every Linear weight.
      Eager autocast caches the casts of parameters for the call; a compiled graph has no such cache.
      The copy keeps those weights in the autocast dtype (2 bytes per Linear parameter, kept).
    - with grouped key/value heads, expand the KV cache G-fold (transformers' repeat_kv) in every
      layer; eager transformers attends on the key/value heads directly. `packed_gqa_attention` does
      that inside the graph too.
    The copy computes the same numbers as the master (autocast rounds the same weights the same way).
    """
    if not compile:
        return model, model
    device = next(model.parameters()).device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if model not in _copies or _copies[model][0] != dtype:
        low, pairs = decode_copy(model, dtype)
        # On GPU "reduce-overhead" records the fixed-shape decode step as a CUDA graph: one launch per
        # step instead of hundreds of small kernels. On CPU inductor's default mode fuses ops. Kept
        # with the copy (it compiles at the first call, once per shape), so both go with the master.
        step = torch.compile(low, mode="reduce-overhead" if device == "cuda" else "default", fullgraph=True,
                             dynamic=False)
        _copies[model] = (dtype, low, pairs, step)
    _, low, pairs, step = _copies[model]
    with torch.no_grad():  # every call: a cast of the weights once, against one read of them per decoded token
        for copy_linear, master in pairs:
            copy_linear.weight.copy_(master.weight)
            if copy_linear.bias is not None:
                copy_linear.bias.copy_(master.bias)
    return low, step


# model -> (autocast dtype, its decode copy, [(copy's Linear, master's Linear)], the compiled decode step)
_copies = weakref.WeakKeyDictionary()


def decode_copy(model, dtype=None):
    """A copy of `model`'s modules for compiled decoding -> (copy, [(copy's Linear, master's Linear)]).

    Every parameter and buffer is the master's own tensor, shared, not copied, except with `dtype`
    (the autocast dtype): then each fp32 nn.Linear's weight and bias get their own `dtype` copy (no
    gradient), which the pairs say where to refresh from; a tied output head gets its own copy and
    the embedding stays shared. The copy's config (its own) selects `packed_gqa_attention` when the
    master uses sdpa.
    """
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    low = copy.deepcopy(model, memo=shared)  # modules and config copied; tensors found in `shared` are not
    masters = dict(model.named_modules())
    pairs = []
    for name, m in low.named_modules():
        if dtype is not None and type(m) is torch.nn.Linear and m.weight.dtype == torch.float32:
            m.weight = torch.nn.Parameter(m.weight.detach().to(dtype), requires_grad=False)
            if m.bias is not None:
                m.bias = torch.nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
            pairs.append((m, masters[name]))
    if getattr(low.config, "_attn_implementation", None) == "sdpa":
        low.config._attn_implementation = "grace_packed_gqa"  # the copy's config only
    return low.eval(), pairs


def packed_gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' sdpa attention, with one query token per row run on the key/value heads.

    query (B, H, 1, D), key (B, KV, L, D), value (B, KV, L, Dv), H = G x KV: the G query heads that
    share a key/value head become G queries of it, (B, KV, G, D); the mask (B, 1, 1, L) broadcasts.
    Anything else (prompts, no grouping, position biases) goes to transformers' own function.
    -> (B, 1, H, D), None, as transformers expects.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    G = getattr(module, "num_key_value_groups", 1)
    B, H, q, D = query.shape
    if q != 1 or G == 1 or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    out = F.scaled_dot_product_attention(query.reshape(B, H // G, G, D), key, value, attn_mask=attention_mask,
                                         scale=scaling)  # (B, KV, G, Dv)
    return out.reshape(B, H, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _register_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("grace_packed_gqa", packed_gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("grace_packed_gqa", sdpa_mask)  # the masks sdpa takes


_register_attention()


# ----------------------------------------------------------------------------- CPU scaffolding for the compiled path
# Not needed to read the loop above: a workaround for one BLAS library's slow skinny matmuls.

# A decode step multiplies a few rows (the batch) by every weight matrix of the model. For such
# skinny fp32 matmuls the BLAS call behind F.linear on CPU (MKL) can be far slower than oneDNN, the
# library inductor itself uses for CPU inference: 2.4x on the 32k-vocabulary output layer of the
# bench model, on an AMD EPYC. On an Intel Xeon it was the other way round (oneDNN 0.35x-0.97x), so
# the compiled path times both once per shape (`onednn_pays`) and routes nn.Linear through oneDNN,
# with the live weights, only where it wins (bench/rollout.py prints both for the machine at hand).
# Inductor only does that for frozen weights, and a policy's weights change every step. A custom
# op, so torch.compile keeps it as one opaque call (inductor's own lowering of the oneDNN op wants
# frozen weights).
@torch.library.custom_op("grace::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) computed by oneDNN (CPU, no autograd). x: (..., in) -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.size(0))


def _onednn_forward(self, x):
    return onednn_linear(x, self.weight, self.bias)


@contextmanager
def onednn_linears(model, enabled=True):
    """Within the block, every plain fp32 CPU nn.Linear of `model` runs through `onednn_linear`.
    Same weights, same math, rounded differently; restored on exit, so training is untouched.
    Modules whose forward someone else already replaced (hooks, adapters) are left alone."""
    linears = _routable_linears(model) if enabled else []  # the plain path walks no modules at all
    for m in linears:
        m.forward = types.MethodType(_onednn_forward, m)
    try:
        yield
    finally:
        for m in linears:
            del m.forward  # the class's forward again


_verdicts = {}  # (rows, out, in) -> whether oneDNN beat F.linear on this machine


def onednn_pays(model, rows):
    """Whether oneDNN is faster than F.linear here for `rows` rows times the model's largest fp32 CPU
    Linear weight (the output head, most of a small model's decode step): timed once per shape and
    process. A timing on a busy machine can go either way, and the two round differently: two runs of
    the same seed may then part at a near-tie (only `compile=True` on CPU, which is not the default)."""
    linears = _routable_linears(model)
    if not linears:
        return False
    weight = max(linears, key=lambda m: m.weight.numel()).weight.detach()
    key = (rows, *weight.shape)
    if key not in _verdicts:
        x = torch.randn(rows, weight.size(1), generator=torch.Generator().manual_seed(0))  # not the global RNG

        def best_of(fn, n=5):
            fn(), fn()  # warm-up
            times = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return min(times)

        _verdicts[key] = best_of(lambda: onednn_linear(x, weight, None)) < 0.9 * best_of(lambda: F.linear(x, weight))
    return _verdicts[key]


def _routable_linears(model):
    """The modules onednn_linears would route: plain fp32 CPU nn.Linear whose forward nobody else has
    replaced. None under CPU autocast, which would hand the custom op mixed dtypes."""
    if not torch.backends.mkldnn.is_available() or torch.is_autocast_enabled("cpu"):
        return []
    return [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)
            and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
