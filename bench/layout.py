"""How minimal is the codebase: a markdown table of measured values, budgets, ok/over.
`python bench/layout.py [--tests]` from the repo root (--tests also times pytest).

Measures lines per file; concept/plumbing lines and lines over 100 columns of the concept files;
the one-step path and the AST-checked call chain down to the sampling math; README size and
banned words; import floors and cycles; test wall time. Concept lines of a file = its module
docstring + the full span (decorators, docstring, inner blank lines) of the top-level definitions
named in CONCEPT; all else is plumbing. A missing file or name (files move) is a note, not a crash.
"""
import argparse
import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

P, RO, RE, T, E, L = "policy.py", "rollout.py", "reward.py", "train.py", "evaluate.py", "lora.py"
BUDGET = {P: 280, RO: 200, RE: 210, T: 500, E: 350, L: 100}  # lines of each concept file
# CONCEPT: the definitions a reader of the paper needs. ALL = every top-level def and class.
ALL = "*"
CONCEPT = {
    P: ("DEFAULT_SYSTEM_PROMPT", "FALLBACK_TEMPLATE", "Encoded", "encode", "build_prompts",
        "render_prompt", "_tokenize_prompt", "pool_mask_from", "position_ids_from",
        "hidden_states", "mean_pool", "output_logits", "token_logprobs", "_chunk_logprobs",
        "_check_output_logits", "autocast", "low_precision", "stop_token_ids", "load"),
    RO: ("Rollout", "sample", "plain_step", "next_token", "filter_logits", "concat"),
    RE: (ALL, "REWARDS"),
    T: ("group_advantages", "kl_estimate", "loss_normaliser", "aggregate", "policy_loss",
        "contrastive_loss", "rl_step", "update", "step_optimizer", "contrastive_step", "encode",
        "run", "sts_spearman", "next_batch", "count_nonfinite", "main"),
    E: ("encode_texts", "GraceEncoder", "_unit", "run",
        "explain", "main"),
    L: (ALL,),
}
# together: the five files' 1500, + lora.py's 100
CONCEPT_TOTAL, CONCEPT_SHARE, WIDTH, WIDE_SHARE = 1600, 0.70, 100, 0.05
# The one optimizer step of GRACE, in reading order: (file, qualified name).
STEP_PATH = [
    (T, "run"), (T, "rl_step"), (P, "encode"), (P, "build_prompts"), (P, "_tokenize_prompt"),
    (P, "render_prompt"), (RO, "sample"), (RO, "plain_step"), (RO, "next_token"),
    (RO, "filter_logits"), (P, "pool_mask_from"), (P, "hidden_states"), (P, "mean_pool"),
    (RE, "release_rewards"), (RE, "grace_rewards"), (RE, "positive_term"),
    (RE, "negative_term"), (RE, "clustering_term"), (RE, "cross_group_supervised"),
    (RE, "_mean_over_other_groups"), (RE, "_groups"), (RE, "_finish"), (RE, "_check"),
    (T, "group_advantages"), (P, "token_logprobs"), (P, "_chunk_logprobs"),
    (P, "output_logits"), (T, "update"), (T, "loss_normaliser"),
    (T, "policy_loss"), (T, "kl_estimate"), (T, "aggregate"), (T, "step_optimizer")]
# From run down to the sampling math: each caller must name the next; depth = len - 1.
SAMPLING_CHAIN = [(T, "run"), (T, "rl_step"), (P, "encode"), (RO, "sample"), (RO, "next_token")]
PATH_LINES, PATH_FILES, PATH_DEPTH, README_BYTES, SLOW_S = 450, 4, 4, 12 * 1024, 90
BANNED = [r"\blent\b", r"\bsessions?\b", r"development machine", r"\.\./shared"]
GROUND = (P, RO, RE, L)  # import nothing from infra/, train, evaluate
ROOT = Path(__file__).resolve().parent.parent
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
NOTES, PARSED = [], {}

def parse(name):
    """(lines, tree) of ROOT/name, read once; None for what is missing or broken, with a note."""
    if name not in PARSED:
        lines = tree = None
        try:
            lines = (text := (ROOT / name).read_text()).splitlines()
            tree = ast.parse(text)
        except (OSError, SyntaxError, UnicodeDecodeError) as e:
            NOTES.append(f"note: {name}: {type(e).__name__}: {e}")
        PARSED[name] = lines, tree
    return PARSED[name]

def rel(path):
    return path.relative_to(ROOT).as_posix()

def names_of(node):
    if isinstance(node, DEFS):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return [n.id for t in targets if t for n in ast.walk(t) if isinstance(n, ast.Name)]

