"""The run folder: one run at a time, its settings, its metrics, its checkpoints,
and which one to resume.

    OUT/.lock            flock held for the whole run, holding the runner's pid
    OUT/config.json      the resolved settings
    OUT/metrics.jsonl    one JSON object per step (NaN and inf are written as null)
    OUT/step-N/          a checkpoint: from_pretrained-loadable model + tokenizer, and
                         trainer_state.pt (step, RNG states, ... and the optimizer state);
                         README.md when a card is given
    OUT/final/           the export of a completed run: model + tokenizer (+ README.md), no
                         optimizer state; once a resumed run saves a later step-N, its grace.json
                         says "stale": true, "superseded_by_step": N (until that run re-exports it)
    OUT/abandoned/       what a run set aside, never deleted: later checkpoints when it resumes
                         from an earlier one (with their final/); a fresh start's predecessor
                         without checkpoints (its final/, metrics, settings); with keep_last their
                         optimizer state is dropped (the weights stay)
    OUT/tensorboard/     --report-to tensorboard: the metrics as event files

Every write survives a kill at any moment: a folder is written as OUT/.tmp-NAME, fsynced, then
renamed into place (a rename is atomic), so a step-N folder is always complete; a file is written
beside itself and os.replace'd over. What a kill leaves behind (.tmp-*) clean_orphans() removes at
the next start. Re-saving a folder that exists moves the old one aside as .old-NAME only once the
new one is complete; should a kill fall between the two renames, clean_orphans() puts the old one
back.

keep_last prunes whole checkpoints: each one kept holds its own optimizer state (AdamW: twice the
weights), so any of them can be resumed exactly.

final/ is replaced by the run that owns it only: the one that ends in this folder. Nothing else
overwrites or deletes it: a fresh start moves it to abandoned/, a resume from a step before it too.
"""
import errno
import fcntl
import json
import math
import os
import random
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

import lora
import policy
from infra import console, fsdp
from infra.cli import TrainingError, UsageError

STEP = re.compile(r"step-(\d+)")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
ADAPTERS, LORA_INFO = "adapters.safetensors", "lora.json"  # --lora-rank: the weights of step-N/
TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


class CheckpointError(RuntimeError):
    """A run-folder problem, as one line (the CLIs print it and exit 2)."""


# ----------------------------------------------------------------------------- the lock

@contextmanager
def lock(out):
    """Hold OUT for this run: two runs writing one folder would interleave their checkpoints.

    flock, not a pid file: the kernel releases it when the process dies, so a kill never leaves a
    stale lock. The .lock file itself stays (removing it would race with a run taking it).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CheckpointError(f"cannot create {e.filename or out}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise CheckpointError(f"{out} is in use by another run (pid {pid}); wait for it or "
                                  "pass another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield out
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def clean_orphans(out):
    """Remove what a kill left (.tmp-* files and folders; .old-NAME beside a complete NAME)
    -> removed paths. An .old-NAME whose NAME is missing was complete: it is renamed back. Call
    under the lock only."""
    out, removed = Path(out), []
    for p in sorted(out.glob(".old-*")):
        if not (out / p.name[5:]).exists():
            os.replace(p, out / p.name[5:])  # the kill fell between the two renames of a re-save
            continue
        _remove(p)
        removed.append(p)
    for p in sorted(out.glob(".tmp-*")):
        _remove(p)
        removed.append(p)
    _fsync(out)
    return removed


def _remove(p):
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


# ----------------------------------------------------------------------------- config and metrics

def write_config(out, settings):
    """OUT/config.json: the resolved settings
    (values JSON cannot hold, such as paths, as strings)."""
    _atomic_write(Path(out) / "config.json", json.dumps(settings, indent=2, default=str) + "\n")


def read_config(out):
    """OUT/config.json as a dict, or None when the folder has none."""
    path = Path(out) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def append_metrics(out, row):
    """One line of OUT/metrics.jsonl, flushed and fsynced. NaN and inf become null: strict JSON has
    neither, and a NaN in the file would break every JSON reader downstream."""
    line = json.dumps(_finite(row), allow_nan=False) + "\n"
    path = Path(out) / "metrics.jsonl"
    try:
        with open(path, "a+b") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - 1))
            if end and f.read(1) != b"\n":
                # a kill cut the last line short: start a fresh line, never extend it
                line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _error(e, out, path) from None


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def truncate_metrics(out, after_step):
    """Keep the rows with step <= after_step (the resumed run redoes the rest) and drop a line a
    kill cut short -> the number of rows kept. Atomic: a kill leaves the old file or the new, never
    neither."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return 0
    keep = [line for line in path.read_text(encoding="utf-8").split("\n")
            if _step_of(line) <= after_step]
    _atomic_write(path, "".join(line + "\n" for line in keep))
    return len(keep)


