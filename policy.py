"""The LLM as a policy (it writes rationales) and as an encoder (its hidden states are the embedding).

The GRACE embedding of a text, defined once here for training and evaluation alike (`encode`):

    prompt  = chat template(system instruction, text)            build_prompts
    y       ~ pi_theta(. | prompt)    a rationale                 rollout.sample
    h       = normalize(mean_t H_last[t]), t over text + y        embed (system prompt and padding excluded)

- load():           any causal LM folder or hub name, or the built-in "tiny" (random) and "tiny-lm" (pretrained here)
- encode():         texts -> n rationales each -> pooled embeddings: the one embedding path
- build_prompts():  system instruction + the text through the chat template, left-padded
- embed():          h = normalize(mean of the last hidden states over the pool mask)
- token_logprobs(): log pi(y_t | y_<t) of given tokens, in chunks so full-vocab logits never pile up
- output_logits():  the output layer and any logit post-processing, as the model's forward does it
"""
import json
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
    "tags, then write a comprehensive understanding of the text: its topic, its key facts and what it means."
)
# Used when a tokenizer has no chat template (e.g. base GPT-2).
FALLBACK_TEMPLATE = "System: {system}\n\nText: {text}\n\nAnalysis:"

ROOT = Path(__file__).resolve().parent
SAMPLE_DATA = ROOT / "data" / "sample_triples.jsonl"
TINY_LM = ROOT / "models" / "tiny-lm"  # made by pretrain.py, shipped with the repo
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------- loading

def load(name_or_path, device="cpu", dtype=None, seed=0):
    """-> (model, tokenizer) in eval mode. "tiny" builds a random 0.3M model offline (the demo and tests);
    "tiny-lm" is the small LM pretrained by pretrain.py; anything else goes to from_pretrained.

    The tokenizer pads on the left (prompts must end where generation starts) and always has a pad
    token. dtype None means float32: master weights for training; pass torch.bfloat16 to evaluate.
    """
    if str(name_or_path) == "tiny":
        model, tokenizer = build_tiny(seed)
    elif str(name_or_path) == "tiny-lm":
        if not (TINY_LM / "config.json").exists():
            raise FileNotFoundError(f"tiny-lm is missing from {TINY_LM}: rebuild it with `python pretrain.py`")
        model, tokenizer = _from_pretrained(str(TINY_LM))
    else:
        model, tokenizer = _from_pretrained(str(name_or_path))
    model.to(device=device, dtype=dtype or torch.float32)
    return model, tokenizer


def _from_pretrained(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    looks_local = name.startswith((".", "/", "~")) or os.path.exists(name)  # hub names are "org/name"
    if looks_local and not os.path.isdir(name):
        raise FileNotFoundError(f"model folder not found: {name}")
    if os.path.isdir(name) and not os.path.exists(os.path.join(name, "config.json")):
        raise FileNotFoundError(f"{name} is not a saved model: it has no config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")  # not saved as an attribute
        model = AutoModelForCausalLM.from_pretrained(name)
    except (OSError, ValueError) as e:  # hub miss, offline, or a folder without weights: one clear line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"could not load model {name!r}: not a local model folder, and the hub "
                                f"said: {first}") from e
    if tokenizer.pad_token is None:  # most base LMs have none; EOS is safe because masks go by position
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_device(name):
    """ValueError (one line) unless `name` is a device this machine has: cpu, cuda or cuda:N."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: this torch build or machine has no CUDA GPU; use --device cpu")


def stop_token_ids(model, tokenizer):
    """The ids that end a rationale: generation_config's (chat models list several, e.g. Qwen's
    <|im_end|> and <|endoftext|>), else the tokenizer's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return eos if eos is not None else tokenizer.eos_token_id


# ----------------------------------------------------------------------------- the GRACE embedding

