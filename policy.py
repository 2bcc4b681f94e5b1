"""The LLM as a policy (it writes rationales) and as an encoder (its hidden states embed the text).

The GRACE embedding of a text, defined once here for training and evaluation alike (`encode`):

    prompt  = chat template(system instruction, text)          build_prompts
    y       ~ pi_theta(. | prompt)    a rationale               rollout.sample
    h       = normalize(mean_t H_last[t]), t over text + y      mean_pool (no system prompt)

and the log-probabilities the policy gradient needs: log pi(y_t | y_<t) (`token_logprobs`).
"""
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import rollout

DEFAULT_SYSTEM_PROMPT = (
    "Read the text below and analyse it. First reason about it step by step inside <think></think> "
    "tags, then write a comprehensive understanding of the text: its topic, its key facts and what "
    "it means."
)
FALLBACK_TEMPLATE = "System: {system}\n\nText: {text}\n\nAnalysis:"  # no chat template (GPT-2)
MODELS = Path(__file__).resolve().parent / "models"  # the built-ins: tiny (random), tiny-lm


# ----------------------------------------------------------------------------- the GRACE embedding

@dataclass
class Encoded:
    rollout: rollout.Rollout  # (B*n, P+T); text-major: text i -> rows i*n .. i*n+n-1
    embeddings: torch.Tensor  # (B*n, H) float32, L2-normalised unless normalize=False
    pool_mask: torch.Tensor  # (B*n, P+T) the positions pooled: text + rationale
    prompts_cut: torch.Tensor  # (B,) bool: texts shortened to fit max_length
    logprobs: torch.Tensor | None = None  # (B*n, P+T) log pi(y_t | y_<t) under logits / T