def span(node):
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return set(range(first, node.end_lineno + 1))

def find(name, qualname):
    """The top-level (or Class.method) nodes of file `name` that define qualname."""
    tree = parse(name)[1]
    body, (*outer, last) = tree.body if tree else [], qualname.split(".")
    for part in outer:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == part), [])
    return [n for n in body if last in names_of(n)]

def concept_lines(name, tree):
    keep = span(tree.body[0]) if ast.get_docstring(tree) is not None else set()
    for want in CONCEPT[name]:
        nodes = [n for n in tree.body if isinstance(n, DEFS)] if want == ALL else find(name, want)
        if not nodes:
            NOTES.append(f"warning: {name}: no top-level `{want}`")
        keep = keep.union(*map(span, nodes))
    return len(keep)

def verdict(ok):
    return "ok" if ok else "over"

def table(title, header, rows):
    lines = [header, ["---"] * len(header), *rows]
    print(f"## {title}\n\n" + "".join("| " + " | ".join(map(str, r)) + " |\n" for r in lines))

def section_files():
    rows, outside, count = [], 0, lambda p: len(parse(rel(p))[0] or [])
    for p in [p for d in ("", "infra", "tools") for p in sorted((ROOT / d).glob("*.py"))]:
        n, budget = count(p), BUDGET.get(rel(p))
        outside += n
        rows.append((rel(p), n, budget or "-", verdict(n <= budget) if budget else "-"))
    for d in ("bench", "tests"):
        files = sorted((ROOT / d).rglob("*.py"))
        rows.append((f"{d}/ ({len(files)} files)", sum(map(count, files)), "-", "-"))
    rows.append(("**total outside tests/ and bench/**", outside, "-", "-"))
    table("Lines per file", ("file", "lines", "budget", "status"), rows)

def section_concept():
    stats = []  # (file, lines, concept lines, lines over WIDTH, line budget)
    for name, budget in BUDGET.items():
        lines, tree = parse(name)
        if tree is not None:  # else parse() has noted it
            stats.append((name, len(lines), concept_lines(name, tree),
                          sum(len(x) > WIDTH for x in lines), budget))
    rows = [(f, n, c, n - c, f"{c / max(n, 1):.0%}", b, verdict(n <= b))
            for f, n, c, _, b in stats]
    rows += [(f, "n/a (see notes)", "-", "-", "-", b, "-") for f, b in BUDGET.items()
             if parse(f)[1] is None]
    _, n, c, _, _ = total = ("**together**", *(sum(s[i] for s in stats) for i in (1, 2, 3)), 0)
    rows.append(("**together**", n, c, n - c, f"{c / max(n, 1):.0%}",
                 f"{CONCEPT_TOTAL}, >= {CONCEPT_SHARE:.0%}",
                 verdict(n <= CONCEPT_TOTAL and c >= CONCEPT_SHARE * n)))
    table("Concept files", ("file", "lines", "concept", "plumbing", "concept share", "budget",
                            "status"), rows)
    table(f"Lines over {WIDTH} columns", ("file", "lines", "share", "budget", "status"),
          [(f, w, f"{w / max(n, 1):.1%}", f"{WIDE_SHARE:.0%}", verdict(w <= WIDE_SHARE * n))
           for f, n, _, w, _ in stats + [total]])

def chain_check():
    """The hops of SAMPLING_CHAIN whose caller never names the callee (a call, or the function
    handed on as a value, e.g. `step_fn = rl_step`), or "ok"."""
    def calls(node):
        refs = [n for n in ast.walk(node) if isinstance(n, (ast.Name, ast.Attribute))]
        return {n.id if isinstance(n, ast.Name) else n.attr for n in refs}
    broken = [f"BROKEN at {f1}:{a} -> {f2}:{b}"
              for (f1, a), (f2, b) in zip(SAMPLING_CHAIN, SAMPLING_CHAIN[1:])
              if not any(b.split(".")[-1] in calls(n) for n in find(f1, a))]
    return "; ".join(broken) or "ok"

def section_step_path():
    lines, files, defs = set(), set(), 0
    for name, qual in STEP_PATH:
        nodes = find(name, qual)
        if not nodes:
            NOTES.append(f"warning: step path: {name}:{qual} not found")
            continue
        defs, files = defs + 1, files | {name}
        lines |= {(name, i) for i in span(nodes[0])}
    depth, chain = len(SAMPLING_CHAIN) - 1, chain_check()
    table("The one-step path", ("measure", "value", "budget", "status"), [
        ("lines of its definitions", len(lines), PATH_LINES, verdict(len(lines) <= PATH_LINES)),
        ("distinct files", len(files), PATH_FILES, verdict(len(files) <= PATH_FILES)),
        ("definitions found", f"{defs} of {len(STEP_PATH)}", "-", "-"),
        ("calls from run to next_token", depth, PATH_DEPTH, verdict(depth <= PATH_DEPTH)),
        ("that chain, checked in the AST", chain, "ok", verdict(chain == "ok"))])