@dataclass
class Encoded:
    rollout: rollout.Rollout  # (B*n, P+T) sequences and masks; rows text-major: text i -> rows i*n .. i*n+n-1
    embeddings: torch.Tensor  # (B*n, H) float32, L2-normalised
    pool_mask: torch.Tensor  # (B*n, P+T) the positions pooled: text + rationale
    prompts_cut: torch.Tensor  # (B,) bool: texts shortened to fit max_length
    logprobs: torch.Tensor | None = None  # (B*n, P+T) log pi(y_t | y_<t) of the rationale, with logprob_temperature


PROMPT_BUCKET = 64  # compiled sampling: prompts are padded to a multiple of this, so few shapes compile


@torch.no_grad()
def encode(model, tokenizer, texts, *, n=1, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0,
           system_prompt=DEFAULT_SYSTEM_PROMPT, max_length=1024, rationale=True, generator=None,
           compile=False, chunk_rows=None, sample_rows=None, logprob_temperature=None, sampler=None):
    """texts -> n rationales each -> Encoded: the rollouts and their pooled embeddings.

    The one definition of a GRACE embedding: training rewards it, the in-training STS check and
    evaluate.py score it. temperature 0 is greedy (evaluation's default); training samples its main
    rollouts at 1.0. rationale=False pools the prompt alone (the no-rationale baseline).
    compile: the static-cache, torch.compile'd sampler (rollout.sample), with prompt widths bucketed.
    chunk_rows bounds the rows of one embedding forward (activation memory on big models), sample_rows
    the rows sampled at once (the KV cache: rows x (prompt + max_new_tokens) positions in every layer).
    logprob_temperature: also score the rationale tokens under logits / T from the same hidden states
    (one forward instead of two: training's old log-probs).
    sampler: the module the rationales are sampled from, with model's weights (default: model itself;
    under FSDP a plain copy, see fsdp.decode_copy). Its device is where the work happens.
    """
    sampler = sampler or model
    device = next(sampler.parameters()).device
    ids, mask, start, cut = build_prompts(tokenizer, texts, system_prompt, max_length, return_truncated=True,
                                          pad_to=PROMPT_BUCKET if compile else 1)
    ids, mask, start = (x.repeat_interleave(n, 0).to(device) for x in (ids, mask, start))  # (B*n, P)
    if rationale:
        step = sample_rows or max(len(ids), 1)
        with autocast(device):  # bf16 on GPU, as the scoring forwards that follow
            ro = rollout.concat([rollout.sample(sampler, ids[s:s + step], mask[s:s + step], max_new_tokens,
                                                temperature=temperature, top_p=top_p, top_k=top_k,
                                                eos_token_id=stop_token_ids(model, tokenizer),
                                                pad_token_id=tokenizer.pad_token_id, generator=generator,
                                                compile=compile)
                                 for s in range(0, len(ids), step)], tokenizer.pad_token_id)
    else:
        ro = rollout.Rollout(ids, mask, torch.zeros_like(mask), torch.zeros(len(ids), dtype=torch.bool, device=device))
    pool = pool_mask_from(ro.attention_mask, start)  # text + rationale: no system prompt, no padding
    rows = chunk_rows or len(ids)
    embeddings, logprobs = [], []
    for s in range(0, len(ids), rows):
        seqs, am, cm = ro.sequences[s:s + rows], ro.attention_mask[s:s + rows], ro.completion_mask[s:s + rows]
        hidden = hidden_states(model, seqs, am)  # (rows, T, H): one forward serves both
        embeddings.append(mean_pool(hidden, pool[s:s + rows]))
        if logprob_temperature is not None:
            logprobs.append(logprobs_from_hidden(model, hidden, seqs, am, cm, logprob_temperature))
    return Encoded(ro, torch.cat(embeddings), pool, cut, torch.cat(logprobs) if logprobs else None)


def rationale_texts(tokenizer, ro):
    """The generated text of every row of a Rollout (special tokens such as EOS dropped)."""
    return [tokenizer.decode(seq[m.bool()], skip_special_tokens=True)
            for seq, m in zip(ro.sequences, ro.completion_mask)]


