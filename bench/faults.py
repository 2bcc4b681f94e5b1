"""Fault suite: feed the CLIs and the API broken input, damaged run folders and kills, and classify
what each does. `python bench/faults.py [--only AREA[,AREA|CASE-ID...]] [--list] [--jobs N]
[--rev REV]` from anywhere; a markdown table by area, then one line per case that went wrong.

Each case runs in its own temporary COPY of the working tree (no .git, out/, results/, .venv;
models/ and data/ included), so nothing here can write over the repo or its models/tiny-lm; the
copies are deleted at the end (--keep keeps them, and each case's stdout/stderr, for reading).
A case: a setup (files written or damaged in its copy, earlier runs), one command (train.py,
evaluate.py, tools/pretrain.py, or the Python API through a wrapper), run with OMP_NUM_THREADS=1,
HF_HUB_OFFLINE=1 and a time-out, and an expectation: "ok" (exit 0 and a check holds), "refuse"
(exit != 0, one short line on stderr, no traceback) or "either". Classification, worst first:

    data lost     a file that existed before (models/tiny-lm, a checkpoint, final/, results, a
                  file named by --out) is gone or changed when it should not be
    traceback     "Traceback" in the output, or a failure with no message at all
    silent wrong  exit 0 but the check fails, bad input accepted, or a hang (time-out)
    clear error   refused with one line (expected; or, noted below the table, not expected)
    correct       exit 0 (or the expected signal exit) and the check holds
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_COPIED = {".git", "out", "results", ".venv", ".ci-venv", "venv", "__pycache__",
              ".pytest_cache", ".whl", ".gl", "bench_out"}
SOURCE = [ROOT]  # the tree the cases copy: --rev REV sets a `git archive` of REV
SHARED = ROOT.parent / "shared" / "data"  # the real data sets, read in place (never copied)
KINDS = ("correct", "clear error", "traceback", "silent wrong", "data lost")
PROTECTED = ("models/tiny-lm", "models/tiny")  # every case: never touched
ENV = dict(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
           TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")

# small and fast: 4 texts x G=2, 8-token rationales (tiny preset otherwise)
SMALL = ["--batch-size", "4", "--mini-batch-size", "4", "--group-size", "2",
         "--max-new-tokens", "8"]
RUN4 = ["train.py", "--out", "out", "--steps", "4", "--save-every", "2", *SMALL]
EVAL = ["evaluate.py", "--local", "sts.jsonl", "--out", "results", "--no-progress"]
PRETRAIN = ["tools/pretrain.py", "--data-dir", "wn", "--steps", "2", "--vocab-size", "512",
            "--heldout-lines", "20", "--batch-size", "4"]


class Lost(str):
    """A check's verdict: data was lost (the text says what)."""


class SetupError(Exception):
    pass


@dataclass
class Case:
    id: str
    area: str
    what: str  # the fault and what should happen, one line
    cmd: list  # argv after `python`, run in the copy's root
    expect: str = "refuse"  # "ok" | "refuse" | "either"
    setup: object = None  # (ctx) -> None
    check: object = None  # (ctx, result) -> None | problem str | Lost(str)
    mentions: str = None  # regex the refusal line should match (a note if not)
    keep: tuple = ()  # more paths that must stay byte-identical
    interrupt: tuple = None  # (signal, trigger(ctx, stdout, stderr) -> bool)
    ok_rc: tuple = (0,)  # exit codes that count as "it ran" (130: Ctrl-C, -9: SIGKILL)
    timeout: int = 180


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    @property
    def text(self):
        return self.stdout + "\n" + self.stderr

    def message(self):
        """The last non-empty line of stderr (a progress bar's \\r-parts dropped)."""
        lines = [ln.split("\r")[-1].strip() for ln in self.stderr.splitlines()]
        lines = [ln for ln in lines if ln]
        return lines[-1] if lines else ""


@dataclass
class Ctx:
    root: Path
    fixtures: "Fixtures"
    vars: dict = field(default_factory=dict)

    def run(self, argv, timeout=240, ok=True):
        """A setup command: it must exit 0 (ok=False: any exit) -> Result."""
        self.vars["setup_runs"] = n = self.vars.get("setup_runs", 0) + 1
        log = self.root.parent / f"setup-{self.root.name}-{n}"
        res = run_command(self.root, argv, timeout, log=log)
        if ok and (res.rc != 0 or res.timed_out):
            raise SetupError(f"setup `{show(argv)}` exit {res.rc}: {res.message()[:200]}")
        return res

    def write(self, rel, text):
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def copy_fixture(self, name, rel):
        src = self.fixtures.get(name)
        dest = self.root / rel
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest)
        return dest