def _step_of(line):
    """A metrics row's step; a cut-short or foreign line counts as after every step."""
    try:
        step = json.loads(line)["step"]
        return step if isinstance(step, int) else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


def _atomic_write(path, text):
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _error(e, path.parent, path) from None


# ----------------------------------------------------------------------------- saving

def save(out, step, model, tokenizer, trainer_state, *, optimizer_state=None, keep_last=None,
         card=None, files=None, state_dict=None, adapters=None):
    """OUT/step-N/ (model, tokenizer, trainer_state.pt with the optimizer state, README.md = card,
    and `files`: {name: text}), complete or absent; then, with keep_last, only the keep_last newest
    remain. state_dict: the weights to write instead of the model's own (a sharded model's gathered
    full state); adapters: LoRA's tensors, written instead of any weights (see _write_folder)."""
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    if trainer_state.get("step", step) != step:
        raise ValueError(f"trainer_state['step'] is {trainer_state['step']}, saving step {step}")
    state = dict(trainer_state, step=step, optimizer=optimizer_state)
    final = _write_folder(Path(out), f"step-{step}", model, tokenizer, card, state, files,
                          state_dict, adapters)
    if keep_last:
        older = [p for p in checkpoints(out) if p != final]
        for old in older[:max(0, len(older) + 1 - keep_last)]:  # oldest first
            _discard(old)
    return final


def export_final(out, model, tokenizer, card=None, files=None, state_dict=None, adapters=None):
    """OUT/final/: the trained model + tokenizer (+ README.md card, `files`),
    nothing to resume from."""
    return _write_folder(Path(out), "final", model, tokenizer, card, None, files, state_dict,
                         adapters)


def _write_folder(out, name, model, tokenizer, card, state, files=None, state_dict=None,
                  adapters=None):
    """Write OUT/.tmp-NAME, make it readable and durable, rename it to OUT/NAME -> OUT/NAME.
    adapters ({name: tensor}, LoRA): ADAPTERS and the model's config instead of its weights (the
    base model is named in LORA_INFO, among `files`)."""
    from safetensors.torch import save_file
    from transformers.utils import logging

    tmp, final = out / f".tmp-{name}", out / name
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        bars = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()  # a "Writing model shards" bar would break the training bar
        try:
            if adapters is None:
                model.save_pretrained(tmp, state_dict=state_dict)
            else:
                tmp.mkdir(parents=True)
                model.config.save_pretrained(tmp)
                save_file({k: v.cpu() for k, v in adapters.items()}, tmp / ADAPTERS)
        finally:
            if bars:  # (as it was: train.py's main turns them off for good)
                logging.enable_progress_bar()
        tokenizer.save_pretrained(tmp)
        for file_name, text in (files or {}).items():
            (tmp / file_name).write_text(text, encoding="utf-8")
        if state is not None:
            # a file object: a full disk surfaces as OSError
            with open(tmp / "trainer_state.pt", "wb") as f:
                torch.save(state, f)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        # safetensors writes 0600: others could not load the model
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        fsync_tree(tmp)
        _swap_in(tmp, final)
    except BaseException as e:  # a failure or Ctrl-C: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if _no_space(e) or isinstance(e, OSError):
            raise _error(e, out, final) from e
        raise
    return final


def _swap_in(tmp, final):
    """Rename tmp to final; an existing final is moved aside first and deleted only once the new
    one is in place (and back if the rename fails)."""
    old, replacing = final.with_name(f".old-{final.name}"), final.exists()
    if replacing:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if replacing:
            os.replace(old, final)
        raise
    _fsync(final.parent)  # the new one is durable before the old one goes
    # a leftover is clean_orphans' job; the save itself succeeded
    shutil.rmtree(old, ignore_errors=True)


def _discard(path):
    """Delete a checkpoint: renamed first, so a kill mid-delete leaves a .tmp-* orphan,
    not half a step-N."""
    doomed = path.with_name(f".tmp-del-{path.name}")
    try:
        os.replace(path, doomed)
        shutil.rmtree(doomed)
    except OSError as e:
        raise _error(e, path.parent, path) from None


