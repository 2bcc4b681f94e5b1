"""LoRA (Hu et al. 2021): train a low-rank update beside each frozen Linear weight.

    y = W x + (alpha / r) B A x     W (out, in) frozen; A (r, in), B (out, r) trained; r << in, out

A is drawn as nn.Linear draws its weight (kaiming_uniform_, a = sqrt(5): peft's default), B is
zero: at step 0 the model is exactly the base model. Only A and B get gradients and AdamW state.
They live on the Linear modules themselves, run by a forward hook: the base model's module tree.
`disabled(model)` is the base model without a second copy (train.py's KL reference).
"""
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add(model, rank, alpha=None, dropout=0.0, targets=TARGETS, seed=0):
    """Freeze `model`; give each nn.Linear whose name ends in a target an adapter, A drawn from
    `seed` (alpha None: 2 x rank) -> the adapted names. ValueError: a target matching nothing."""
    alpha, g = 2 * rank if alpha is None else alpha, torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    found = {t: [] for t in targets}
    for name, m in model.named_modules():
        t = name.rsplit(".", 1)[-1]
        if t not in found:
            continue
        if type(m) is not torch.nn.Linear:  # e.g. GPT-2's Conv1D (c_attn), weight (in, out)
            raise ValueError(f"LoRA target {name} is a {type(m).__name__}, not a torch.nn.Linear "
                             "(not supported); pick Linear layers with --lora-targets")
        found[t].append(name)
        A = torch.nn.init.kaiming_uniform_(torch.empty(rank, m.in_features), math.sqrt(5),
                                           generator=g)  # (r, in), on the CPU: any device, same A
        m.lora_A = torch.nn.Parameter(A.to(m.weight))
        m.lora_B = torch.nn.Parameter(m.weight.new_zeros(m.out_features, rank))  # (out, r)
        m.lora_scale, m.lora_dropout, m.lora_on = alpha / rank, dropout, True
        m.register_forward_hook(_forward)
    missing = [t for t, names in found.items() if not names]
    if missing:
        have = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                if type(m) is torch.nn.Linear}
        raise ValueError(f"LoRA target(s) {', '.join(missing)} match no layer of "
                         f"{type(model).__name__} (its Linear layers: {', '.join(sorted(have))})")
    return [n for names in found.values() for n in names]


def _forward(m, inputs, out):
    """out = W x (+ b), the Linear's own; + (alpha / r) B A x. x (..., in) -> (..., out)."""
    if not m.lora_on:
        return out
    x = inputs[0]
    if m.lora_dropout:  # only where gradients flow: rollouts and log-probs score the same tokens
        x = F.dropout(x, m.lora_dropout, training=torch.is_grad_enabled())
    return out + m.lora_scale * F.linear(F.linear(x, m.lora_A), m.lora_B)


def layers(model):
    """The adapted Linear modules of `model` by name ({} without adapters)."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A")}


@contextmanager
def disabled(model):
    """The base model: every adapter off inside the block (a no-op on a model without any)."""
    adapted = list(layers(model).values())
    for m in adapted:
        m.lora_on = False
    try:
        yield model
    finally:
        for m in adapted:
            m.lora_on = True


def weight(m):
    """A Linear's effective weight (out, in), no gradient: W + (alpha / r) B A, or W itself."""
    on = hasattr(m, "lora_A")
    return (m.weight + m.lora_scale * (m.lora_B @ m.lora_A)).detach() if on else m.weight


def merge(model):
    """Fold each adapter into its weight, in place, and remove it: a plain model again."""
    for m in layers(model).values():
        m.weight.data = weight(m)
        del m.lora_A, m.lora_B
        for key in [k for k, hook in m._forward_hooks.items() if hook is _forward]:
            del m._forward_hooks[key]


def state_dict(model):
    """{"<layer>.lora_A": (r, in), "<layer>.lora_B": (out, r)}: the trained tensors only."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def load_state_dict(model, tensors):
    """Copy saved adapters into a model `add`ed with the same rank and targets (else KeyError)."""
    if set(tensors) != set(state_dict(model)):
        raise KeyError("the saved adapters are not this model's (other targets or base model)")
    model.load_state_dict(tensors, strict=False)