# ----------------------------------------------------------------------------- running

def copy_tree(dest, source=None):
    """The tree under test (the working tree, or --rev's) into dest (dest must not exist),
    without outputs, caches and .git."""
    source = Path(source or SOURCE[0]).resolve()

    def ignore(folder, names):
        top = Path(folder).resolve() == source
        return [n for n in names if n == "__pycache__" or n.endswith(".pyc")
                or (top and (n in NOT_COPIED or n.endswith(".log")))]
    shutil.copytree(source, dest, ignore=ignore, symlinks=True)
    return dest


def export_revision(rev, dest):
    """git archive REV into dest: a committed tree to test (the repo itself is only read)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"error: --rev {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def run_command(cwd, argv, timeout, interrupt=None, *, log):
    """python argv in cwd, in its own process group, killed at the time-out -> Result; its
    stdout and stderr go to files in the folder log. interrupt (sig, trigger): sig goes to the
    group once trigger(stdout, stderr) is true."""
    env = dict(os.environ, **ENV)
    env.pop("PYTHONPATH", None)
    log = Path(log)
    log.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log / "stdout", log / "stderr"
    start = time.time()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=out,
                                stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        sent, timed_out = False, False
        while proc.poll() is None:
            if time.time() - start > timeout:
                timed_out = True
                _killpg(proc.pid, signal.SIGKILL)
                break
            if interrupt and not sent and interrupt[1](_read(out_path), _read(err_path)):
                _killpg(proc.pid, interrupt[0])
                sent = True
            time.sleep(0.1)
        rc = proc.wait()
    return Result(rc, _read(out_path), _read(err_path), time.time() - start, timed_out)


def _killpg(pid, sig):
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _read(path):
    return Path(path).read_text(encoding="utf-8", errors="replace")


def snapshot(root, rels):
    """{path: sha1} of every file under each path (a file or a folder) that exists."""
    found = {}
    for rel in rels:
        p = root / rel
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) \
            if p.is_dir() else []
        for f in files:
            if f.name != ".lock":
                found[str(f.relative_to(root))] = sha1(f)
    return found


def sha1(path):
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def lost_files(before, after):
    gone = [p for p in before if p not in after]
    changed = [p for p in before if p in after and after[p] != before[p]]
    parts = ([f"gone: {', '.join(gone[:3])}" + (" ..." if len(gone) > 3 else "")] if gone
             else []) + ([f"changed: {', '.join(changed[:3])}" + (" ..." if len(changed) > 3
                                                                   else "")] if changed else [])
    return "; ".join(parts)


def classify(case, res, lost, problem):
    """-> (kind, what happened). problem: the check's complaint (None: it holds)."""
    if lost:
        return "data lost", lost
    text = res.text
    if "Traceback (most recent call last)" in text:
        exc = [ln for ln in text.splitlines() if re.match(r"^[\w.]+(Error|Exception|Interrupt"
                                                           r"|Exit)\b", ln)]
        return "traceback", f"exit {res.rc}: {(exc or [res.message()])[-1][:200]}"
    if res.timed_out:
        return "silent wrong", f"no result after {case.timeout}s (killed)"
    if res.rc in case.ok_rc:
        if case.expect == "refuse":
            return "silent wrong", f"accepted (exit {res.rc})" + (f": {problem}" if problem
                                                                   else "")
        if problem:
            return "silent wrong", problem
        return "correct", ""
    msg = res.message()
    if not msg:
        return "traceback", f"exit {res.rc} with no message"
    notes = []
    if case.expect == "ok":
        notes.append("refused, but should succeed")
    if case.mentions and not re.search(case.mentions, msg):
        notes.append(f"message does not name /{case.mentions}/")
    if len(msg) > 400:
        notes.append(f"message is {len(msg)} characters")
    return "clear error", "; ".join(notes + [f"`{msg[:200]}`"]) if notes else msg[:200]


