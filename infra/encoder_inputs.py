"""evaluate.py's input checks: a model folder before it loads, a checkpoint's grace.json, the
numbers given to GraceEncoder / encode_texts, and sentence-transformers' `encode` arguments.

Each bad input is one line: a UsageError for the command line, and (ArgumentError) a ValueError
for the Python API, so either kind of caller catches what it expects.
"""
import json
import math
import numbers
import sys
from pathlib import Path

import numpy as np
import torch

from infra import runfolder
from infra.cli import UsageError


class ArgumentError(UsageError, ValueError):
    """A bad argument of the Python API: a ValueError, and evaluate.py's one-line UsageError."""


# argument: (lowest, highest, integer?). max_new_tokens has no fixed top: rationale_cap bounds it
# by the model's positions.
NUMBERS = dict(batch_size=(1, 1 << 20, True), max_new_tokens=(0, 1 << 62, True),
               max_length=(1, 1 << 40, True), seed=(0, 2 ** 63 - 1, True),
               threads=(1, 1024, True), temperature=(0.0, 100.0, False),
               top_p=(0.0, 1.0, False), truncate_dim=(1, 1 << 40, True))


def check_numbers(values):
    """Every value of `values` (a function's locals(), say) named in NUMBERS and not None is a
    number of the right kind in its range (top_p above 0); else ArgumentError naming it."""
    for name, value in values.items():
        if name not in NUMBERS or value is None:
            continue
        low, high, integer = NUMBERS[name]
        kind = numbers.Integral if integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ArgumentError(f"{name} must be {'an integer' if integer else 'a number'}, "
                                f"got {value!r}")
        if not integer and not math.isfinite(value):
            raise ArgumentError(f"{name} must be a finite number, got {value}")
        if not low <= value <= high or (name == "top_p" and value == 0):
            span = "(0, 1]" if name == "top_p" else f"[{low}, {high}]"
            raise ArgumentError(f"{name} must be in {span}, got {value}")


# ----------------------------------------------------------------------------- model folders

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_model_folder(name):
    """A local model folder that from_pretrained would choke on, in one line: no config.json,
    weights cut short (a copy or a save that did not finish), no tokenizer. Hub names and the
    built-in models pass."""
    path = Path(str(name))
    if str(name) in ("tiny", "tiny-lm") or not path.is_dir():
        return
    if not (path / "config.json").is_file():
        raise UsageError(f"{path}: not a saved model (no config.json)")
    if (path / runfolder.LORA_INFO).is_file() and not (path / "model.safetensors").is_file():
        raise UsageError(f"{path}: LoRA adapters only (--lora-export adapters); merge them into a "
                         f"model first: python train.py --out {path.parent} --resume "
                         "--lora-export merged")
    problem = runfolder._weights_problem(path)
    if problem and not any(path.glob("*.bin")):  # .bin: an older save format, left to transformers
        raise UsageError(f"{path}: {problem}; copy or save the model again")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(f"{path}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it "
                         "with tokenizer.save_pretrained(folder)")


def check_finite(model, name):
    """NaN or inf weights give NaN embeddings and meaningless scores: refuse them."""
    if not runfolder.is_finite_state(model):
        raise UsageError(f"{name}: the weights hold NaN or inf values (a diverged run?); "
                         "evaluate an earlier checkpoint")


