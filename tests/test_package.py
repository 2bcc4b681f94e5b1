"""pyproject.toml + grace/: `pip install .` (and `-e .`) give `from grace import GraceEncoder` in
any folder, the console scripts, the built-in models, and no top-level `evaluate` (Hugging Face's
package of that name must stay importable)."""
import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT

# Run from another folder, on the install alone: encode with the built-in model, then check names.
CHECK = textwrap.dedent("""
    import importlib, importlib.util, json, sys
    site = sys.argv[1]
    if sys.argv[2] == "editable":  # the editable finder is hooked in by a .pth: a site dir's job
        import site as _site
        _site.addsitedir(site)
    else:
        sys.path.insert(0, site)
    on_disk = {n: importlib.util.find_spec(n) for n in ("evaluate", "policy", "reward", "infra")}
    from grace import GraceEncoder
    import grace
    emb = GraceEncoder("tiny", max_new_tokens=4).encode(["a b", "c d e"])
    scripts = {}
    for name, target in json.loads(sys.argv[3]).items():
        module, attr = target.split(":")
        scripts[name] = callable(getattr(importlib.import_module(module), attr))
    try:  # evaluate.main returns its exit status (the console script exits with it)
        code = grace.evaluate.main(["--stpes", "3"])
    except SystemExit as e:
        code = e.code
    print(json.dumps(dict(
        shape=list(emb.shape), grace=grace.__file__, source=str(grace.SOURCE),
        models=sorted(p.name for p in grace.policy.MODELS.iterdir()),
        on_disk={n: s.origin if s else None for n, s in on_disk.items()},
        evaluate_after=getattr(importlib.util.find_spec("evaluate"), "origin", None),
        scripts=scripts, cli_exit=code, loaded=type(grace.load("tiny-lm")[0]).__name__)))
""")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """What the package is built from, copied: the build must not leave build/ or *.egg-info in
    the repo."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", *(p.name for p in ROOT.glob("*.py"))):
        shutil.copy(ROOT / name, src / name)
    for folder in ("grace", "infra", "models", "data"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _install(source, target, *editable):
    # offline and on the installed setuptools: no build isolation, no dependencies, no index
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation",
                    "--no-deps", "--no-index", "--target", str(target), *editable, str(source)],
                   check=True, capture_output=True, timeout=120)


def _check(target, mode, tmp_path):
    info = (target / "grace-0.1.0.dist-info" / "entry_points.txt").read_text()
    scripts = dict(line.split(" = ") for line in info.splitlines() if " = " in line)
    done = subprocess.run([sys.executable, "-c", CHECK, str(target), mode, json.dumps(scripts)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["shape"][0] == 2 and out["loaded"] == "Qwen2ForCausalLM"
    assert {"tiny", "tiny-lm"} <= set(out["models"])  # the built-in models travel with it
    assert set(scripts) == {"grace-train", "grace-evaluate"} and all(out["scripts"].values())
    assert out["cli_exit"] == 2  # grace-evaluate's parser: one line, exit 2
    assert out["on_disk"] == dict.fromkeys(("evaluate", "policy", "reward", "infra"))
    assert out["evaluate_after"] is None  # importing grace adds no top-level `evaluate`
    return out


def test_pip_install_gives_grace_anywhere_without_a_top_level_evaluate(source, tmp_path):
    """~15 s: the build and install (3 s) and one subprocess importing torch and transformers."""
    target = tmp_path / "site"
    _install(source, target)
    top = {p.name for p in target.iterdir()} - {"bin", "grace-0.1.0.dist-info", "__pycache__"}
    assert top == {"grace"}  # nothing else at the top level: no evaluate.py, policy.py, infra/
    out = _check(target, "installed", tmp_path)
    assert out["source"] == str(target / "grace" / "src")
    assert not (ROOT / "build").exists() and not (ROOT / "grace.egg-info").exists()


@pytest.mark.slow
def test_pip_install_editable_runs_the_source_folder(source, tmp_path):
    """~20 s. Editable: grace is the source folder's, so an edit there shows without reinstalling."""
    target = tmp_path / "site"
    _install(source, target, "-e")
    out = _check(target, "editable", tmp_path)
    assert out["source"] == str(source) and out["grace"] == str(source / "grace" / "__init__.py")