def _no_space(e):
    """ENOSPC anywhere in the exception chain:
    safetensors and torch.save wrap it in their own errors."""
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _error(e, out, path):
    if _no_space(e):
        return CheckpointError(f"no space left on the device at {out}")
    why = getattr(e, "strerror", None) or _first_line(e)
    return CheckpointError(f"cannot write {getattr(e, 'filename', None) or path}: {why}")


def _first_line(e):
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def fsync_tree(path):
    """fsync every file under path, then every folder bottom-up (a rename is durable only once its
    folder is): after this a power cut cannot leave the tree half on disk."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def _fsync(path):
    """fsync a file or a folder (on Linux a folder opens read-only too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_finite_state(model):
    """Every parameter finite: checked before saving, so a NaN never becomes
    the checkpoint to resume."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------------------- finding and resuming

def checkpoints(out):
    """OUT/step-N folders, oldest first (other names are ignored)."""
    found = [p for p in Path(out).glob("step-*") if STEP.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def loadable(path):
    """-> (ok, reason): config, weights (not cut short), tokenizer and a readable trainer_state.pt
    whose step matches the folder's name. Reads headers only, and the state memory-mapped: cheap at
    resume."""
    path = Path(path)
    if not path.is_dir():
        return False, f"{path} is not a folder"
    if not (path / "config.json").is_file():
        return False, "config.json is missing"
    weights = _weights_problem(path)
    if weights:
        return False, weights
    if not (path / "tokenizer_config.json").is_file() or \
            not any((path / f).is_file() for f in TOKENIZER):
        return False, "tokenizer files are missing"
    try:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False,
                           mmap=True)
    except FileNotFoundError:
        return False, "trainer_state.pt is missing"
    # a cut-short zip fails in several ways (RuntimeError, EOFError, pickle errors)
    except Exception as e:
        return False, f"trainer_state.pt is unreadable ({_first_line(e).split('. ')[0]})"
    match = STEP.fullmatch(path.name)
    if not isinstance(state, dict) or (match and state.get("step") != int(match[1])):
        return False, ("trainer_state.pt is for step "
                       f"{state.get('step') if isinstance(state, dict) else '?'}")
    return True, "ok"


def _weights_problem(path):
    """None if the safetensors weights (single file, or every shard of the index) are whole."""
    if (path / ADAPTERS).is_file():  # LoRA: the adapters (the base model: LORA_INFO)
        shards = [ADAPTERS]
    elif (path / WEIGHTS[1]).is_file():
        try:
            shards = sorted(set(
                json.loads((path / WEIGHTS[1]).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return f"{WEIGHTS[1]} is unreadable"
    elif (path / WEIGHTS[0]).is_file():
        shards = [WEIGHTS[0]]
    else:
        return "model.safetensors is missing"
    for shard in shards:
        if not _safetensors_whole(path / shard):
            return f"{shard} is missing or cut short"
    return None


def _safetensors_whole(file):
    """The file is as long as its header says:
    8-byte header size, JSON header, then the tensor bytes."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                  default=0)
        return file.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError):
        return False


def resume_point(out, requested="latest", check=None):
    """-> (checkpoint to resume, [(skipped path, why)]): the newest loadable step-N, falling back
    past broken ones; or `requested`, a checkpoint folder (a path, or a step-N name inside OUT).
    check(path): a deeper test (loading it), whose exception skips the checkpoint too."""
    if requested != "latest":
        path = Path(requested) if Path(requested).exists() else Path(out) / requested
        if not path.exists():  # a typo, or a checkpoint --keep-last already pruned
            have = ", ".join(p.name for p in checkpoints(out)) or "none"
            raise CheckpointError(f"cannot resume from {requested}: no such folder (checkpoints "
                                  f"in {out}: {have})")
        ok, why = _usable(path, check)
        if not ok:
            raise CheckpointError(f"cannot resume from {requested}: {why}")
        return path, []
    skipped = []
    for path in reversed(checkpoints(out)):
        ok, why = _usable(path, check)
        if ok:
            return path, skipped
        skipped.append((path, why))
    reasons = "".join(f"; {p.name}: {why}" for p, why in skipped)
    raise CheckpointError(f"no checkpoint to resume in {out}{reasons}")