def rationale_stats(tokenizer, ro):
    """-> (texts, tokens (B,) long, empty (B,) bool) of every row of a Rollout: its decoded text, the
    tokens it wrote before its stop token, and whether it is empty: nothing but whitespace once
    decoded (EOS alone, or special or blank tokens only). Training's metrics and evaluation's
    summary both count with this."""
    texts = rationale_texts(tokenizer, ro)
    tokens = ro.completion_mask.sum(-1) - (~ro.truncated).long()  # a finished row's last token is its EOS
    return texts, tokens, torch.tensor([not t.strip() for t in texts], dtype=torch.bool)


# ----------------------------------------------------------------------------- prompts

def render_prompt(tokenizer, text, system_prompt=DEFAULT_SYSTEM_PROMPT):
    """The prompt as a string: chat template (system + user + generation prompt), or the fallback."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return FALLBACK_TEMPLATE.format(system=system_prompt, text=text)


def _tokenize_prompt(tokenizer, text, system_prompt):
    """-> (ids, index of the first token of the user text).

    The text's character offset is where a placeholder lands when the template is rendered with it
    (searching for the text itself fails for short texts like "a" that also occur in the template).
    Token offsets then map it to a position; everything from the text on is pooled.
    """
    placeholder = "\x00TEXT\x00"
    char_start = render_prompt(tokenizer, placeholder, system_prompt).index(placeholder)
    prompt = render_prompt(tokenizer, text, system_prompt)
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    starts = [i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > char_start]
    return enc["input_ids"], (starts[0] if starts else len(enc["input_ids"]))


def build_prompts(tokenizer, texts, system_prompt=DEFAULT_SYSTEM_PROMPT, max_length=1024,
                  return_truncated=False, pad_to=1):
    """-> input_ids (B, P), attention_mask (B, P), pool_start (B,) [, truncated (B,) bool].

    Left-padded. pool_start[i] is the first position of row i that pooling may use (the first token
    of the text, after padding and the system prompt). A text too long for max_length is cut (its
    tail goes) so the whole prompt fits; `truncated` says which were. pad_to rounds the width P up to
    a multiple (more left padding), so a compiled sampler sees a few prompt shapes, not one per batch.
    """
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
    P = -(-max(len(r) for r in rows) // pad_to) * pad_to
    input_ids = torch.full((len(rows), P), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, P - len(ids):] = 1
    pool_start = torch.tensor([P - len(ids) + s for ids, s in zip(rows, starts)], dtype=torch.long)
    out = (input_ids, attention_mask, pool_start)
    return out + (torch.tensor(cut),) if return_truncated else out


def pool_mask_from(attention_mask, pool_start):
    """(B, T) mask: attended positions from pool_start on (the text and everything generated)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    return attention_mask.bool() & (positions[None, :] >= pool_start.to(attention_mask.device)[:, None])


# ----------------------------------------------------------------------------- forward passes

def position_ids_from(attention_mask):
    """Positions count attended tokens only, so left padding does not shift them (GPT-2 needs this)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def low_precision(device):
    """The dtype computation runs in on `device`: bf16 on GPU, None (float32) elsewhere. autocast uses
    it; so do the models kept in it (the frozen reference, evaluation's weights, fsdp's decode copy)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else None


def autocast(device):
    """bf16 autocast on GPU (fast; the fp32 master weights are kept), plain fp32 elsewhere. Every
    forward of training runs under it, rollouts included, so sampling and scoring see the same numerics."""
    dtype = low_precision(device)
    return torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def hidden_states(model, sequences, attention_mask):
    """(B, T, H) last-layer hidden states (after the final norm), without computing any logits."""
    with autocast(sequences.device):
        out = model.base_model(input_ids=sequences, attention_mask=attention_mask,
                               position_ids=position_ids_from(attention_mask), use_cache=False)
    return out.last_hidden_state


