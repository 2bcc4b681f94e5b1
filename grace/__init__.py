"""grace as a library, once installed (`pip install .` or `pip install -e .` in the repo):

    from grace import GraceEncoder
    embeddings = GraceEncoder("tiny-lm").encode(["a text", "another text"])  # (2, H) numpy

Why this loader rather than a package of the files: the five files and infra/ import each other
by plain names (`import policy`, `from infra import cli`), so that `python train.py` runs from a
clone with nothing installed. Installed, the files sit in grace/src/ (pyproject.toml maps them
there, with models/); editable or in a clone, they stay at the repo root. This file imports them
from there, by file path and without touching sys.path: rollout, reward, policy and infra under
their plain names (the names the files use), train.py and evaluate.py as grace.train and
grace.evaluate only, so Hugging Face's `evaluate` package stays importable.
"""
import importlib.util
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
SOURCE = next(p for p in (_HERE / "src", _HERE.parent) if (p / "policy.py").is_file())


def _load(name, file):
    """SOURCE/file imported as the module `name` (a module of that name from another file is an
    error: two `policy` modules would silently disagree)."""
    path = SOURCE / file
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", None) or "").resolve() == path:
            return loaded
        raise ImportError(f"grace needs its own {name!r} ({path}), but {loaded.__file__} was "
                          "imported under that name first")
    package = [str(path.parent)] if path.name == "__init__.py" else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=package)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# in import order: policy imports rollout; infra's modules import policy and reward
rollout = _load("rollout", "rollout.py")
reward = _load("reward", "reward.py")
policy = _load("policy", "policy.py")
lora = _load("lora", "lora.py")  # (infra's runfolder and fast_decode import it)
infra = _load("infra", "infra/__init__.py")  # its modules then import as infra.cli, ...
train = _load("grace.train", "train.py")  # `grace-train` runs train.main
evaluate = _load("grace.evaluate", "evaluate.py")  # `grace-evaluate` runs evaluate.main
for _module in (rollout, reward, policy, lora, infra):
    sys.modules[f"grace.{_module.__name__}"] = _module  # `import grace.policy` works too

GraceEncoder = evaluate.GraceEncoder
encode_texts = evaluate.encode_texts
load, encode = policy.load, policy.encode

__all__ = ["GraceEncoder", "encode_texts", "load", "encode", "policy", "rollout", "reward",
           "train", "evaluate"]