def _usable(path, check):
    ok, why = loadable(path)
    if ok and check is not None:
        try:
            check(path)
        except Exception as e:  # whatever a corrupt file raises (json, safetensors, torch, ...)
            return False, _first_line(e.__cause__ if isinstance(e, FileNotFoundError) and
                                      e.__cause__ else e)
    return ok, why


def read_state(path):
    """The trainer state dict of a checkpoint folder (or of a trainer_state.pt file)."""
    path = Path(path)
    file = path / "trainer_state.pt" if path.is_dir() else path
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{file}: unreadable ({_first_line(e)})") from None


def set_aside_after(out, step):
    """Resuming from `step`: move every later step-M to OUT/abandoned/step-M (never deleted: they
    are a run's results) -> their new paths. A name already taken there gets a suffix:
    step-M.1, step-M.2, ..."""
    return [_aside(path, Path(out) / "abandoned") for path in checkpoints(out)
            if int(path.name[5:]) > step]


# --------------------------------------------------------------------- starting and resuming a run

def settle(out, resumed_step=None):
    """Under the lock, before a run writes: remove what a kill left half-written; when resuming
    from resumed_step, set later checkpoints aside and drop the metrics of the steps to be redone;
    a fresh run needs a folder without checkpoints, and moves aside (never deletes) the metrics and
    settings of a run that crashed before its first one. -> notes for the user."""
    out = Path(out)
    clean_orphans(out)
    if resumed_step is not None:
        notes = [f"resuming from step {resumed_step}: the later {p.name} was moved to {p.parent}"
                 for p in set_aside_after(out, resumed_step)]
        final_step = _final_info(out).get("step")
        if isinstance(final_step, int) and final_step > resumed_step:  # the later run's model
            dest = _aside(out / "final", out / "abandoned")
            notes.append(f"resuming from step {resumed_step}: the later final/ (step {final_step})"
                         f" was moved to {dest}")
        truncate_metrics(out, resumed_step)
        return notes
    if checkpoints(out):
        raise CheckpointError(f"{out}/ already holds a run; pass --resume to continue it, "
                              "or --out NEW_DIR")
    leftovers = [out / name for name in ("final", "metrics.jsonl", "config.json", "tensorboard")
                 if (out / name).exists()]
    if not leftovers:
        return []
    aside = out / "abandoned" / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for path in leftovers:
        os.replace(path, aside / path.name)
    _fsync(aside), _fsync(out)
    if (aside / "final").exists():  # a finished run whose step-N folders are gone: keep its model
        return [f"{out}/ held an earlier run with no step-N checkpoint left to resume; its final/ "
                f"(the model) and its files were moved to {aside}"]
    return [f"{out}/ held a run that saved no checkpoint; its files were moved to {aside}"]


def _aside(path, folder):
    """Move path into folder (created), as folder/NAME, NAME.1, NAME.2, ... -> its new path."""
    folder.mkdir(exist_ok=True)
    dest, k = folder / path.name, 0
    while dest.exists():
        k += 1
        dest = folder / f"{path.name}.{k}"
    os.replace(path, dest)
    _fsync(folder), _fsync(path.parent)
    return dest