def mean_pool(hidden, pool_mask):
    """h = normalize(sum_t m_t H_t / sum_t m_t): float32 mean over the mask, then L2-normalised."""
    m = pool_mask.bool().unsqueeze(-1)  # (B, T, 1)
    # where(), not a product: a padded position's state may be inf/NaN, and NaN * 0 is still NaN.
    summed = torch.where(m, hidden.float(), 0.0).sum(1)  # (B, H)
    return F.normalize(summed / m.sum(1).clamp(min=1), dim=-1)


@torch.no_grad()
def embed(model, sequences, attention_mask, pool_mask):
    """(B, H) float32 L2-normalised embedding: mean of the last hidden states over pool_mask."""
    return mean_pool(hidden_states(model, sequences, attention_mask), pool_mask)


def output_logits(model, h):
    """Logits of hidden states h (..., H) as the model's own forward makes them: the output layer, then
    what some architectures do after it (Gemma 2/3 soft-capping, Cohere's scale, Granite's divisor)."""
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
    """Once per model: output_logits must equal the forward's logits, or every ratio and KL of training
    would silently be computed for another distribution than the one the rollouts were sampled from."""
    if model in _checked:
        return
    ids = sequences[0][attention_mask[0].bool()][None, :16]  # a few real tokens of one row, no padding
    mask = torch.ones_like(ids)
    with torch.no_grad(), autocast(sequences.device):
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask),
                     use_cache=False).logits.float()  # (one forward, no cache: FSDP need not gather it all)
        ours = output_logits(model, hidden_states(model, ids, mask)).float()
    if not torch.allclose(ours, full, rtol=1e-2, atol=1e-3 * (1 + full.abs().max().item())):
        raise NotImplementedError(f"{type(model).__name__} post-processes its logits in a way policy.output_logits "
                                  f"does not (max difference {(ours - full).abs().max().item():.3g}); add it there")
    _checked.add(model)


def _chunk_logprobs(model, h, targets, temperature):
    logits = output_logits(model, h).float() / temperature  # (n, V) float32: only one chunk's worth at a time
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # (n,)


def token_logprobs(model, sequences, attention_mask, completion_mask, temperature=1.0, chunk_size=1024):
    """(B, T) float32 log pi(x_t | x_<t) on completion_mask positions, 0 elsewhere.

    Only masked positions get logits, `chunk_size` rows at a time. With gradients on, each chunk is
    recomputed in backward (checkpoint), so the float32 (n, V) logits are never all kept at once.
    `temperature` scores tokens under logits / T: use the temperature the tokens were sampled at.
    """
    hidden = hidden_states(model, sequences, attention_mask)  # (B, T, H)
    return logprobs_from_hidden(model, hidden, sequences, attention_mask, completion_mask, temperature, chunk_size)


def logprobs_from_hidden(model, hidden, sequences, attention_mask, completion_mask, temperature=1.0, chunk_size=1024):
    """token_logprobs from last hidden states (B, T, H) already computed (encode reuses its pooling forward)."""
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


# ----------------------------------------------------------------------------- the built-in tiny model
# Scaffolding for the demo and the tests, kept out of the reading path above.

def build_tiny(seed=0):
    """A ~0.3M-parameter random Qwen2 with a byte-level BPE tokenizer trained here, in milliseconds.

    Same seed, same weights; the tokenizer is the same for every seed. Saves and loads like any hub model.
    """
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, attention_dropout=0.0,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer  # from_config starts in train mode


def build_tiny_tokenizer(vocab_size=1024, corpus=None):
    """Byte-level BPE trained on `corpus` (default: the project's sample sentences), as a Qwen2Tokenizer.

    Trained with Qwen2's own pre-tokenizer and normaliser, because AutoTokenizer rebuilds those for a
    qwen2 folder: any other choice would give different ids after save + load.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_tiny_corpus() if corpus is None else corpus, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", unk_token=None, padding_side="left")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _tiny_corpus():
    lines = [DEFAULT_SYSTEM_PROMPT, FALLBACK_TEMPLATE, "<think> </think>"]
    for line in SAMPLE_DATA.read_text(encoding="utf-8").splitlines():
        lines.extend(json.loads(line).values())
    return lines
