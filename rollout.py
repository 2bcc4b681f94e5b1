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
  CUDA in "reduce-overhead" mode, i.e. CUDA graphs; on CPU the linear layers also run through
  oneDNN, see `onednn_linears`). The plain path is the one to read first.

The caller should put the model in eval mode (dropout off); `sample` leaves train/eval alone.
"""
from contextlib import contextmanager
from dataclasses import dataclass
import types
import weakref

import torch
from transformers.cache_utils import StaticCache


@dataclass
class Rollout:
    sequences: torch.Tensor  # (B, P+T) prompt, then completion; pad_token_id after a row's EOS
    attention_mask: torch.Tensor  # (B, P+T) 1 on real prompt tokens and on completion tokens up to EOS
    completion_mask: torch.Tensor  # (B, P+T) 1 on generated tokens up to and including EOS
    truncated: torch.Tensor  # (B,) bool: reached max_new_tokens without EOS


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

    Always in float32, whatever the model's dtype: bf16 logits are too coarse for a softmax over a
    large vocabulary. temperature 0 is greedy (argmax, as generate(do_sample=False)). Otherwise
    torch.multinomial draws with `generator` (a torch.Generator on the logits' device), so a seed
    gives the same tokens again.
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- the loop

# no_grad, not inference_mode: the sequences feed a later training forward, and inference-mode
# tensors cannot be saved for backward (the embedding lookup saves its indices).
@torch.no_grad()
def sample(model, input_ids, attention_mask, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
           eos_token_id=None, pad_token_id=0, generator=None, *, static_cache=False, compile=False):
    """Sample up to `max_new_tokens` tokens per row after left-padded prompts (B, P). -> Rollout.

    eos_token_id: an int, a list of ints (chat models end turns with several), or None (never stop
    early). static_cache: preallocated cache and mask (fixed shapes); compile: torch.compile the
    decode step (implies static_cache; on CPU also oneDNN linears). Every path gives the same
    tokens for the same seed, up to float rounding (attention over the padded static cache, oneDNN's
    summation order), which can flip a near-tie between two tokens. The compiled step is specialised
    to its shapes: each new (batch, prompt length + max_new_tokens) compiles again, so pad prompts
    to a few fixed lengths before a long run on this path.
    """
    static_cache = static_cache or compile
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
    forward = _decode_forward(model, compile)
    # compile: on CPU the linears run through oneDNN for the whole call (prefill and decode).
    with onednn_linears(model, enabled=compile):
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
        T = 0
        for t in range(max_new_tokens):
            token = next_token(logits, temperature, top_k, top_p, generator)  # (B,)
            token = token.masked_fill(finished, pad_token_id)
            seqs[:, P + t], alive[:, P + t] = token, ~finished
            mask[:, P + t] = (~finished).to(mask.dtype)  # EOS itself stays visible; what follows is not
            finished = finished | torch.isin(token, eos)
            T = t + 1
            # One host sync a step; cheap next to a forward, and it lets the batch stop early.
            if T == max_new_tokens or bool(finished.all()):
                break
            step_mask = mask if static_cache else mask[:, :P + T]  # plain: mask grows with the cache
            if compile and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
            out = forward(input_ids=token[:, None], attention_mask=step_mask, position_ids=position,
                          cache=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]  # (B, V); used before the next step (CUDA graphs reuse the buffer)
            position = position + 1

    return Rollout(sequences=seqs[:, :P + T], attention_mask=mask[:, :P + T],
                   completion_mask=alive[:, :P + T].to(mask.dtype), truncated=~finished)


def compilations():
    """How many graphs torch.compile has built in this process (a run should build a handful, not one per step)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


_compiled = weakref.WeakKeyDictionary()  # model -> compiled forward, so a second call does not recompile


def _decode_forward(model, compile):
    if not compile:
        return model
    if model not in _compiled:
        cuda = next(model.parameters()).device.type == "cuda"
        # On GPU "reduce-overhead" records the fixed-shape decode step as a CUDA graph: one launch
        # per step instead of hundreds of small kernels. On CPU inductor's default mode fuses ops.
        _compiled[model] = torch.compile(model, mode="reduce-overhead" if cuda else "default",
                                         fullgraph=True, dynamic=False)
    return _compiled[model]


# ----------------------------------------------------------------------------- CPU scaffolding for the compiled path
# Not needed to read the loop above: a workaround for one BLAS library's slow skinny matmuls.

# A decode step multiplies a few rows (the batch) by every weight matrix of the model. For such
# skinny fp32 matmuls the BLAS call behind F.linear on CPU (MKL) can be far slower than oneDNN, the
# library inductor itself uses for CPU inference: 2.4x on the 32k-vocabulary output layer of the
# bench model, on the AMD CPU we measured (bench/rollout.py prints both for the machine at hand).
# Inductor only does that for frozen weights, and a policy's weights change every step, so the
# compiled path routes nn.Linear through oneDNN itself, with the live weights. A custom op, so
# torch.compile keeps it as one opaque call (inductor's own lowering of the oneDNN op wants frozen
# weights).
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
    linears = []
    if enabled and torch.backends.mkldnn.is_available():  # the plain path walks no modules at all
        linears = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)
                   and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    for m in linears:
        m.forward = types.MethodType(_onednn_forward, m)
    try:
        yield
    finally:
        for m in linears:
            del m.forward  # the class's forward again