def _final_info(out):
    """OUT/final/grace.json as a dict ({} when there is none or it is unreadable)."""
    try:
        info = json.loads((Path(out) / "final" / "grace.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def mark_final_stale(out, step):
    """A checkpoint of `step` was saved after OUT/final/ was exported (a resumed run went past it):
    final/grace.json says "stale": true, "superseded_by_step": step, so that no one takes the old
    model for the run's result. -> final/'s step the first time it is marked, else None."""
    info = _final_info(out)
    if not isinstance(info.get("step"), int) or info["step"] >= step or \
            info.get("superseded_by_step") == step:
        return None
    _atomic_write(Path(out) / "final" / "grace.json",
                  json.dumps(dict(info, stale=True, superseded_by_step=step), indent=1) + "\n")
    return None if info.get("stale") else info["step"]


def prune_abandoned(out):
    """keep_last bounds abandoned/ too: its checkpoints keep their weights (loadable models, never
    deleted) and drop their optimizer state (AdamW: twice the weights) -> the folders pruned."""
    pruned = []
    for file in sorted((Path(out) / "abandoned").glob("**/trainer_state.pt")):
        try:
            state = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
        except Exception:  # unreadable: not ours to fix; it stays as it is
            continue
        if not isinstance(state, dict) or state.get("optimizer") is None:
            continue
        tmp = file.with_name(f".tmp-{file.name}")
        try:
            with open(tmp, "wb") as f:
                torch.save(dict(state, optimizer=None), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, file)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _error(e, file.parent, file) from None
        pruned.append(file.parent)
    return pruned


def merge_settings(saved, current, given, may_change, keep_current=()):
    """A resumed run's settings -> (merged, changed, refused). The saved value wins for every
    setting not given on the command line; a given one that differs is applied if in may_change
    (and listed in `changed`), else listed in `refused`. keep_current: settings never taken from
    the saved run."""
    merged, changed, refused = {}, [], []
    for k, old in saved.items():
        if k in keep_current or k not in current:
            continue
        new = current[k]
        if k not in given or new == old:
            merged[k] = old
        else:
            (changed if k in may_change else refused).append(
                f"--{k.replace('_', '-')} {old} -> {new}")
    return merged, changed, refused


def rng_state(generator):
    """Every RNG a step draws from: torch's, Python's, the sampler's generator, CUDA's."""
    return dict(torch=torch.get_rng_state(), python=random.getstate(),
                sampler=generator.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"]), random.setstate(state["python"]), \
        generator.set_state(state["sampler"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------- checkpoint folders for other tools

ST_GUARD_MESSAGE = (
    "This is a GRACE checkpoint, not a sentence-transformers model: its embedding of a text is "
    "the mean of the hidden states over the text AND a rationale the model first writes, which "
    "sentence-transformers cannot compute (plain pooling gives other, wrong vectors). "
    "Embed with grace instead: "
    "`from grace import GraceEncoder; GraceEncoder(FOLDER).encode(texts)`, or "
    "`python evaluate.py --model FOLDER --tasks ...`.")


def st_guard_files():
    """{file name: text} for a checkpoint folder, so that SentenceTransformer(folder)
    (and `mteb run -m folder`, which loads it through sentence-transformers) fails with
    ST_GUARD_MESSAGE instead of silently mean-pooling without the rationale. modules.json makes
    sentence-transformers read the folder as its own model (without it, it builds Transformer +
    mean pooling); config_sentence_transformers.json declares a requirement nothing meets
    (python<0; 'python' is never offered to pip install), which sentence-transformers >= 6 checks
    before loading any module, and prints with our reason. Older versions skip that check and fail
    importing the module type named in modules.json instead."""
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "grace_checkpoint_not_loadable_by_sentence_transformers.UseGraceEncoder"}]
    config = {"requirements": {"python": {"specifier": "<0", "reason": ST_GUARD_MESSAGE}},
              "model_type": "SentenceTransformer"}
    return {"modules.json": json.dumps(modules, indent=2) + "\n",
            "config_sentence_transformers.json": json.dumps(config, indent=2) + "\n"}


def model_card(settings):
    """README.md text for a checkpoint folder, from its grace.json settings."""
    shown = "\n".join(f"- `{k}`: {json.dumps(v)}" for k, v in settings.items())
    return f"""# GRACE checkpoint

A chat LLM trained with GRACE (reinforcement learning) to be a text encoder. For each text \
the model
first writes a rationale; the embedding is the L2-normalised mean of its last hidden states \
over the
text and that rationale (the system prompt excluded). It stays a causal LM: \
`from_pretrained` loads it.

```python
from grace import GraceEncoder  # pip install . in the grace repository (in a clone: evaluate)
embeddings = GraceEncoder("path/to/this/folder").encode(["a text", "another text"])
```

MTEB scores: `python evaluate.py --model path/to/this/folder --tasks STSBenchmark.v2,SciFact`

Do not load this folder with sentence-transformers or `mteb run -m`: their plain pooling skips the
rationale and gives other, wrong embeddings (the folder's modules.json makes them fail on purpose).

Training settings (grace.json):
{shown}
"""


# --------------------------------------------------------------------------- train.py's run folder

# Settings a resumed run may change: each change is applied and announced. Any other flag
# given with --resume must match the saved run (or --force-resume applies it too: the run is
# then another run).
RESUME_MAY_CHANGE = {"steps", "epochs", "lr", "weight_decay", "max_grad_norm", "save_every",
                     "keep_last", "eval_every", "eval_pairs", "eval_data", "log_rationales",
                     "device", "threads", "compile", "report_to", "lora_export"}
NOT_SETTINGS = {"resume", "force_resume", "out", "system_prompt_file", "config"}  # (prompt: saved)
# where it runs, not what it computes: never taken from the saved run
MACHINE = {"device", "threads", "compile"}
# what train.py's trainer_state.pt holds (and a checkpoint must hold to be resumed)
TRAINER_STATE = ("step", "epoch", "position", "prompts_cut", "rng", "args", "optimizer")


def resume(args, given, rank, world=1):
    """The state to start from -> (state, checkpoint folder or None, its trainer state or None,
    its (policy, tokenizer) loaded on args.device or None).
    --resume: the newest checkpoint that loads (a broken one is skipped, named); the saved run's
    settings win (flags may change only RESUME_MAY_CHANGE, applied and announced; anything else,
    another KL reference model or another number of processes needs --force-resume, and is
    announced). Without it, a folder that holds a run is refused."""
    out = Path(args.out)
    state = dict(step=0, epoch=0, position=0, prompts_cut=0, base_model=args.model)
    if not args.resume:
        if checkpoints(out):
            raise UsageError(f"{out}/ already holds a run; pass --resume to continue it, "
                             "or --out NEW_DIR")
        return state, None, None, None
    found = {}
    try:
        resume_from, skipped = resume_point(out, args.resume,
                                            check=lambda path: _load(path, args, found))
    except CheckpointError as e:
        raise UsageError(f"--resume: {e}") from None
    for bad, why in skipped if rank == 0 else ():
        print(f"note: skipping {bad}: {why}", flush=True)
    saved = found["saved"]
    # a run saved before --system-prompt existed was trained with policy's default: it keeps it
    old = dict({"system_prompt": policy.DEFAULT_SYSTEM_PROMPT}, **saved["args"])
    may_change = set(vars(args)) if args.force_resume else RESUME_MAY_CHANGE
    merged, changed, refused = merge_settings(old, vars(args), given, may_change,
                                              keep_current=NOT_SETTINGS | MACHINE)
    saved_world = saved.get("world", len(saved["rng"]) if saved["rng"] else world)
    if saved_world != world and not args.force_resume:  # each rank's share of a batch changes
        refused.append(f"the processes {saved_world} -> {world}")
    if refused:
        raise UsageError("--resume continues the saved run, which differs in: "
                         f"{', '.join(refused)}; drop these flags (or run it as it ran), or pass "
                         "--force-resume to apply them anyway")
    vars(args).update(merged)
    if "epochs" in given and "steps" not in given:
        args.steps = None  # --epochs sets the length: the steps are recounted from it
    state.update({k: saved[k] for k in TRAINER_STATE[:4]}, rng=saved["rng"],
                 base_model=saved.get("base_model", old["model"]))
    if rank == 0:
        for note in resume_notes(args, old, changed, saved_world, world, resume_from, state):
            print(f"note: {note}", flush=True)
    return state, resume_from, saved, found["policy"]


def _load(path, args, found):
    """A checkpoint as train.py resumes it: every JSON file parses, the trainer state is whole and
    the policy loads (weights of config.json's shapes). Raises naming the file; fills `found`."""
    for file in sorted(Path(path).glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{file.name} is not valid JSON ({_first_line(e)})") from None
    saved = read_state(path)
    missing = [k for k in TRAINER_STATE if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise CheckpointError(f"trainer_state.pt lacks {', '.join(missing)}")
    if saved["optimizer"] is None:
        raise CheckpointError("trainer_state.pt holds no optimizer state (pruned by --keep-last "
                              "in abandoned/: evaluate it, or start a run from it with --model)")
    from transformers.utils import logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # a mismatch is reported here in one line, not as a table
    logging.disable_progress_bar()  # (nor a bar before a refusal of the settings)
    try:
        loaded = load_adapters(path, args, saved) if (Path(path) / LORA_INFO).is_file() else \
            policy.load(path, device=args.device, seed=args.seed)
    except RuntimeError as e:  # (transformers' table of the mismatches is silenced above)
        raise CheckpointError("its weights do not fit its config.json (tensor shapes differ)"
                              if "mismatch" in str(e) else _first_line(e)) from None
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    found.update(saved=saved, policy=loaded)


def load_adapters(path, args, saved=None):
    """A LoRA folder (LORA_INFO, ADAPTERS) -> (its base model with the adapters, tokenizer). The
    base is loaded by name (a built-in tiny by the run's seed); KeyError: adapters of another."""
    from safetensors.torch import load_file

    info = json.loads((Path(path) / LORA_INFO).read_text(encoding="utf-8"))
    seed = (saved or {}).get("args", {}).get("seed", args.seed)
    model, tok = policy.load(info["base_model"], device=args.device, seed=seed)
    lora.add(model, info["rank"], info["alpha"], info["dropout"], info["targets"])
    lora.load_state_dict(model, load_file(Path(path) / ADAPTERS, device=str(args.device)))
    return model, tok


def lora_files(args, state):
    """{LORA_INFO: text}: how to rebuild the adapted model (base_model: by name, not copied)."""
    info = dict(base_model=state.get("base_model", args.model), rank=args.lora_rank,
                alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.lora_targets)
    return {LORA_INFO: json.dumps(info, indent=1) + "\n"}


def resume_notes(args, old, changed, saved_world, world, resume_from, state):
    """What a resume changes, one line each: flags, the KL reference model, the processes."""
    notes = ["resuming with changed settings: " + ", ".join(changed)] if changed else []
    if args.model != old["model"]:
        uses = "the KL reference from here on" if args.kl_coef and args.objective == "grpo" \
            else "not used (no KL reference: --kl-coef 0 or --objective contrastive)"
        notes.append(f"--model {args.model} (--force-resume): the policy continues from "
                     f"{resume_from} (trained from {state['base_model']}); {args.model} is "
                     f"{uses}; grace.json records both")
    if saved_world != world:
        notes.append(f"{resume_from} was trained on {saved_world} process(es), this run has "
                     f"{world} (--force-resume): the batch sizes are global, but each process's "
                     "share of a rollout batch (its reward groups, token-mean and sampling seed) "
                     "changes, and the sampling seeds start afresh")
    return notes


def optimizer(model, args, saved=None):
    """AdamW over the model's trainable parameters (--lora-rank: the adapters only); resuming
    (saved: the checkpoint's trainer state), with its saved state, and this run's lr and weight
    decay."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    if saved is not None:
        if args.fsdp:  # saved as a full state dict keyed by parameter name; each rank its slices
            fsdp.load_optimizer_state(model, opt, saved["optimizer"])
        else:
            opt.load_state_dict(saved["optimizer"])
        for group in opt.param_groups:  # the saved param_groups hold the old values: the flags win
            group.update(lr=args.lr, weight_decay=args.weight_decay)
    return opt


def announce(args, records, world, resume_from):
    """The one line a run starts with: what it trains, on what, how long, where."""
    print(f"grace: {args.objective} ({args.mode}) on {records} records, model {args.model}, "
          f"preset {args.preset}, {args.steps} steps of {args.batch_size} texts x "
          f"G={args.group_size}, {world} process(es) on {args.device}"
          + (f", from {resume_from}" if resume_from else ""), flush=True)


def start(out, resumed_step, args):
    """Settle the folder for this run (what settle() did is printed; with --keep-last the
    optimizer state in abandoned/ is dropped) and write its config.json."""
    notes = settle(out, resumed_step)
    if args.keep_last:
        notes += [f"--keep-last: {p} keeps its weights, its optimizer state was dropped"
                  for p in prune_abandoned(out)]
    for note in notes:
        print(f"note: {note}", flush=True)
    write_config(out, settings(args))


def settings(args):
    """The run's resolved settings (JSON-safe): config.json and every checkpoint carry them."""
    return {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS and k[0] != "_"}


class Reporter:
    """Where each step goes: a line of metrics.jsonl; the progress bar on a terminal, else a plain
    line every 30 s (infra/console.py); --report-to tensorboard's event files; the in-training STS
    result (x100, as evaluate.py prints it) and every --log-rationales steps a rationale."""

    def __init__(self, out, args, initial, rank):
        self.out, self.args, self.board = Path(out), args, None
        self.bar = console.progress_bar(total=args.steps, initial=initial, unit="step",
                                        desc="train", disable=True if rank else None)
        if rank == 0 and args.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # cli.check_run: it is installed
            # resumed: the events of the steps redone are purged, as metrics.jsonl's rows are
            self.board = SummaryWriter(str(self.out / "tensorboard"),
                                       purge_step=initial + 1 if initial else None)

    def step(self, state, metrics, record, rationale):
        step, args = state["step"], self.args
        row = dict(step=step, epoch=state["epoch"], **metrics)
        append_metrics(self.out, row)
        for k, v in list(row.items())[1:] if self.board is not None else ():
            self.board.add_scalar(k, v, step)  # every metric, as metrics.jsonl holds it
        names = {"cos_between_texts": "collapse", "sts_dev": "sts"}
        shown = {names.get(k, k): f"{metrics[k]:.3g}" for k in (
            "reward", "kl", "loss", "accuracy", "cos_between_texts", "rationale_len",
            "tokens_per_s", "sts_dev") if k in metrics}
        self.bar.set_postfix(shown)
        self.bar.update(1)
        if "sts_dev" in metrics:
            tqdm.write(f"[step {step}] STS Spearman x100 on {Path(args.eval_data).name}: "
                       f"{metrics['sts_dev']:.1f}")
        if args.log_rationales and step % args.log_rationales == 0:
            text = record.get("positive", record.get("text"))
            tqdm.write(f"[step {step}] text: {text[:200]}\n  rationale: {rationale[:400]!r}")

    def close(self):
        self.bar.close()
        if self.board is not None:
            self.board.close()


def save_step(out, model, tok, opt, state, args, generator, rank, world):
    """OUT/step-N/ (rank 0 writes; every rank's RNG state goes in,
    so each resumes its own stream); a final/ it goes past is marked stale."""
    rngs = [rng_state(generator)]
    if world > 1:
        rngs = [None] * world
        torch.distributed.all_gather_object(rngs, rng_state(generator))
    weights, optimizer_state = None, None
    if args.fsdp:  # gather full (CPU) state dicts to rank 0: collectives, every rank takes part
        weights, optimizer_state = fsdp.model_state(model), fsdp.optimizer_state(model, opt)
    if rank == 0:
        finite = all(bool(torch.isfinite(v).all()) for v in weights.values()) if args.fsdp else \
            is_finite_state(model)
        if not finite:
            raise TrainingError(f"the weights are not finite at step {state['step']}: not saved "
                                "(try a lower --lr)")
        trainer_state = dict({k: state[k] for k in TRAINER_STATE[:4]}, rng=rngs, world=world,
                             base_model=state["base_model"], args=settings(args))
        adapters = lora.state_dict(model) if args.lora_rank else None  # (the base: by name)
        try:
            save(out, state["step"], model, tok, trainer_state,
                 optimizer_state=optimizer_state if args.fsdp else opt.state_dict(),
                 state_dict=weights, keep_last=args.keep_last, adapters=adapters,
                 files=dict(grace_files(args, state), **lora_files(args, state)) if adapters
                 else grace_files(args, state))
            old = mark_final_stale(out, state["step"])
            if old is not None:
                tqdm.write(f"note: {out}/final/ (step {old}) is now stale: this run went past it; "
                           "its grace.json says so until the run ends and exports its own")
        except CheckpointError as e:
            raise TrainingError(str(e)) from None
    if world > 1:
        torch.distributed.barrier()


def export(out, model, tok, state, args, rank):
    """OUT/final/: the trained model alone, loadable by from_pretrained and evaluate.py (LoRA:
    merged into the weights, in place: the run is over; --lora-export adapters: them alone)."""
    weights = fsdp.model_state(model) if args.fsdp else None  # --fsdp: gathered by every rank
    files, adapters = grace_files(args, state), None
    if args.lora_rank and args.lora_export == "adapters":
        files, adapters = dict(files, **lora_files(args, state)), lora.state_dict(model)
    elif args.lora_rank:
        lora.merge(model)  # W + (alpha / r) B A: a plain model, as from full fine-tuning
    if rank == 0:
        final = export_final(out, model, tok, files=files, state_dict=weights,
                             adapters=adapters)
        print(f"done: {out}/step-{state['step']} (resumable) and {final} (the model)  "
              f"metrics: {out}/metrics.jsonl")
        if state["prompts_cut"]:
            print(f"note: {state['prompts_cut']} prompts were cut to --max-prompt-tokens "
                  f"{args.max_prompt_tokens}")


def grace_files(args, state):
    """Files saved beside the weights: grace.json (how evaluate.py embeds as the policy was
    trained; base_model: where the policy's training started, kl_reference: the KL penalty's
    model when that is another), a model card, and the files that make sentence-transformers
    refuse it instead of mis-embedding it."""
    base = state.get("base_model", args.model)
    info = dict(base_model=base, preset=args.preset, step=state["step"], objective=args.objective,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                max_prompt_tokens=args.max_prompt_tokens, system_prompt=args.system_prompt)
    if args.model != base and args.kl_coef and args.objective == "grpo":
        info["kl_reference"] = args.model
    return {"grace.json": json.dumps(info, indent=1) + "\n", "README.md": model_card(info),
            **st_guard_files()}
