"""bench/faults.py: its classifier on known outcomes (plain `python -c` commands, milliseconds),
its case list, and one real case end to end, so the suite cannot rot unnoticed."""
import importlib.util
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("faults", ROOT / "bench" / "faults.py")
faults = importlib.util.module_from_spec(spec)
sys.modules["faults"] = faults  # (dataclasses look their module up)
spec.loader.exec_module(faults)


def run(tmp_path, code, expect, **kw):
    case = faults.Case("c", "t", "a test case", ["-c", code], expect, timeout=30, **kw)
    return faults.run_case(case, faults.Fixtures(tmp_path), tmp_path)


REFUSE = "import sys; print('error: --x must be positive', file=sys.stderr); sys.exit(2)"


@pytest.mark.parametrize("code, expect, kind", [
    (REFUSE, "refuse", "clear error"),
    ("raise RuntimeError('boom')", "refuse", "traceback"),
    ("import sys; sys.exit(3)", "refuse", "traceback"),  # a failure without a message
    ("pass", "refuse", "silent wrong"),  # bad input accepted
    ("pass", "ok", "correct"),
    ("import os; os.remove('models/tiny/README.md')", "either", "data lost"),
])
def test_classifies_known_outcomes(tmp_path, code, expect, kind):
    assert run(tmp_path, code, expect)["kind"] == kind
    assert (ROOT / "models" / "tiny" / "README.md").is_file()  # the case ran in a copy


def test_a_failing_check_is_silent_wrong_and_an_unexpected_refusal_is_noted(tmp_path):
    r = run(tmp_path, "pass", "ok", check=lambda ctx, res: "scores unchanged")
    assert (r["kind"], r["detail"]) == ("silent wrong", "scores unchanged")
    r = run(tmp_path, REFUSE, "ok", mentions=r"--y")
    assert r["kind"] == "clear error" and r["detail"].startswith("refused, but should succeed")
    assert "does not name" in r["detail"]
    assert run(tmp_path, "pass", "ok", check=lambda ctx, res: faults.Lost("final/ gone")
               )["kind"] == "data lost"


def test_an_interrupt_is_sent_once_its_trigger_holds(tmp_path):
    code = ("import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: sys.exit(130)); "
            "print('ready', flush=True); time.sleep(30)")
    r = run(tmp_path, code, "ok", ok_rc=(130,),
            interrupt=(signal.SIGINT, lambda ctx, out, err: "ready" in out))
    assert r["kind"] == "correct" and r["seconds"] < 20


def test_case_list_is_well_formed():
    ids = [c.id for c in faults.CASES]
    assert len(ids) == len(set(ids))
    assert all(c.expect in ("ok", "refuse", "either") and c.what and c.cmd for c in faults.CASES)
    assert {c.area for c in faults.select("data")} == {"data"}
    with pytest.raises(SystemExit):
        faults.select("no-such-area")


@pytest.mark.slow  # a train.py subprocess: ~4 s idle (its torch import), 20 s on a busy machine
def test_a_real_case_runs(tmp_path):
    case = next(c for c in faults.CASES if c.id == "flag-steps-abc")
    r = faults.run_case(case, faults.Fixtures(tmp_path), tmp_path)
    assert r["kind"] == "clear error", r