@torch.no_grad()
def encode(model, tokenizer, texts, *, n=1, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0,
           system_prompt=DEFAULT_SYSTEM_PROMPT, max_length=1024, generator=None, normalize=True,
           logprob_temperature=None, chunk_rows=None, sample_rows=None, step=None, device=None,
           pool_from="sampler"):
    """texts -> n rationales each -> Encoded: the one GRACE embedding, for training and evaluation.

    temperature 0 is greedy; max_new_tokens 0 pools the prompt alone (the no-rationale baseline);
    normalize False keeps the raw mean. logprob_temperature: also the old log-probs, under logits
    / T. Bounds: sample_rows rows sampled at once (whole groups of n), chunk_rows per forward.
    step: rollout.sample's decode step; device: where the work happens. pool_from "sampler": the
    sampler keeps the pooled sums and the log-probs, each prompt prefilled once; "forward": prompts
    repeated n-fold, then a second forward (the reference; docs/measured.md compares the two)."""
    device = device or next(model.parameters()).device
    ids, mask, start, cut = build_prompts(tokenizer, texts, system_prompt, max_length,
                                          return_truncated=True)
    sampler = pool_from == "sampler"  # else "forward"
    k = n if sampler else 1  # rows per prompt in rollout.sample (forward: prompts repeated)
    ids, mask, start = (x.repeat_interleave(n // k, 0).to(device) for x in (ids, mask, start))
    per = max((sample_rows or len(ids) * k) // k, 1)  # prompts per sample call
    with autocast(device):  # bf16 on GPU, as the scoring forwards that follow
        ro = rollout.concat([rollout.sample(
            model, ids[s:s + per], mask[s:s + per], max_new_tokens, temperature, top_p, top_k,
            stop_token_ids(model, tokenizer), tokenizer.pad_token_id, generator, n=k, step=step,
            pool_start=start[s:s + per] if sampler else None,
            logprob_temperature=logprob_temperature if sampler else None)
            for s in range(0, len(ids), per)], tokenizer.pad_token_id)
    pool = pool_mask_from(ro.attention_mask, start.repeat_interleave(k, 0))  # text + rationale
    if ro.pooled is not None:  # nothing to run again
        mean = ro.pooled / pool.sum(1, keepdim=True).clamp(min=1)  # (Bn, H)
        return Encoded(ro, F.normalize(mean, dim=-1) if normalize else mean, pool, cut, ro.logprobs)
    rows, embeddings, logprobs = chunk_rows or len(ro.sequences), [], []
    for s in range(0, len(ro.sequences), rows):
        seqs, am, cm = (x[s:s + rows] for x in (ro.sequences, ro.attention_mask,
                                                 ro.completion_mask))
        hidden = hidden_states(model, seqs, am)  # (rows, T, H): one forward serves both
        embeddings.append(mean_pool(hidden, pool[s:s + rows], normalize))
        if logprob_temperature is not None:
            logprobs.append(token_logprobs(model, seqs, am, cm, logprob_temperature, hidden=hidden))
    return Encoded(ro, torch.cat(embeddings), pool, cut, torch.cat(logprobs) if logprobs else None)


def mean_pool(hidden, pool_mask, normalize=True):
    """h = normalize(sum_t m_t H_t / sum_t m_t): float32 mean over the mask, L2-normalised unless
    normalize is False (the raw mean, which the release's evaluation scores)."""
    m = pool_mask.bool().unsqueeze(-1)  # (B, T, 1)
    # where(), not a product: a padded position's state may be inf/NaN, and NaN * 0 is still NaN.
    mean = torch.where(m, hidden.float(), 0.0).sum(1) / m.sum(1).clamp(min=1)  # (B, H)
    return F.normalize(mean, dim=-1) if normalize else mean


def pool_mask_from(attention_mask, pool_start):
    """(B, T) mask: attended positions from pool_start on (the text and everything generated)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    return attention_mask.bool() & (positions[None, :] >= pool_start.to(positions.device)[:, None])


def hidden_states(model, sequences, attention_mask):
    """(B, T, H) last-layer hidden states (after the final norm), without computing any logits."""
    with autocast(sequences.device):
        out = model.base_model(input_ids=sequences, attention_mask=attention_mask,
                               position_ids=position_ids_from(attention_mask), use_cache=False)
    return out.last_hidden_state


def position_ids_from(attention_mask):
    """Positions count attended tokens only: left padding does not shift them (GPT-2 needs it)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------- prompts

def render_prompt(tokenizer, text, system_prompt=DEFAULT_SYSTEM_PROMPT):
    """The prompt as a string: chat template (system, user, generation prompt), or the fallback."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return FALLBACK_TEMPLATE.format(system=system_prompt, text=text)


def _tokenize_prompt(tokenizer, text, system_prompt):
    """-> (ids, index of the first token of the user text). The text starts where a placeholder
    lands in the rendered template (searching for the text fails for short texts like "a" that
    also occur in the template); token offsets map that to a position."""
    placeholder = "\x00TEXT\x00"
    char_start = render_prompt(tokenizer, placeholder, system_prompt).index(placeholder)
    prompt = render_prompt(tokenizer, text, system_prompt)
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    starts = [i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > char_start]
    return enc["input_ids"], (starts[0] if starts else len(enc["input_ids"]))


def build_prompts(tokenizer, texts, system_prompt=DEFAULT_SYSTEM_PROMPT, max_length=1024,
                  return_truncated=False):
    """-> input_ids (B, P), attention_mask (B, P), pool_start (B,) [, truncated (B,) bool].
    Left-padded. pool_start[i] is the first position of row i that pooling may use (the first token
    of the text, after padding and the system prompt). A text too long for max_length is cut (its
    tail goes) so the whole prompt fits; `truncated` says which were."""
    rows, starts, cut = [], [], []
    for text in texts:
        ids, start = _tokenize_prompt(tokenizer, text, system_prompt)
        was_cut = False
        while len(ids) > max_length:  # shorten the text itself, never the template around it
            text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            keep = len(text_ids) - (len(ids) - max_length) - 1
            if keep < 1:
                raise ValueError(f"max_length={max_length} is too short for the prompt template "
                                 f"({len(ids) - len(text_ids)} tokens without the text)")
            text, was_cut = tokenizer.decode(text_ids[:keep]), True
            ids, start = _tokenize_prompt(tokenizer, text, system_prompt)
        rows.append(ids), starts.append(start), cut.append(was_cut)
    P = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), P), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, P - len(ids):] = 1
    pool_start = torch.tensor([P - len(ids) + s for ids, s in zip(rows, starts)], dtype=torch.long)
    out = (input_ids, attention_mask, pool_start)
    return out + (torch.tensor(cut),) if return_truncated else out


# ----------------------------------------------------------------------------- log-probabilities

def token_logprobs(model, sequences, attention_mask, completion_mask, temperature=1.0,
                   chunk_size=1024, hidden=None):
    """(B, T) float32 log pi(x_t | x_<t) on completion_mask positions, 0 elsewhere. Only those get
    logits, `chunk_size` rows at a time; with gradients on each chunk is recomputed in backward
    (checkpoint): the float32 (n, V) logits are never all kept. temperature: score under logits / T,
    the sampling temperature. hidden: the last hidden states (B, T, H), if a forward made them."""
    if hidden is None:
        hidden = hidden_states(model, sequences, attention_mask)  # (B, T, H)
    B, T = sequences.shape
    _check_output_logits(model, sequences, attention_mask)
    mask = completion_mask.bool().clone()
    mask[:, 0] = False  # the first token has no prefix to be predicted from
    rows, cols = mask.nonzero(as_tuple=True)  # (M,) each: positions whose token we score
    h = hidden[rows, cols - 1]  # (M, H): the state *before* each scored token predicts it
    targets = sequences[rows, cols]  # (M,)
    pieces = []
    for s in range(0, len(rows), chunk_size):
        args = (model, h[s:s + chunk_size], targets[s:s + chunk_size], temperature)
        with autocast(sequences.device):
            if torch.is_grad_enabled() and h.requires_grad:
                pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
            else:
                pieces.append(_chunk_logprobs(*args))
    out = torch.zeros(B, T, dtype=torch.float32, device=sequences.device)
    if pieces:
        out = out.index_put((rows, cols), torch.cat(pieces).float())
    return out


def _chunk_logprobs(model, h, targets, temperature):
    logits = output_logits(model, h).float() / temperature  # (n, V) float32: one chunk at a time
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # (n,)


def output_logits(model, h):
    """Logits of hidden states h (..., H) as the model's forward makes them: the output layer, then
    what some architectures do after it (Gemma 2/3 soft-capping, Cohere's scale, Granite's /)."""
    logits = model.get_output_embeddings()(h)
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
    if isinstance(getattr(cfg, "logit_scale", None), (int, float)):
        logits = logits * cfg.logit_scale
    if isinstance(getattr(cfg, "logits_scaling", None), (int, float)):
        logits = logits / cfg.logits_scaling
    return logits


_checked = weakref.WeakSet()  # models whose output_logits were compared with their own forward


def _check_output_logits(model, sequences, attention_mask):
    """Once per model: output_logits must equal the forward's logits, or every ratio and KL of
    training would silently be computed for another distribution than the one sampled from."""
    if model in _checked:
        return
    ids = sequences[0][attention_mask[0].bool()][None, :16]  # a few real tokens of one row
    mask = torch.ones_like(ids)
    with torch.no_grad(), autocast(sequences.device):
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask),
                     use_cache=False).logits.float()  # no cache: FSDP need not gather it all
        ours = output_logits(model, hidden_states(model, ids, mask)).float()
    if not torch.allclose(ours, full, rtol=1e-2, atol=1e-3 * (1 + full.abs().max().item())):
        raise NotImplementedError(
            f"{type(model).__name__} post-processes its logits in a way policy.output_logits does "
            f"not (max difference {(ours - full).abs().max().item():.3g}); add it there")
    _checked.add(model)


# ----------------------------------------------------------------------------- precision, loading

def low_precision(device):
    """The dtype computation runs in on `device`: bf16 on GPU, None (float32) elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else None


def autocast(device):
    """bf16 autocast on GPU (the fp32 master weights are kept), plain fp32 elsewhere. Every forward
    of training runs under it, rollouts included: sampling and scoring see the same numerics."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=low_precision(device) is not None)


def stop_token_ids(model, tokenizer):
    """The ids that end a rationale: generation_config's (chat models list several), else EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return eos if eos is not None else tokenizer.eos_token_id


def load(name_or_path, device="cpu", dtype=None, seed=0):
    """-> (model, tokenizer) in eval mode, float32 unless dtype says otherwise. "tiny" is a random
    0.3M Qwen2 (models/tiny: its config and tokenizer; `seed` draws its weights), "tiny-lm" the LM
    of tools/pretrain.py; else from_pretrained. The tokenizer pads left, with a pad token."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    builtin = str(name_or_path) in ("tiny", "tiny-lm")
    name = str(MODELS / name_or_path) if builtin else str(name_or_path)
    if (builtin or name.startswith((".", "/", "~")) or os.path.exists(name)) and \
            not os.path.isfile(os.path.join(name, "config.json")):  # local, not a hub "org/name"
        raise FileNotFoundError(f"{name} is not a saved model: no such folder, or no config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")  # not saved with it
        if str(name_or_path) == "tiny":
            with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name))
            model.generation_config = GenerationConfig.from_pretrained(name)
        else:
            model = AutoModelForCausalLM.from_pretrained(name)
    except (OSError, ValueError) as e:  # hub miss, offline, a folder without weights: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"could not load model {name!r}: not a local model folder, and "
                                f"the hub said: {first}") from e
    if tokenizer.pad_token is None:  # most base LMs have none; EOS is safe: masks go by position
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device=device, dtype=dtype or torch.float32).eval(), tokenizer
