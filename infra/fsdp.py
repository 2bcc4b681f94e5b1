"""Fully sharded data parallelism (FSDP2, torch.distributed.fsdp.fully_shard) for the GRACE policy.

Plain data parallelism keeps on every rank fp32 weights (4 B/param), gradients (4 B) and AdamW's
two moments (8 B): 16 B/param, 64 GB for a 4B model before any activation. Under `--fsdp` each rank
keeps 1/N of all three:

    units:    every decoder layer (transformers' `_no_split_modules`) is one FSDP unit; the root
              unit holds the rest (embeddings, final norm, output head; with tie_word_embeddings
              the head and the embedding are one parameter, so they must sit in one unit, and the
              root is it)
    forward:  a unit all-gathers its parameters, runs, frees them again (reshard_after_forward)
    backward: all-gather again, compute, reduce-scatter the gradients: each rank keeps the
              *average* of its 1/N slice (FSDP divides by N), so no hand all-reduce is needed on
              this path
    step:     AdamW on the local slices (DTensors): its state is sharded with them

Rollouts are not sampled from the sharded model. A rollout batch of T decode steps would all-gather
every layer T times (T = 2048 in the release: 2048 x the model's bytes through the interconnect per
batch), ranks whose rollouts stop at different steps would issue different numbers of collectives
and hang, and FSDP's hooks cannot be traced by torch.compile. So every rank keeps a `plain_copy`: a
plain, unsharded, hook-free model with the same weights (Linear weights in bf16 on GPU, the dtype
autocast computes them in, 2 B/param; the rest, mostly the embedding table, fp32), refreshed by
gathering one unit at a time at the first rollout call after each optimizer step (`sampler`).
Rollouts, compiled or not, run on the copy.

policy.token_logprobs / hidden_states call `model.base_model(...)` and then the output head
directly, around the root module's forward, where FSDP's root hooks live. A forward pre-hook on the
two entry points (the root and `base_model`) therefore gathers the root unit (embeddings, norm,
head); it stays gathered through the backward, while each decoder layer gathers and frees itself.
The root's gradients (embedding and head contributions summed, tied or not) are reduce-scattered
once, by FSDP's end-of-backward callback. A decode loop run on the sharded model itself (a forward
that fills a KV cache without gradient: not train.py's) gathers the whole model once and keeps it
until the next forward that does not, so its collectives match across ranks.

Every rank runs the same sequence of encode / update calls, so the collectives match. The frozen
reference is not sharded (see train.load_models). Checkpoints gather full state dicts to rank 0
(`full_state_dict`) and stay plain from_pretrained folders.
"""
import copy
import weakref

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0, on the CPU