def run_case(case, fixtures, workdir, keep_logs=False):
    """Copy the tree, set up, snapshot, run, check, classify -> dict (id, kind, detail, ...)."""
    root = copy_tree(workdir / case.id / "repo")
    ctx = Ctx(root, fixtures)
    start = time.time()
    try:
        if case.setup:
            case.setup(ctx)
    except Exception as e:  # a setup run failed (or the tree changed under it): no verdict
        if not keep_logs:
            shutil.rmtree(workdir / case.id, ignore_errors=True)
        return dict(id=case.id, area=case.area, kind="not run", detail=f"setup failed: {e}",
                    cmd=show(case.cmd), seconds=time.time() - start, expect=case.expect)
    rels = PROTECTED + tuple(case.keep)
    before = snapshot(root, rels)
    interrupt = None
    if case.interrupt:
        sig, trigger = case.interrupt
        interrupt = (sig, lambda out, err: trigger(ctx, out, err))
    res = run_command(root, case.cmd, case.timeout, interrupt, log=workdir / case.id / "log")
    lost = lost_files(before, snapshot(root, rels))
    try:
        verdict = case.check(ctx, res) if case.check else None
    except Exception as e:  # e.g. a file the check reads was left unreadable
        verdict = f"the check could not read the result: {type(e).__name__}: {e}"
    if isinstance(verdict, Lost):
        lost = "; ".join(x for x in (lost, verdict) if x)
        verdict = None
    kind, detail = classify(case, res, lost, verdict)
    if not keep_logs:
        shutil.rmtree(workdir / case.id, ignore_errors=True)
    return dict(id=case.id, area=case.area, kind=kind, detail=detail, cmd=show(case.cmd),
                seconds=time.time() - start, expect=case.expect)


def show(argv):
    return "python " + " ".join(a if re.fullmatch(r"[\w./=:,+-]+", a) else repr(a) for a in argv)


class Fixtures:
    """Outputs shared by several cases, built once per suite (in their own copy) on first use."""

    def __init__(self, workdir):
        self.workdir, self.built, self.lock = workdir, {}, threading.Lock()

    def get(self, name):
        with self.lock:
            if name not in self.built:
                root = copy_tree(self.workdir / f"fixture-{name}")
                self.built[name] = BUILDERS[name](Ctx(root, self))
            return self.built[name]


def build_run4(ctx):
    """A completed 4-step run of tiny: out/step-2, out/step-4, out/final (step 4)."""
    ctx.run(RUN4)
    return ctx.root / "out"


def build_other(ctx):
    """A saved random tiny of another seed: another base model, same shapes."""
    ctx.run(["-c", "import policy; m, t = policy.load('tiny', seed=1); "
             "m.save_pretrained('other'); t.save_pretrained('other')"])
    return ctx.root / "other"


BUILDERS = {"run4": build_run4, "other": build_other}


# ----------------------------------------------------------------------------- helpers of cases

def metrics_steps(root, out="out"):
    path = root / out / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # a line cut by a kill, a summary row
            pass
    return steps


def sts_lines(n=12, reverse_scores=False):
    rows = [json.loads(ln) for ln in
            (SHARED / "stsbenchmark" / "dev.jsonl").read_text().splitlines()[:n]]
    scores = [r["score"] for r in rows][::-1 if reverse_scores else 1]
    return "".join(json.dumps(dict(sentence1=r["sentence1"], sentence2=r["sentence2"],
                                   score=s)) + "\n" for r, s in zip(rows, scores))


def sample_records(n):
    return (ROOT / "data" / "sample_triples.jsonl").read_text().splitlines()[:n]


SCORE = re.compile(r"^\s+(Local\w+)\s+(-?\d+\.\d+)\s+\S+s\s+(.*)$", re.M)


def score_line(res):
    """(score, note) of the first local task line in evaluate's output, or None."""
    m = SCORE.search(res.stdout)
    return (float(m[2]), m[3].strip()) if m else None


def ctrl_c_after(step):
    """A trigger: true once out/metrics.jsonl holds `step`."""
    return lambda ctx, out, err: step in metrics_steps(ctx.root)


# ----------------------------------------------------------------------------- the cases: train

def setup_final_without_steps(ctx):
    out = ctx.copy_fixture("run4", "out")
    ctx.vars["final"] = sha1(out / "final" / "model.safetensors")
    for p in out.glob("step-*"):
        shutil.rmtree(p)


