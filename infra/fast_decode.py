"""The fast decode step: a preallocated KV cache and a torch.compile'd forward, for rollout.sample.

    rollout.sample(model, ids, mask, n, step=fast_decode.static_step(model, compile=True))

rollout.py's loop is the same on this path; only the forward of one step differs:
- the cache and the mask are preallocated at their final length (a StaticCache), so every decode
  step has the same shapes, which is what torch.compile needs (on CUDA in "reduce-overhead" mode,
  i.e. CUDA graphs: one launch per step instead of hundreds of small kernels);
- the full length is padded on the left to a multiple of PROMPT_BUCKET, so a run compiles a few
  shapes, not one per batch; the padding is masked, and the rollout comes back without it.

What a compiled GPU decode step should cost: one read of the weights (2 bytes/parameter in bf16),
the bandwidth floor bench/rollout.py measures against. Three things kept it far above that, each
removed: autocast re-casting every fp32 master weight inside the graph at every step, and
transformers expanding the KV cache per query head inside the graph (both: `sampling_model`), and a
host sync per step to ask whether every row has finished (rollout.sample's check_every: 16 on GPU).

On CPU, a oneDNN route for the linear layers was tried and removed: on an Intel Xeon it ran at
0.33x-1.00x the speed of F.linear on decode shapes (docs/measured.md).
"""
import copy
import weakref

import torch
import torch.nn.functional as F
from transformers.cache_utils import StaticCache

import lora

PROMPT_BUCKET = 64  # the cache length is padded to a multiple of this: few shapes compile


def static_step(model, compile=True):
    """-> a decode step for rollout.sample on a StaticCache, the decode forward compiled
    (compile=False: the same fixed shapes, eager).
    step(ids, mask, positions, cache, width) -> (logits (B, V), hidden (B, W, H), cache).

    The mask rollout.sample hands in is its (B, L) buffer, zeros past the positions written; it
    goes to the model whole (a static cache attends over all L slots), left-padded to a multiple of
    PROMPT_BUCKET when compiled. At the prefill (cache None) the cache is made at that length, for
    the distinct prompts (n mask rows per prompt), then each prompt's copied to its n rows.
    """
    cuda_graphs = compile and next(model.parameters()).device.type == "cuda"
    module = forward = None

    def step(input_ids, mask, position_ids, cache, width):
        nonlocal module, forward
        pad = -mask.shape[1] % PROMPT_BUCKET if compile else 0
        mask = F.pad(mask, (pad, 0))  # (B, L + pad): slots of the padding are never attended
        if cache is None:  # prefill, eager: a new prompt width each call
            # this rollout's copy: under the caller's autocast, refreshed from the master
            module, forward = sampling_model(model, compile)
            cache = StaticCache(config=module.config, max_cache_len=mask.shape[1])
            n = len(mask) // len(input_ids)  # rows per prompt
            out = module(input_ids=F.pad(input_ids, (pad, 0)), attention_mask=mask[::n],
                         position_ids=F.pad(position_ids, (pad, 0)), cache=cache, use_cache=True,
                         logits_to_keep=1, output_hidden_states=-1)
            if n > 1:
                repeat_rows(out.cache, n)
            return out.logits[:, -1], out.hidden_states[-1][:, pad:], out.cache
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        out = forward(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                      cache=cache, use_cache=True, logits_to_keep=1, output_hidden_states=-1)
        # used before the next step (CUDA graphs reuse them)
        return out.logits[:, -1], out.hidden_states[-1], out.cache
    return step


def repeat_rows(cache, n):
    """A prefilled StaticCache's row i -> rows i*n .. i*n+n-1, in place (transformers'
    batch_repeat_interleave, which StaticCache lacks). The new tensors get the static addresses
    that CUDA graphs need to update them in place, as the layers' own (StaticLayer)."""
    for layer in cache.layers:
        layer.keys, layer.values = (x.repeat_interleave(n, 0) for x in (layer.keys, layer.values))
        layer.batch_size = layer.keys.shape[0]
        torch._dynamo.mark_static_address(layer.keys)
        torch._dynamo.mark_static_address(layer.values)