def warn_if_stale(name):
    """One line when train.py marked the checkpoint stale in its grace.json: a resumed run went
    past it, so its weights are not the run's last ones (train.py re-exports it at the end)."""
    try:
        settings = json.loads((Path(str(name)) / "grace.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # none (a hub model), or unreadable: checkpoint_settings says so where it is used
    if isinstance(settings, dict) and settings.get("stale"):
        later = settings.get("superseded_by_step")
        print(f"warning: {name}: its grace.json says stale: its run went on past it"
              f"{f' (to step {later})' if later is not None else ''}; newer weights are in the "
              "run's step-N/ checkpoints", file=sys.stderr, flush=True)


# grace.json key: (what it must be, a check)
GRACE_JSON = dict(
    max_new_tokens=("an integer >= 0", lambda v: _int(v) and v >= 0),
    max_prompt_tokens=("an integer >= 1", lambda v: _int(v) and v >= 1),
    system_prompt=("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip())))


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check_grace_json(file, settings):
    """The values of a checkpoint's grace.json that evaluation uses: one line naming the field."""
    for key, (want, ok) in GRACE_JSON.items():
        if key in settings and settings[key] is not None and not ok(settings[key]):
            raise UsageError(f"{file}: field '{key}' must be {want}, got {settings[key]!r}")


def cap_rationale(config, settings, sources):
    """settings' max_new_tokens bounded by rationale_cap, in place; one line on stderr if cut."""
    settings["max_new_tokens"], note = rationale_cap(config, settings["max_length"],
                                                     settings["max_new_tokens"])
    if note:
        print(note, file=sys.stderr, flush=True)
        sources["max_new_tokens"] += ", capped"


def rationale_cap(config, max_length, max_new_tokens):
    """-> (max_new_tokens, note): at most the model's positions left after the longest prompt, so
    a huge value cannot grow the decode buffers until memory runs out; note is the line saying so,
    or None. A max_length that leaves no positions at all bounds the rationale by the positions."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or max_new_tokens + max_length <= positions:
        return max_new_tokens, None
    cap = positions - max_length if max_length < positions else positions
    if max_new_tokens <= cap:
        return max_new_tokens, None
    return cap, (f"note: rationale length {max_new_tokens} capped to {cap}: the model has "
                 f"{positions} positions, the prompt may take {max_length}")


# ------------------------------------------------------------------------- sentence-transformers

def st_options(options, hidden_size, device):
    """sentence-transformers' `encode` arguments -> what GraceEncoder does with them:
    dict(batch_size, progress, prompt, normalize, truncate_dim, tensor, numpy). Each one is
    honoured or refused in one line (ArgumentError; an unknown one: TypeError)."""
    o = dict(options)
    unknown = set(o) - {"prompt_name", "prompt", "batch_size", "show_progress_bar", "output_value",
                        "precision", "convert_to_numpy", "convert_to_tensor", "device",
                        "normalize_embeddings", "truncate_dim", "pool", "chunk_size"}
    if unknown:
        raise TypeError(f"GraceEncoder.encode got an unknown argument {sorted(unknown)[0]!r}")
    refused = [
        (o.get("prompt_name") is not None, "prompt_name: GraceEncoder has no named prompts; pass "
         "prompt=TEXT, or encode_query(..., instruction=TEXT)"),
        (o.get("output_value", "sentence_embedding") != "sentence_embedding",
         f"output_value={o.get('output_value')!r}: only 'sentence_embedding' (a pooled vector "
         "per text)"),
        (o.get("precision", "float32") != "float32",
         f"precision={o.get('precision')!r}: only 'float32'; quantise the result yourself"),
        (o.get("pool") is not None or o.get("chunk_size") is not None,
         "pool / chunk_size: no multi-process encoding; one GraceEncoder per device"),
        (o.get("device") is not None and torch.device(o["device"]) != torch.device(device),
         f"device={o.get('device')!r}: the encoder is on {device}; choose it when building it, "
         "GraceEncoder(..., device=...)"),
        (o.get("prompt") is not None and not isinstance(o.get("prompt"), str),
         f"prompt must be a string, got {o.get('prompt')!r}")]
    for bad, why in refused:
        if bad:
            raise ArgumentError(f"GraceEncoder.encode: {why}")
    check_numbers(o)
    if o.get("truncate_dim") is not None and o["truncate_dim"] > hidden_size:
        raise ArgumentError(f"truncate_dim must be at most the embedding size {hidden_size}, "
                            f"got {o['truncate_dim']}")
    for flag in ("show_progress_bar", "normalize_embeddings"):
        if o.get(flag) is not None and not isinstance(o[flag], bool):
            raise ArgumentError(f"{flag} must be True, False or None, got {o[flag]!r}")
    return dict(batch_size=o.get("batch_size"), progress=o.get("show_progress_bar"),
                prompt=o.get("prompt") or "", normalize=o.get("normalize_embeddings"),
                truncate_dim=o.get("truncate_dim"), tensor=bool(o.get("convert_to_tensor")),
                numpy=bool(o.get("convert_to_numpy", True)))


def shape_output(emb, opts, normalize):
    """(N, H) float32 numpy -> what sentence-transformers returns for these options: cut to
    truncate_dim (unit vectors again when normalised), a tensor, a list of tensors, or numpy."""
    if opts["truncate_dim"]:
        emb = emb[:, :opts["truncate_dim"]]
        if normalize:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if opts["tensor"]:
        return torch.from_numpy(emb)
    return emb if opts["numpy"] else list(torch.from_numpy(emb))


def set_threads(threads, device):
    """torch's CPU threads for evaluation (None: torch's own choice). One thread is the fastest
    for small models on a busy machine (the one thread rule: docs/training.md)."""
    if threads is not None and torch.device(device).type == "cpu":
        torch.set_num_threads(threads)