def check_final_survives(ctx, res):
    found = [p for p in (ctx.root / "out").rglob("model.safetensors")
             if sha1(p) == ctx.vars["final"]]
    if not found:
        return Lost("out/final/ of the earlier run was overwritten; no copy kept")


def setup_run4(ctx):
    ctx.copy_fixture("run4", "out")


def check_final_not_claiming(ctx, res):
    final = ctx.root / "out" / "final"
    steps = [int(p.name[5:]) for p in (ctx.root / "out").glob("step-*")]
    if not (final / "grace.json").exists():
        return None  # absent: fine
    info = (final / "grace.json").read_text()
    step = json.loads(info).get("step")
    if steps and step == max(steps):
        return None  # it is the newest state
    if re.search(r"stale|superseded|outdated", info, re.I):
        return None
    return (f"final/ says step {step} while the run went on to step-{max(steps or [0])}, "
            "and nothing marks it stale")


def setup_epochs(ctx):
    ctx.write("d16.jsonl", "\n".join(sample_records(16)) + "\n")


EPOCHS = ["train.py", "--data", "d16.jsonl", "--out", "out", "--save-every", "100", *SMALL]


def check_epoch_steps(ctx, res):
    steps = metrics_steps(ctx.root)
    if len(steps) != 4:
        return f"--epochs 1 over 16 records at --batch-size 4 ran {len(steps)} steps, not 4"


def setup_epochs_resume(ctx):
    setup_epochs(ctx)
    ctx.run(EPOCHS + ["--epochs", "1"])
    ctx.vars["n1"] = len(metrics_steps(ctx.root))


def check_more_epochs(ctx, res):
    n1, n2 = ctx.vars["n1"], len(metrics_steps(ctx.root))
    if n2 <= n1:
        return f"--resume --epochs 2 after --epochs 1 ({n1} steps) ran no more ({n2} in all)"


