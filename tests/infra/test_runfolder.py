"""infra/runfolder.py: a run folder that survives kills, full disks and a second run, and resumes
what is whole."""
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from infra import runfolder
from infra.runfolder import CheckpointError

ROOT = Path(__file__).resolve().parents[2]


def save(out, step, tiny, **kw):
    model, tok = tiny
    optimizer_state = kw.pop("optimizer_state", {"state": {}, "exp_avg": torch.ones(3)})
    return runfolder.save(out, step, model, tok, {"step": step, "marker": kw.pop("marker", step)},
                          optimizer_state=optimizer_state, **kw)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(out):
    return sorted(p.name for p in Path(out).iterdir() if p.name.startswith((".tmp-", ".old-")))


# ----------------------------------------------------------------------------- lock

@pytest.mark.slow  # a second Python process that imports torch
def test_lock_held_by_another_process(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time\nfrom infra import runfolder\n"
            "held = runfolder.lock(sys.argv[1])\nheld.__enter__()\n"
            "print('locked', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError) as e:
            with runfolder.lock(out):
                pass
        assert str(e.value) == (f"{out} is in use by another run (pid {holder.pid}); "
                                "wait for it or pass another --out")
    finally:
        holder.kill()
        holder.wait()
    with runfolder.lock(out):  # the kernel released it when the holder died: no stale lock
        assert (out / ".lock").read_text().strip() == str(os.getpid())


def test_lock_creates_parents_and_is_released_on_exceptions(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(ZeroDivisionError):
        with runfolder.lock(out):
            assert out.is_dir()
            # a second open: a second holder
            with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
                with runfolder.lock(out):
                    pass
            1 / 0
    with runfolder.lock(out) as held:
        assert held == out


def test_lock_out_is_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(CheckpointError, match=f"^--out {f} is a file$"):
        with runfolder.lock(f):
            pass
    with pytest.raises(CheckpointError, match="cannot create"):
        with runfolder.lock(f / "below"):
            pass


def test_clean_orphans(tmp_path):
    (tmp_path / "step-1").mkdir()
    (tmp_path / ".tmp-step-3").mkdir()
    (tmp_path / ".tmp-step-3" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".tmp-metrics.jsonl").write_text("{}")
    (tmp_path / "step-2").mkdir()
    (tmp_path / ".old-step-2").mkdir()  # re-save finished its renames: the old copy is garbage
    # killed between the renames: the old copy is the checkpoint
    (tmp_path / ".old-step-5").mkdir()
    (tmp_path / ".old-step-5" / "marker").write_text("old")
    removed = runfolder.clean_orphans(tmp_path)
    assert sorted(p.name for p in removed) == [".old-step-2", ".tmp-metrics.jsonl", ".tmp-step-3"]
    assert leftovers(tmp_path) == []
    assert (tmp_path / "step-5" / "marker").read_text() == "old"
    assert [p.name for p in runfolder.checkpoints(tmp_path)] == ["step-1", "step-2", "step-5"]


# ----------------------------------------------------------------------------- config and metrics

def test_config_roundtrip(tmp_path):
    assert runfolder.read_config(tmp_path) is None
    runfolder.write_config(tmp_path, {"lr": 1e-6, "data": Path("/x/y.jsonl"), "steps": None})
    assert runfolder.read_config(tmp_path) == {"lr": 1e-6, "data": "/x/y.jsonl", "steps": None}
    assert leftovers(tmp_path) == []
    (tmp_path / "config.json").write_text("{cut")
    with pytest.raises(CheckpointError, match="config.json"):
        runfolder.read_config(tmp_path)


def test_append_metrics_nan_is_null_and_a_cut_line_is_not_extended(tmp_path):
    runfolder.append_metrics(tmp_path, {"step": 1, "loss": float("nan"), "x": [float("inf"), 2.0]})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a kill mid-line
    runfolder.append_metrics(tmp_path, {"step": 2, "loss": 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().split("\n")
    assert json.loads(lines[0]) == {"step": 1, "loss": None, "x": [None, 2.0]}
    assert lines[1] == '{"step": 2, "lo' and json.loads(lines[2]) == {"step": 2, "loss": 0.5}
    assert runfolder.truncate_metrics(tmp_path, 5) == 2


def test_truncate_metrics_keeps_earlier_steps_and_drops_a_cut_line(tmp_path):
    assert runfolder.truncate_metrics(tmp_path, 3) == 0  # no file yet
    for s in range(1, 6):
        runfolder.append_metrics(tmp_path, {"step": s})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "re')
    assert runfolder.truncate_metrics(tmp_path, 3) == 3
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert leftovers(tmp_path) == []


def test_truncate_metrics_is_atomic(tmp_path, monkeypatch):
    for s in range(1, 6):
        runfolder.append_metrics(tmp_path, {"step": s})
    before = (tmp_path / "metrics.jsonl").read_bytes()

    def killed(src, dst):  # the new file is written; the process dies before it replaces the old
        assert Path(src).read_text().count("\n") == 2
        raise OSError(errno.EIO, "killed")

    monkeypatch.setattr(runfolder.os, "replace", killed)
    with pytest.raises(CheckpointError):
        runfolder.truncate_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- save

def test_save_writes_a_complete_readable_checkpoint(tmp_path, tiny):
    path = save(tmp_path, 3, tiny, card="# my model\n")
    assert path == tmp_path / "step-3"
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "trainer_state.pt",
            "README.md"} <= {p.name for p in path.iterdir()}
    assert runfolder.loadable(path) == (True, "ok")
    state = runfolder.read_state(path)
    assert state["step"] == 3 and torch.equal(state["optimizer"]["exp_avg"], torch.ones(3))
    assert (path / "README.md").read_text() == "# my model\n"
    assert mode(path) == 0o755 and all(mode(p) == 0o644 for p in path.iterdir())
    assert leftovers(tmp_path) == []


def test_save_refuses_a_state_of_another_step(tmp_path, tiny):
    with pytest.raises(ValueError, match="step"):
        runfolder.save(tmp_path, 2, *tiny, {"step": 1})


@pytest.mark.parametrize("kill", [RuntimeError("killed"), KeyboardInterrupt()])
def test_save_killed_midway_leaves_nothing(tmp_path, tiny, monkeypatch, kill):
    save(tmp_path, 1, tiny)

    def dies(*a, **k):
        raise kill

    monkeypatch.setattr(runfolder.torch, "save", dies)
    with pytest.raises(type(kill)):
        save(tmp_path, 2, tiny)
    assert [p.name for p in runfolder.checkpoints(tmp_path)] == ["step-1"]
    assert leftovers(tmp_path) == []
    assert runfolder.loadable(tmp_path / "step-1") == (True, "ok")


def test_save_enospc(tmp_path, tiny, monkeypatch):
    save(tmp_path, 1, tiny)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfolder.torch, "save", full)
    with pytest.raises(CheckpointError, match=f"^no space left on the device at {tmp_path}$"):
        save(tmp_path, 2, tiny)
    assert leftovers(tmp_path) == [] and not (tmp_path / "step-2").exists()


def test_save_enospc_wrapped_by_safetensors(tmp_path, tiny, monkeypatch):
    model, tok = tiny

    def full(*a, **k):  # safetensors' own error type, ENOSPC only in its text
        raise Exception("Error while serializing: I/O error: No space left on device "
                        "(os error 28)")

    monkeypatch.setattr(model, "save_pretrained", full)
    with pytest.raises(CheckpointError, match="no space left on the device at"):
        runfolder.save(tmp_path, 1, model, tok, {})
    assert leftovers(tmp_path) == []


def test_save_other_oserror_names_the_path(tmp_path, tiny, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/file")

    monkeypatch.setattr(runfolder.torch, "save", denied)
    with pytest.raises(CheckpointError, match="cannot write /some/file: Permission denied"):
        save(tmp_path, 1, tiny)


@pytest.fixture
def tiny_disk():
    """A 2 MiB tmpfs: room for one tiny checkpoint (1.3 MB), not two. Needs root and mount."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a real full disk needs root to mount a tmpfs")
    folder = tempfile.mkdtemp()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", folder],
                          capture_output=True, text=True)
    if done.returncode:
        os.rmdir(folder)
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield Path(folder)
    finally:
        subprocess.run(["umount", folder], check=True)
        os.rmdir(folder)


def test_save_on_a_really_full_disk(tiny_disk, tiny):
    out = tiny_disk / "run"
    with runfolder.lock(out):
        save(out, 1, tiny)
        free = shutil.disk_usage(out).free
        with pytest.raises(CheckpointError, match=f"^no space left on the device at {out}$"):
            save(out, 2, tiny)
        # the partial copy is gone
        assert leftovers(out) == [] and shutil.disk_usage(out).free == free
        assert runfolder.resume_point(out) == (out / "step-1", [])


def test_resave_keeps_the_old_until_the_new_is_complete(tmp_path, tiny, monkeypatch):
    save(tmp_path, 2, tiny, marker="old")
    real_save = torch.save

    def check_then_die(obj, f):
        assert runfolder.read_state(tmp_path / "step-2")["marker"] == "old"  # still in place
        raise RuntimeError("killed")

    monkeypatch.setattr(runfolder.torch, "save", check_then_die)
    with pytest.raises(RuntimeError):
        save(tmp_path, 2, tiny, marker="new")
    assert runfolder.read_state(tmp_path / "step-2")["marker"] == "old"
    assert leftovers(tmp_path) == []
    monkeypatch.setattr(runfolder.torch, "save", real_save)
    save(tmp_path, 2, tiny, marker="new")
    assert runfolder.read_state(tmp_path / "step-2")["marker"] == "new"
    assert leftovers(tmp_path) == []


def test_resave_failing_at_the_final_rename_restores_the_old(tmp_path, tiny, monkeypatch):
    save(tmp_path, 2, tiny, marker="old")
    real_replace = os.replace

    def fails_into_place(src, dst):
        if Path(src).name == ".tmp-step-2":
            raise OSError(errno.EIO, "I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(runfolder.os, "replace", fails_into_place)
    with pytest.raises(CheckpointError, match="I/O error"):
        save(tmp_path, 2, tiny, marker="new")
    assert runfolder.read_state(tmp_path / "step-2")["marker"] == "old"
    assert leftovers(tmp_path) == []


def test_keep_last(tmp_path, tiny):
    for s in range(1, 6):
        save(tmp_path, s, tiny, keep_last=2)
        assert len(runfolder.checkpoints(tmp_path)) == min(s, 2)
    assert [p.name for p in runfolder.checkpoints(tmp_path)] == ["step-4", "step-5"]
    save(tmp_path, 6, tiny, keep_last=1)
    assert [p.name for p in runfolder.checkpoints(tmp_path)] == ["step-6"]
    assert leftovers(tmp_path) == []
    assert "optimizer" in runfolder.read_state(tmp_path / "step-6")
    with pytest.raises(ValueError):
        save(tmp_path, 7, tiny, keep_last=0)


def test_export_final_loads_with_from_pretrained(tmp_path, tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny
    path = runfolder.export_final(tmp_path, model, tok, card="card")
    runfolder.export_final(tmp_path, model, tok)  # a second export replaces the first
    assert path == tmp_path / "final" and not (path / "trainer_state.pt").exists()
    assert leftovers(tmp_path) == []
    loaded = AutoModelForCausalLM.from_pretrained(path)
    AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([[1, 5, 7]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert not (path / "README.md").exists()  # the second export had no card
    assert runfolder.checkpoints(tmp_path) == []


def test_is_finite_state():
    layer = torch.nn.Linear(2, 2)
    assert runfolder.is_finite_state(layer)
    with torch.no_grad():
        layer.weight[0, 1] = float("nan")
    assert not runfolder.is_finite_state(layer)


# ---------------------------------------------------------------------------- finding and resuming

def test_checkpoints_ignores_other_names(tmp_path):
    for name in ("step-10", "step-9", "step-x", "step-3.bak", "abandoned", "final"):
        (tmp_path / name).mkdir()
    (tmp_path / "step-11").write_text("a file")
    assert [p.name for p in runfolder.checkpoints(tmp_path)] == ["step-9", "step-10"]


def test_resume_point_falls_back_past_broken_checkpoints(tmp_path, tiny):
    for s in (1, 2, 3, 4):
        save(tmp_path, s, tiny)
    state = tmp_path / "step-4" / "trainer_state.pt"
    # cut short by a kill (no .tmp rename on old versions)
    state.write_bytes(state.read_bytes()[:200])
    (tmp_path / "step-3" / "model.safetensors").unlink()
    weights = tmp_path / "step-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    path, skipped = runfolder.resume_point(tmp_path)
    assert path == tmp_path / "step-1"
    assert [(p.name, why.split(" (")[0]) for p, why in skipped] == [
        ("step-4", "trainer_state.pt is unreadable"), ("step-3", "model.safetensors is missing"),
        ("step-2", "model.safetensors is missing or cut short")]


def test_resume_point_other_reasons(tmp_path, tiny):
    save(tmp_path, 1, tiny)
    shutil.copytree(tmp_path / "step-1", tmp_path / "step-7")  # a folder renamed by hand
    (tmp_path / "step-1" / "tokenizer.json").unlink()
    (tmp_path / "step-1" / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        runfolder.resume_point(tmp_path)
    assert str(e.value) == (f"no checkpoint to resume in {tmp_path}; "
                            "step-7: trainer_state.pt is for step 1; "
                            "step-1: tokenizer files are missing")
    assert runfolder.loadable(tmp_path / "nope")[0] is False
    (tmp_path / "step-7" / "config.json").unlink()
    assert runfolder.loadable(tmp_path / "step-7") == (False, "config.json is missing")


def test_resume_point_nothing_and_requested(tmp_path, tiny):
    with pytest.raises(CheckpointError, match=f"^no checkpoint to resume in {tmp_path}$"):
        runfolder.resume_point(tmp_path)
    save(tmp_path, 1, tiny)
    save(tmp_path, 2, tiny)
    assert runfolder.resume_point(tmp_path, str(tmp_path / "step-1")) == (tmp_path / "step-1", [])
    assert runfolder.resume_point(tmp_path, "step-1") == (tmp_path / "step-1", [])
    (tmp_path / "step-1" / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match="step-1: trainer_state.pt is missing"):
        runfolder.resume_point(tmp_path, "step-1")
    # a folder that is not there (pruned by --keep-last, a typo): say which ones are
    with pytest.raises(CheckpointError, match=r"cannot resume from step-9: no such folder "
                       rf"\(checkpoints in {tmp_path}: step-1, step-2\)$"):
        runfolder.resume_point(tmp_path, "step-9")


def test_read_state_unreadable(tmp_path):
    (tmp_path / "trainer_state.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="trainer_state.pt: unreadable"):
        runfolder.read_state(tmp_path)


def test_set_aside_after_moves_never_deletes(tmp_path, tiny):
    for s in (1, 2, 3):
        save(tmp_path, s, tiny)
    (tmp_path / "abandoned" / "step-3").mkdir(parents=True)  # set aside by an earlier resume
    moved = runfolder.set_aside_after(tmp_path, 1)
    assert [p.relative_to(tmp_path).as_posix() for p in moved] == ["abandoned/step-2",
                                                                    "abandoned/step-3.1"]
    assert [p.name for p in runfolder.checkpoints(tmp_path)] == ["step-1"]
    assert all(runfolder.loadable(p)[0] for p in moved)
    assert (tmp_path / "abandoned" / "step-3").is_dir()
    assert runfolder.set_aside_after(tmp_path, 1) == []


def final_at(out, tiny, step):
    """OUT/final/ as train.py exports it: with a grace.json of `step`."""
    model, tok = tiny
    info = json.dumps({"base_model": "tiny", "step": step}) + "\n"
    return runfolder.export_final(out, model, tok, files={"grace.json": info})


def test_a_fresh_start_moves_an_earlier_final_aside_and_says_so(tmp_path, tiny):
    """A folder whose step-N are gone but whose final/ stays: final/ is a run's result, never
    replaced by another run; it goes to abandoned/ with the metrics and settings."""
    final_at(tmp_path, tiny, 20)
    (tmp_path / "metrics.jsonl").write_text('{"step": 20}\n')
    notes = runfolder.settle(tmp_path)
    (aside,) = (tmp_path / "abandoned").iterdir()
    assert not (tmp_path / "final").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert json.loads((aside / "final" / "grace.json").read_text())["step"] == 20
    assert (aside / "metrics.jsonl").read_text() == '{"step": 20}\n'
    assert notes == [f"{tmp_path}/ held an earlier run with no step-N checkpoint left to resume; "
                     f"its final/ (the model) and its files were moved to {aside}"]


def test_resuming_before_the_final_moves_it_aside_with_the_later_checkpoints(tmp_path, tiny):
    for s in (2, 4):
        save(tmp_path, s, tiny)
    final_at(tmp_path, tiny, 4)
    notes = runfolder.settle(tmp_path, 2)
    assert (tmp_path / "abandoned" / "final" / "grace.json").exists()
    assert not (tmp_path / "final").exists()
    assert notes[-1] == (f"resuming from step 2: the later final/ (step 4) was moved to "
                         f"{tmp_path}/abandoned/final")
    final_at(tmp_path, tiny, 2)  # resuming from the final's own step keeps it
    assert runfolder.settle(tmp_path, 2) == [] and (tmp_path / "final").exists()


def test_a_checkpoint_past_the_final_marks_it_stale_once(tmp_path, tiny):
    final_at(tmp_path, tiny, 40)
    assert runfolder.mark_final_stale(tmp_path, 40) is None  # its own step: not stale
    assert runfolder.mark_final_stale(tmp_path, 45) == 40  # the first time: the note's step
    info = json.loads((tmp_path / "final" / "grace.json").read_text())
    assert (info["step"], info["stale"], info["superseded_by_step"]) == (40, True, 45)
    assert runfolder.mark_final_stale(tmp_path, 50) is None  # already marked: no second note
    assert json.loads((tmp_path / "final" / "grace.json").read_text())["superseded_by_step"] == 50
    assert runfolder.mark_final_stale(tmp_path / "none", 3) is None  # no final/: nothing


def test_prune_abandoned_drops_the_optimizer_state_and_keeps_the_weights(tmp_path, tiny):
    for s in (1, 2, 3):
        save(tmp_path, s, tiny)
    runfolder.set_aside_after(tmp_path, 1)
    before = (tmp_path / "abandoned" / "step-2" / "model.safetensors").read_bytes()
    assert sorted(p.name for p in runfolder.prune_abandoned(tmp_path)) == ["step-2", "step-3"]
    for s in (2, 3):
        state = runfolder.read_state(tmp_path / "abandoned" / f"step-{s}")
        assert state["optimizer"] is None and state["step"] == s and state["marker"] == s
    assert (tmp_path / "abandoned" / "step-2" / "model.safetensors").read_bytes() == before
    assert runfolder.read_state(tmp_path / "step-1")["optimizer"] is not None  # kept: not aside
    assert runfolder.prune_abandoned(tmp_path) == [] and leftovers(tmp_path / "abandoned") == []


def test_resume_point_falls_back_past_a_checkpoint_the_deeper_check_refuses(tmp_path, tiny):
    for s in (1, 2):
        save(tmp_path, s, tiny)

    def check(path):
        if path.name == "step-2":
            raise ValueError("config.json is not valid JSON")
    assert runfolder.resume_point(tmp_path, check=check) == (
        tmp_path / "step-1", [(tmp_path / "step-2", "config.json is not valid JSON")])
    with pytest.raises(CheckpointError, match="from step-2: config.json is not valid JSON$"):
        runfolder.resume_point(tmp_path, "step-2", check=check)


# ------------------------------------------------------------------------- folders for other tools

def test_sentence_transformers_refuses_a_guarded_checkpoint(tmp_path):
    from sentence_transformers import SentenceTransformer

    import evaluate
    import policy

    model, tokenizer = policy.load("tiny")
    folder = tmp_path / "step-5"
    model.save_pretrained(folder), tokenizer.save_pretrained(folder)
    for name, text in runfolder.st_guard_files().items():
        (folder / name).write_text(text)
    (folder / "README.md").write_text(runfolder.model_card({"max_new_tokens": 24, "step": 5}))
    guarded = "This is a GRACE checkpoint, not a sentence-transformers model"
    with pytest.raises(Exception, match=guarded) as e:
        SentenceTransformer(str(folder))
    assert "GraceEncoder" in str(e.value) and "pip install" not in str(e.value)
    # grace itself still loads the folder
    assert evaluate.GraceEncoder(str(folder), max_new_tokens=2).encode(["a text"]).shape == (1, 64)


def test_model_card_says_how_to_embed():
    card = runfolder.model_card({"max_new_tokens": 24, "base_model": "tiny"})
    assert "GraceEncoder(" in card and "evaluate.py --model" in card
    assert "sentence-transformers" in card
    assert '`max_new_tokens`: 24' in card