def sampling_model(model, compile):
    """-> (the module to sample from, its decode step): `model` twice on the plain path; on the
    compiled path its `decode_copy` and that copy compiled, made once per model, the copy refreshed
    at every call (the master changes between calls, never within).

    Two things the compiled decode step would otherwise do at every token that eager code does not:
    - under autocast (fp32 master weights, bf16 compute: train.py on GPU) re-cast every Linear
      weight. Eager autocast caches the casts of parameters for the call; a compiled graph has
      no such cache. The copy keeps those weights in the autocast dtype (2 bytes per Linear
      parameter, kept).
    - with grouped key/value heads, expand the KV cache G-fold (transformers' repeat_kv) in every
      layer; eager transformers attends on the key/value heads directly. `packed_gqa_attention`
      does that inside the graph too.
    The copy computes the same numbers as the master (autocast rounds the same
    weights the same way).
    """
    if not compile:
        return model, model
    device = next(model.parameters()).device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if model not in _copies or _copies[model][0] != dtype:
        low, pairs = decode_copy(model, dtype)
        # On GPU "reduce-overhead" records the fixed-shape decode step as a CUDA graph: one launch
        # per step instead of hundreds of small kernels. On CPU inductor's default mode fuses
        # ops. Kept with the copy (it compiles at the first call, once per shape), so both go
        # with the master.
        step = torch.compile(low, mode="reduce-overhead" if device == "cuda" else "default",
                             fullgraph=True, dynamic=False)
        _copies[model] = (dtype, low, pairs, step)
    _, low, pairs, step = _copies[model]
    # every call: a cast of the weights once, against one read of them per decoded token
    with torch.no_grad():
        for copy_linear, master in pairs:
            copy_linear.weight.copy_(lora.weight(master))  # LoRA: W + (alpha / r) B A, merged
            if copy_linear.bias is not None:
                copy_linear.bias.copy_(master.bias)
    return low, step


# model -> (autocast dtype, its decode copy, [(copy's Linear, master's Linear)],
#           the compiled decode step)
_copies = weakref.WeakKeyDictionary()


def decode_copy(model, dtype=None):
    """A copy of `model`'s modules for compiled decoding
    -> (copy, [(copy's Linear, master's Linear)]).

    Every parameter and buffer is the master's own tensor, shared, not copied, except with `dtype`
    (the autocast dtype): then each fp32 nn.Linear's weight and bias get their own `dtype` copy (no
    gradient), which the pairs say where to refresh from; a tied output head gets its own copy and
    the embedding stays shared. A LoRA layer's copy always gets its own weight, the merged
    W + (alpha / r) B A (lora.weight), its adapter off: the compiled step pays nothing for LoRA.
    The copy's config (its own) selects `packed_gqa_attention` when the master uses sdpa.
    """
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    # modules and config copied; tensors found in `shared` are not
    low = copy.deepcopy(model, memo=shared)
    masters = dict(model.named_modules())
    pairs = []
    for name, m in low.named_modules():
        cast = dtype is not None and type(m) is torch.nn.Linear and m.weight.dtype == torch.float32
        if cast or hasattr(m, "lora_A"):
            to = dtype if cast else m.weight.dtype
            m.weight = torch.nn.Parameter(lora.weight(m).to(to), requires_grad=False)
            if m.bias is not None:
                m.bias = torch.nn.Parameter(m.bias.detach().to(to), requires_grad=False)
            m.lora_on = False  # (if it has one: the weight is the merged one)
            pairs.append((m, masters[name]))
    if getattr(low.config, "_attn_implementation", None) == "sdpa":
        low.config._attn_implementation = "grace_packed_gqa"  # the copy's config only
    return low.eval(), pairs


def packed_gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         **kwargs):
    """transformers' sdpa attention, with one query token per row run on the key/value heads.

    query (B, H, 1, D), key (B, KV, L, D), value (B, KV, L, Dv), H = G x KV: the G query heads that
    share a key/value head become G queries of it, (B, KV, G, D); the mask (B, 1, 1, L) broadcasts.
    Anything else (prompts, no grouping, position biases) goes to transformers' own function.
    -> (B, 1, H, D), None, as transformers expects.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    G = getattr(module, "num_key_value_groups", 1)
    B, H, q, D = query.shape
    if q != 1 or G == 1 or kwargs.get("position_bias") is not None or \
            kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    out = F.scaled_dot_product_attention(query.reshape(B, H // G, G, D), key, value,
                                         attn_mask=attention_mask, scale=scaling)  # (B, KV, G, Dv)
    return out.reshape(B, H, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _register_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("grace_packed_gqa", packed_gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("grace_packed_gqa", sdpa_mask)  # the masks sdpa takes


_register_attention()


def compilations():
    """How many graphs torch.compile has built in this process (a run should build a handful,
    not one per step)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