def damage(kind):
    """A setup: run4, then its newest checkpoint (step-4) damaged."""
    def setup(ctx):
        step = ctx.copy_fixture("run4", "out") / "step-4"
        if kind == "config":
            (step / "config.json").write_text("{not json")
        elif kind == "tokenizer":
            (step / "tokenizer.json").write_text("garbage")
        elif kind == "shape":
            shutil.copy2(ctx.root / "models" / "tiny-lm" / "model.safetensors",
                         step / "model.safetensors")
        elif kind == "state":
            data = (step / "trainer_state.pt").read_bytes()
            (step / "trainer_state.pt").write_bytes(data[:len(data) // 2])
    return setup


def check_fell_back(ctx, res):
    steps = metrics_steps(ctx.root)
    if not re.search(r"step-2\b|step 2\b", res.text):
        return "the output never names the older step-2 it should resume from"
    if not steps or max(steps) != 6:
        return f"the run did not reach step 6 (metrics end at {max(steps or [0])})"


def setup_other(ctx):
    setup_run4(ctx)
    ctx.copy_fixture("other", "other")


def check_model_change(ctx, res):
    announced = [ln for ln in res.text.splitlines() if "other" in ln and
                 re.search(r"model|reference|base", ln, re.I)]
    if not announced:
        return "the change of --model (the reference) is not announced"
    config = json.loads((ctx.root / "out" / "config.json").read_text())
    if not str(config.get("model", "")).endswith("other"):
        return f"config.json records model {config.get('model')!r}, not other"
    grace = ctx.root / "out" / "final" / "grace.json"
    info = json.loads(grace.read_text()) if grace.exists() else {}
    names = [v for k, v in info.items() if k != "preset" and isinstance(v, str)]
    if grace.exists() and not (any(v.endswith("other") for v in names) and "tiny" in names):
        return ("final/grace.json does not record both the model the policy was trained from "
                f"(tiny) and the new reference (other): base_model {info.get('base_model')!r}")


# ----------------------------------------------------------------------------- pretrain, evaluate

def setup_wordnet(ctx):
    for name in ("wordnet_examples.txt", "wordnet_glosses.txt"):
        lines = (SHARED / "unsup_sentences" / name).read_text().splitlines()[:300]
        ctx.write(f"wn/{name}", "\n".join(lines) + "\n")
    shutil.copy2(SHARED / "unsup_sentences" / "WORDNET_LICENSE_debian_copyright", ctx.root / "wn")


def training_started(ctx, out, err):
    return "pretrain:" in err  # the progress bar: the loop runs (metrics.jsonl is open)


def setup_sts(ctx):
    ctx.write("sts.jsonl", sts_lines())


def setup_sts_then(edit):
    """sts.jsonl, a first evaluation (its score kept), then edit(ctx)."""
    def setup(ctx):
        setup_sts(ctx)
        first = score_line(ctx.run(["evaluate.py", "--model", "tiny", *EVAL[1:],
                                    *ctx.vars.get("first_flags", ["--max-new-tokens", "8"])]))
        if first is None:
            raise SetupError("the first evaluation printed no score line")
        ctx.vars["first"] = first
        edit(ctx)
    return setup


def edit_scores(ctx):
    ctx.write("sts.jsonl", sts_lines(reverse_scores=True))  # the same bytes, scores reordered


def check_new_score(ctx, res):
    now = score_line(res)
    if now is None:
        return "no score line"
    if "(cached)" in now[1] or now[0] == ctx.vars["first"][0]:
        return (f"score after the edit {now[0]} {now[1]}; before {ctx.vars['first'][0]}: "
                "the old result was reused")


def sampled_first(ctx):
    ctx.vars["first_flags"] = ["--max-new-tokens", "8", "--temperature", "1", "--batch-size", "5"]


def check_not_cached(ctx, res):
    now = score_line(res)
    if now is None:
        return "no score line"
    if "(cached)" in now[1]:
        return f"--batch-size 32 reused the --batch-size 5 sampled score {now[0]} (cached)"


def truncate_result(ctx):
    files = list((ctx.root / "results").rglob("LocalSTS_sts.json"))
    if not files:
        raise SetupError("no LocalSTS_sts.json under results/")
    files[0].write_bytes(b"")
    ctx.vars["json"] = files[0]


def check_recomputed(ctx, res):
    now = score_line(res)
    if now is None or "(cached)" in now[1]:
        return f"the empty result was not recomputed: {now}"
    try:
        json.loads(ctx.vars["json"].read_text())
    except ValueError:
        return "the result JSON is still empty or unreadable"


def broken_model(edit):
    """A setup: sts.jsonl and a saved tiny checkpoint (run4's final/) at m/, then edit(m)."""
    def setup(ctx):
        setup_sts(ctx)
        m = ctx.root / "m"
        shutil.copytree(ctx.fixtures.get("run4") / "final", m)
        edit(ctx, m)
    return setup


def grace_json(key, value):
    def edit(ctx, m):
        info = json.loads((m / "grace.json").read_text())
        info[key] = value
        (m / "grace.json").write_text(json.dumps(info))
    return edit


CAPPED = re.compile(r"capped|max_new_tokens.*(limit|positions)", re.I)


def check_capped(ctx, res):
    if not CAPPED.search(res.text):
        return "a rationale length of 10^9 tokens was taken without a note"


def truncate_weights(ctx, m):
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[:len(data) // 2])


def drop_tokenizer(ctx, m):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (m / name).unlink(missing_ok=True)


def nan_weights(ctx, m):
    ctx.run(["-c", "import torch; from safetensors.torch import load_file, save_file; "
             "t = load_file('m/model.safetensors'); "
             "[v.fill_(float('nan')) for v in t.values() if v.is_floating_point()]; "
             "save_file(t, 'm/model.safetensors', metadata={'format': 'pt'})"])


# ----------------------------------------------------------------------------- the API

API_WRAPPER = '''"""Run a snippet of the API: a ValueError / UsageError raised by the project's own
code is its refusal (one line, exit 2); any other exception, or one from a library, a traceback."""
import sys
import traceback
from pathlib import Path

root = Path(__file__).resolve().parent
sys.path.insert(0, str(root))
from infra.cli import UsageError  # noqa: E402

try:
    exec(compile(sys.argv[1], "<case>", "exec"), {})
except (ValueError, UsageError) as e:
    where = Path(traceback.extract_tb(e.__traceback__)[-1].filename)
    if not (isinstance(e, UsageError) or where.resolve().is_relative_to(root)):
        raise
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)
'''


def setup_api(ctx):
    ctx.write("_api.py", API_WRAPPER)


def api(code):
    return ["_api.py", "from evaluate import GraceEncoder\n" + code]


def check_nothing(ctx, res):
    return None


# ----------------------------------------------------------------------------- the list

def bad_data(name, lines):
    def setup(ctx):
        ctx.write(name, "".join(ln + "\n" for ln in lines))
    return setup


GOOD = sample_records(12)
NO_POSITIVE = json.dumps({k: v for k, v in json.loads(GOOD[2]).items() if k != "positive"})
TRAIN_BAD = ["train.py", "--out", "out", "--steps", "1", *SMALL]

CASES = [
    # train: the run folder
    Case("train-final-no-steps", "train", "out/final/ kept, step-* deleted, then a fresh run in "
         "the same --out: final/ must survive (set aside, or refused)",
         ["train.py", "--out", "out", "--steps", "2", *SMALL], "either",
         setup_final_without_steps, check_final_survives),
    Case("train-sigint-final-stale", "train", "a finished 4-step run, --resume --steps 8, Ctrl-C "
         "after step 5: final/ (step 4) must not pass for current (absent, or marked stale)",
         ["train.py", "--out", "out", "--resume", "--steps", "8"], "ok", setup_run4,
         check_final_not_claiming, interrupt=(signal.SIGINT, ctrl_c_after(5)), ok_rc=(0, 130),
         keep=("out/step-4",)),
    Case("train-epochs-1", "train", "--epochs 1, 16 records, --batch-size 4 (tiny preset): 4 "
         "steps", EPOCHS + ["--epochs", "1"], "ok", setup_epochs, check_epoch_steps),
    Case("train-epochs-resume", "train", "--resume --epochs 2 after --epochs 1: more steps",
         ["train.py", "--out", "out", "--resume", "--epochs", "2"], "ok", setup_epochs_resume,
         check_more_epochs),
    # resume: fall back past a damaged newest checkpoint, changed settings
    *[Case(f"resume-bad-{kind}", "resume", f"step-4 with {what}: --resume falls back to step-2, "
           "names it, and runs on", ["train.py", "--out", "out", "--resume", "--steps", "6"],
           "ok", damage(kind), check_fell_back)
      for kind, what in (("config", "a garbage config.json"),
                         ("tokenizer", "a garbage tokenizer.json"),
                         ("shape", "weights of another shape (tiny-lm's)"),
                         ("state", "a trainer_state.pt cut in half"))],
    Case("resume-force-model", "resume", "--resume --force-resume --model OTHER: the change is "
         "announced, and final/grace.json records both tiny (the policy's start) and OTHER",
         ["train.py", "--out", "out", "--resume", "--force-resume", "--model", "other",
          "--steps", "6"], "ok", setup_other, check_model_change),
    Case("resume-model-refused", "resume", "--resume --model OTHER without --force-resume: one "
         "line naming --model", ["train.py", "--out", "out", "--resume", "--model", "other",
                                 "--steps", "6"],
         setup=setup_other, mentions=r"--model", keep=("out",)),
    Case("train-release-typo-model", "resume", "--preset release --model ./no-such-model: "
         "reported as a missing model (not a batch-size error)",
         ["train.py", "--preset", "release", "--model", "./no-such-model", "--out", "out2"],
         mentions=r"no-such-model"),
    # data and flags
    Case("data-not-json", "data", "a JSONL line that is not JSON: one line naming file and line",
         ["train.py", "--data", "bad.jsonl", *TRAIN_BAD[1:]],
         setup=bad_data("bad.jsonl", GOOD[:6] + ["{not json"] + GOOD[6:]),
         mentions=r"bad\.jsonl.*\b7\b"),
    Case("data-no-positive", "data", "a record without \"positive\": one line naming file, line "
         "and field", ["train.py", "--data", "nopos.jsonl", *TRAIN_BAD[1:]],
         setup=bad_data("nopos.jsonl", GOOD[:2] + [NO_POSITIVE] + GOOD[3:]),
         mentions=r"nopos\.jsonl.*\b3\b.*positive"),
    Case("data-empty", "data", "an empty data file: one line naming it",
         ["train.py", "--data", "empty.jsonl", *TRAIN_BAD[1:]], setup=bad_data("empty.jsonl", []),
         mentions=r"empty\.jsonl"),
    Case("flag-lr-negative", "data", "--lr -1: one line naming --lr", TRAIN_BAD + ["--lr", "-1"],
         mentions=r"--lr"),
    Case("flag-group-size-0", "data", "--group-size 0: one line naming --group-size",
         ["train.py", "--out", "out", "--steps", "1", "--group-size", "0"],
         mentions=r"--group-size"),
    Case("flag-steps-abc", "data", "--steps abc: one line naming --steps",
         ["train.py", "--out", "out", "--steps", "abc"], mentions=r"--steps"),
    # pretrain
    Case("pretrain-no-data-dir", "pretrain", "no --data-dir: one line",
         ["tools/pretrain.py", "--steps", "2"], mentions=r"--data-dir"),
    *[Case(f"pretrain-{flag.strip('-')}-{value}", "pretrain", f"{flag} {value}: refused with one "
           "line", PRETRAIN + ["--out", "out/lm", flag, value], setup=setup_wordnet,
           mentions=re.escape(flag) + r"|finite|diverg", timeout=120)
      for flag, value in (("--lr", "inf"), ("--lr", "1e30"), ("--weight-decay", "nan"),
                          ("--log-every", "0"))],
    Case("pretrain-default-out", "pretrain", "the default --out must not write over "
         "models/tiny-lm (its files' hashes before and after)", PRETRAIN, "either",
         setup_wordnet, check_nothing, timeout=120),
    Case("pretrain-kill-explicit-out", "pretrain", "--out models/tiny-lm, SIGKILL once training "
         "runs: models/tiny-lm stays whole",
         PRETRAIN[:4] + ["200", *PRETRAIN[5:], "--out", "models/tiny-lm"], "either",
         setup_wordnet, check_nothing, interrupt=(signal.SIGKILL, training_started),
         ok_rc=(0, -9), timeout=120),
    # evaluate: the result cache
    Case("eval-edited-task", "evaluate", "a --local STS file edited (scores reordered), rerun "
         "with the same --out: the score changes, not '(cached)'",
         ["evaluate.py", "--model", "tiny", *EVAL[1:], "--max-new-tokens", "8"], "ok",
         setup_sts_then(edit_scores), check_new_score),
    Case("eval-sampled-batch-size", "evaluate", "--temperature 1 at --batch-size 5, then 32: the "
         "second does not reuse the first's sampled score",
         ["evaluate.py", "--model", "tiny", *EVAL[1:], "--max-new-tokens", "8", "--temperature",
          "1", "--batch-size", "32"], "ok",
         lambda ctx: (sampled_first(ctx), setup_sts_then(lambda c: None)(ctx)), check_not_cached),
    Case("eval-empty-result-json", "evaluate", "a 0-byte result JSON in --out: recomputed, not a "
         "JSONDecodeError", ["evaluate.py", "--model", "tiny", *EVAL[1:], "--max-new-tokens",
                             "8"], "ok", setup_sts_then(truncate_result), check_recomputed),
    Case("eval-out-is-file", "evaluate", "--out naming an existing file: one line, file untouched",
         ["evaluate.py", "--model", "tiny", "--local", "sts.jsonl", "--out", "taken.txt",
          "--max-new-tokens", "8", "--no-progress"],
         setup=lambda ctx: (setup_sts(ctx), ctx.write("taken.txt", "mine\n")),
         mentions=r"taken\.txt", keep=("taken.txt",)),
    # evaluate --model on broken folders
    *[Case(f"model-{name}", "model", f"evaluate --model m with {what}: one line",
           ["evaluate.py", "--model", "m", *EVAL[1:], *flags], setup=broken_model(edit),
           mentions=mentions, keep=("m",))
      for name, what, edit, flags, mentions in (
          ("truncated-weights", "model.safetensors cut in half", truncate_weights,
           ["--max-new-tokens", "8"], r"safetensors|weights|cut|truncat|corrupt"),
          ("no-tokenizer", "no tokenizer files", drop_tokenizer, ["--max-new-tokens", "8"],
           r"tokeni[sz]er"),
          ("max-new-tokens-abc", 'grace.json "max_new_tokens": "abc"',
           grace_json("max_new_tokens", "abc"), [], r"max_new_tokens"),
          ("max-new-tokens-neg", 'grace.json "max_new_tokens": -5',
           grace_json("max_new_tokens", -5), [], r"max_new_tokens"),
          ("system-prompt-int", 'grace.json "system_prompt": 123',
           grace_json("system_prompt", 123), ["--max-new-tokens", "8"], r"system_prompt"),
          ("nan-weights", "NaN weights", nan_weights, ["--max-new-tokens", "8"],
           r"NaN|finite"))],
    Case("model-max-new-tokens-huge", "model", 'evaluate --model m with grace.json '
         '"max_new_tokens": 1000000000: one line, or capped to the positions with a note (the '
         'run is stopped once the note shows)', ["evaluate.py", "--model", "m", *EVAL[1:]],
         "either", broken_model(grace_json("max_new_tokens", 1000000000)), check_capped,
         mentions=r"max_new_tokens|positions", keep=("m",), ok_rc=(0, -9), timeout=120,
         interrupt=(signal.SIGKILL, lambda ctx, out, err: bool(CAPPED.search(out + err)))),
    # the Python API
    Case("api-batch-size-negative", "api", 'GraceEncoder("tiny").encode(["a"], batch_size=-1): '
         "refused", api('print(GraceEncoder("tiny", max_new_tokens=8).encode(["a"], '
                        'batch_size=-1).round(3))'),
         setup=setup_api, mentions=r"batch_size|batch size"),
    Case("api-temperature-negative", "api", 'GraceEncoder("tiny", temperature=-1): refused',
         api('print(GraceEncoder("tiny", temperature=-1, max_new_tokens=8).encode(["a"]).'
             'round(3))'), setup=setup_api, mentions=r"temperature"),
]


# ----------------------------------------------------------------------------- the report

def table(results):
    areas = list(dict.fromkeys(r["area"] for r in results))
    kinds = KINDS + (("not run",) if any(r["kind"] == "not run" for r in results) else ())
    lines = ["| area | cases | " + " | ".join(kinds) + " |",
             "|---|---:|" + "---:|" * len(kinds)]
    for area in areas + ["all"]:
        rows = [r for r in results if area in ("all", r["area"])]
        counts = [sum(r["kind"] == k for r in rows) for k in kinds]
        name = f"**{area}**" if area == "all" else area
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(lines)


def report(results, seconds, tree="the working tree"):
    bad = [r for r in results if r["kind"] not in ("correct", "clear error")]
    noted = [r for r in results if r["kind"] == "clear error" and r["detail"].startswith(
        ("refused, but", "message does not", "message is"))]
    parts = [table(results), ""]
    if bad:
        parts += ["Not correct:", ""] + [f"- {r['id']} ({r['kind']}): `{r['cmd']}` -> "
                                         f"{r['detail']}" for r in bad] + [""]
    if noted:
        parts += ["Clear errors with a caveat:", ""] + [f"- {r['id']}: `{r['cmd']}` -> "
                                                        f"{r['detail']}" for r in noted] + [""]
    parts.append(f"{len(results)} cases of {tree} in {seconds:.0f}s")
    return "\n".join(parts)


def select(only):
    if not only:
        return CASES
    wanted = set(only.split(","))
    picked = [c for c in CASES if c.area in wanted or c.id in wanted]
    unknown = wanted - {c.area for c in CASES} - {c.id for c in CASES}
    if unknown:
        raise SystemExit(f"error: --only {', '.join(sorted(unknown))}: no such area or case "
                         f"(areas: {', '.join(dict.fromkeys(c.area for c in CASES))})")
    return picked


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help="comma-separated areas or case ids (see --list)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--jobs", type=int, default=1, help="cases run at once (1: one core)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary copies and each case's stdout/stderr")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--rev", help="test this git revision (e.g. HEAD: the code before uncommitted "
                   "fixes) instead of the working tree")
    args = p.parse_args(argv)
    cases = select(args.only)
    if args.list:
        for c in cases:
            print(f"{c.area:<9} {c.id:<30} [{c.expect}] {c.what}")
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="grace-faults-"))
    start, fixtures = time.time(), Fixtures(workdir)
    try:
        if args.rev:
            SOURCE[0] = export_revision(args.rev, workdir / "source")
        def one(case):
            r = run_case(case, fixtures, workdir, keep_logs=args.keep)
            print(f"  {r['seconds']:5.0f}s  {r['kind']:<12} {r['id']}", file=sys.stderr,
                  flush=True)
            return r
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(pool.map(one, cases))
    finally:
        if args.keep:
            print(f"kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report(results, time.time() - start, f"git {args.rev}" if args.rev else
                 "the working tree"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
