"""Fully sharded data parallelism (FSDP2, torch.distributed.fsdp.fully_shard) for the GRACE policy.

Plain data parallelism keeps on every rank fp32 weights (4 B/param), gradients (4 B) and AdamW's two
moments (8 B): 16 B/param, 64 GB for a 4B model before any activation. Under `--fsdp` each rank keeps
1/N of all three:

    units:    every decoder layer (transformers' `_no_split_modules`) is one FSDP unit; the root unit
              holds the rest (embeddings, final norm, output head; with tie_word_embeddings the head
              and the embedding are one parameter, so they must sit in one unit, and the root is it)
    forward:  a unit all-gathers its parameters, runs, frees them again (reshard_after_forward)
    backward: all-gather again, compute, reduce-scatter the gradients: each rank keeps the *average*
              of its 1/N slice (FSDP divides by N), so no hand all-reduce is needed on this path
    step:     AdamW on the local slices (DTensors): its state is sharded with them

Two things in this repo call around the root module's forward, which is where FSDP's root hooks live:
policy.token_logprobs / hidden_states call `model.base_model(...)` and then the output head directly,
and rollout.sample calls `model(...)` once per decoded token. `shard` handles both with one rule,
applied by a forward pre-hook on the two entry points (the root and `base_model`):

    no_grad forward (rollouts, embeddings, the in-training STS check): the whole model is gathered once
        and stays gathered until the next gradient forward. A rollout batch of T decode steps would
        otherwise all-gather every layer T times (T = 2048 in the release: 2048 x the model's bytes
        through the interconnect per batch, against 1 x here), and ranks whose rollouts stop at
        different steps would issue different numbers of collectives and hang. The price is one full
        fp32 copy of the weights per rank while sampling (4 B/param, transient).
    gradient forward (the update): everything is resharded first (freeing that copy), the root unit
        is gathered (embeddings, norm, head: the direct calls need them; a no-op if already gathered)
        and stays gathered through the backward; each decoder layer gathers and frees itself.
        The root's gradients (embedding and head contributions summed, tied or not) are
        reduce-scattered once, by FSDP's end-of-backward callback.

The switch happens at the same call on every rank (every rank runs the same sequence of encode /
update calls), so the collectives match. The frozen reference is not sharded (see train.load_models).
Checkpoints gather full state dicts to rank 0 (`full_state_dict`) and stay plain from_pretrained folders.
"""
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0, on the CPU


def layers(model):
    """The decoder layers: the classes transformers itself never splits across devices."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        raise NotImplementedError(f"{type(model).__name__}: no _no_split_modules to shard layer by layer")
    return found


def shard(model, device, offload=False):
    """Shard `model` (on `device`) in place over the default process group: a unit per decoder layer + the root.
    offload: parameters, gradients and AdamW state live on the CPU (CPUOffloadPolicy); the GPU holds
    only what is gathered for compute. Call before creating the optimizer. -> the model."""
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for layer in layers(model):
        fully_shard(layer, offload_policy=policy)
    fully_shard(model, offload_policy=policy, reshard_after_forward=False)
    model._gathered = None  # unknown until the first call
    for entry in (model, model.base_model):
        entry.register_forward_pre_hook(lambda *_: _switch(model, gathered=not torch.is_grad_enabled()),
                                        prepend=True)  # before FSDP's own pre-forward
    with torch.no_grad():  # the first FSDP forward picks the root: make it this one, not a layer
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    reshard(model)  # model.parameters() are the sharded ones again: what the optimizer must hold
    return model


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
            for handle in [unit.unshard(async_op=True) for unit in units(model)]:  # all in flight at once
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
    """The full state dict (plain CPU tensors) on rank 0, {} elsewhere; a collective: every rank calls it.
    A tied parameter appears once, under its first name (what save_pretrained writes for a whole model)."""
    reshard(model)
    state = get_model_state_dict(model, options=FULL)
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied: keep the first name, as HF saves
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