def section_docs():
    readme, hits = ROOT / "README.md", []
    for p in [readme] + sorted((ROOT / "docs").glob("*.md")):
        for i, line in enumerate(p.read_text().splitlines() if p.exists() else [], 1):
            hits += [f"{rel(p)}:{i} `{m[0]}`" for m in re.finditer("|".join(BANNED), line, re.I)]
    size = readme.stat().st_size if readme.exists() else None
    table("README and docs", ("measure", "value", "budget", "status"), [
        ("README.md size", "missing" if size is None else f"{size} B ({size / 1024:.1f} KB)",
         f"{README_BYTES} B (12 KB)", verdict(size is not None and size <= README_BYTES)),
        ("banned words in README/docs", "; ".join(hits) or "none", "none", verdict(not hits))])

def imports(mod, mods):
    """The project modules that `mod` imports anywhere (inside functions too)."""
    tree, found = parse(mods[mod])[1], set()
    pkg = (mod if mods[mod].endswith("__init__.py") else mod.rpartition(".")[0]).split(".")
    for n in ast.walk(tree) if tree else []:
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            base = ".".join(pkg[:len(pkg) - n.level + 1]) if n.level else ""
            m = ".".join(x for x in (base, n.module) if x)
            found |= {f"{m}.{a.name}" if f"{m}.{a.name}" in mods else m for a in n.names}
    return {m for m in found if m in mods and m != mod}

def cycles(graph, path=None):
    """Elementary import cycles, each once, starting from its smallest member."""
    if path is None:
        return [c for start in sorted(graph) for c in cycles(graph, [start])]
    found = [" -> ".join(path + path[:1]) for nxt in graph[path[-1]] if nxt == path[0]]
    for nxt in sorted(graph[path[-1]]):
        if nxt > path[0] and nxt not in path:
            found += cycles(graph, path + [nxt])
    return found

def section_imports():
    # the project's modules: top level, infra.*, tools.* (a package is its __init__)
    files = [*ROOT.glob("*.py"), *(ROOT / "infra").glob("*.py"), *(ROOT / "tools").glob("*.py")]
    mods = {".".join(Path(rel(p)).with_suffix("").parts).removesuffix(".__init__"): rel(p)
            for p in files}
    graph, rows = {m: imports(m, mods) for m in mods}, []
    for m, f in sorted(mods.items(), key=lambda kv: kv[1]):
        floor = ("infra", "train", "evaluate") if f in GROUND else ("train", "evaluate")
        if f in GROUND or m.split(".")[0] == "infra":
            bad = sorted(i for i in graph[m] if i.split(".")[0] in floor)
            rows.append((f"{f} imports of {'/'.join(floor)}", ", ".join(bad) or "ok", "ok",
                         verdict(not bad)))
    found = cycles(graph)
    rows.append(("import cycles", "; ".join(found[:10]) or "none", "none", verdict(not found)))
    table("Import floors", ("measure", "value", "budget", "status"), rows)

def run_pytest(*extra):
    """(wall seconds, pytest's summary line) of one run of the suite."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", *extra]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [x.strip("= ") for x in p.stdout.splitlines() if x.strip()]
    summary = next((x for x in reversed(lines) if re.search(r"\d+ \w+.* in [\d.]+s", x)), None)
    return time.perf_counter() - t, summary or (lines[-1] if lines else f"exit {p.returncode}")

def section_tests(timed):
    if not timed:
        return print("## Tests\n\n(tests not timed: pass --tests)\n")
    (fast_s, fast), (all_s, every) = run_pytest("-m", "not slow"), run_pytest()
    table("Tests", ("run", "wall s", "summary", "budget", "status"), [
        ('-m "not slow"', f"{fast_s:.1f}", fast, f"{SLOW_S} s", verdict(fast_s <= SLOW_S)),
        ("all", f"{all_s:.1f}", every, "-", "-")])

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tests", action="store_true", help="time the test suite too")
    args = ap.parse_args()
    print(f"# Layout of {ROOT.name}\n")
    for section in (section_files, section_concept, section_step_path, section_docs,
                    section_imports):
        section()
    section_tests(args.tests)
    for note in dict.fromkeys(NOTES):
        print(f"- {note}")

if __name__ == "__main__":
    main()