def layers(model):
    """The decoder layers: the classes transformers itself never splits across devices."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        raise NotImplementedError(f"{type(model).__name__}: no _no_split_modules to shard "
                                  "layer by layer")
    return found


def shard(model, device, offload=False):
    """Shard `model` (on `device`) in place over the default process group: a unit per decoder
    layer + the root.
    offload: parameters, gradients and AdamW state live on the CPU (CPUOffloadPolicy); the GPU
    holds only what is gathered for compute. Call before creating the optimizer. -> the model."""
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for layer in layers(model):
        fully_shard(layer, offload_policy=policy)
    fully_shard(model, offload_policy=policy, reshard_after_forward=False)
    model._gathered = None  # unknown until the first call

    def pre_forward(module, args, kwargs):  # a decode step: no gradient, a KV cache filled
        _switch(model,
                gathered=not torch.is_grad_enabled() and kwargs.get("use_cache") is not False)

    for entry in (model, model.base_model):
        entry.register_forward_pre_hook(pre_forward, prepend=True,
                                        with_kwargs=True)  # before FSDP's own
    with torch.no_grad():  # the first FSDP forward picks the root: make it this one, not a layer
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    reshard(model)  # model.parameters() are the sharded ones again: what the optimizer must hold
    return model


def plain_copy(model, device, dtype=None):
    """A plain copy of the sharded model to sample rollouts from; a collective (every rank
    calls it).

    Built from the model's config (no weights read from disk), its nn.Linear weights in `dtype`
    (the autocast dtype on GPU: what autocast would compute them in; a tied head then gets its
    own; None keeps fp32), everything else in fp32, filled by `refresh`. -> the copy (eval mode,
    no gradients).
    """
    from transformers import AutoModelForCausalLM

    # fp32 whatever the config says (a checkpoint's config.json often says bf16); from_config keeps
    # (and sets the dtype of) the config it is given, so it gets its own
    with torch.device("meta"):
        low = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=torch.float32)
    low.to_empty(device=device).eval().requires_grad_(False)
    if dtype is not None:
        for m in low.modules():
            if type(m) is torch.nn.Linear:  # new tensors: a tied head gets its own
                m.weight = torch.nn.Parameter(m.weight.to(dtype), requires_grad=False)
                if m.bias is not None:
                    m.bias = torch.nn.Parameter(m.bias.to(dtype), requires_grad=False)
    with torch.no_grad():
        buffers = dict(low.named_buffers())
        # rotary tables: not sharded, not in the config's init
        for name, b in model.named_buffers():
            buffers[name].copy_(full_tensor(b))
    return refresh(low, model)


@torch.no_grad()
def refresh(low, model):
    """Copy the sharded weights into `low`, one FSDP unit gathered at a time (the root unit, then
    each layer, freed again at once): the peak is one layer and the root. A collective. -> low."""
    reshard(model)
    dst = dict(low.named_parameters(remove_duplicate=False))
    prefixes = {m: name + "." for name, m in model.named_modules()
                if isinstance(m, FSDPModule) and m is not model}
    model.unshard()  # the root unit: everything outside the layers
    for name, p in model.named_parameters(remove_duplicate=False):
        if not any(name.startswith(prefix) for prefix in prefixes.values()):
            dst[name].copy_(p)
    for layer, prefix in prefixes.items():
        layer.unshard()
        for name, p in layer.named_parameters(prefix=prefix[:-1]):
            dst[name].copy_(p)
        layer.reshard()
    reshard(model)
    return low


_copies = weakref.WeakKeyDictionary()  # sharded model -> its decode copy


def sampler(model, device, dtype=None, stale=True):
    """The decode copy of `model`: made on the first call, refreshed on a later one if `stale` (the
    weights may have changed since: an optimizer step came in between; the side rollouts of a step
    and the later batches of an STS check pass False). A collective."""
    if model not in _copies:
        _copies[model] = plain_copy(model, device, dtype)
    elif stale:
        refresh(_copies[model], model)
    return _copies[model]


def units(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _switch(model, gathered):
    """gathered: every unit's parameters all-gathered and kept (no_grad forwards); else everything
    sharded, the root unit gathered for the direct calls, layers gathering themselves."""
    if model._gathered is not gathered:
        reshard(model)
        if gathered:
            for unit in units(model):
                unit.set_reshard_after_forward(False, recurse=False)
            # all in flight at once
            for handle in [unit.unshard(async_op=True) for unit in units(model)]:
                handle.wait()
        model._gathered = gathered
    if not gathered:
        model.unshard()  # the root unit; a no-op unless a backward has resharded it since


def reshard(model):
    """Free every gathered copy (before a checkpoint, or to give the memory back)."""
    model._gathered = None
    for unit in units(model):
        unit.reshard()
        unit.set_reshard_after_forward(unit is not model, recurse=False)


def full_tensor(x):
    """A DTensor (e.g. clip_grad_norm_'s total norm over sharded gradients) as a plain tensor."""
    return x.full_tensor() if isinstance(x, DTensor) else x


def model_state(model):
    """The full state dict (plain CPU tensors) on rank 0, {} elsewhere; a collective: every rank
    calls it. A tied parameter appears once, under its first name (what save_pretrained writes for
    a whole model)."""
    reshard(model)
    state = get_model_state_dict(model, options=FULL)
    names = {}
    # tied: keep the first name, as HF saves
    for name, p in model.named_parameters(remove_duplicate=False):
        if names.setdefault(id(p), name) != name:
            state.pop(name, None)
    return state


def optimizer_state(model, opt):
    """The full AdamW state, keyed by parameter name, on rank 0 ({} elsewhere); a collective."""
    return get_optimizer_state_dict(model, opt, options=FULL)


def load_optimizer_state(model, opt, state):
    """Load a full optimizer state (every rank passes the same one, read from the checkpoint): each
    rank keeps its own slices."""
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
