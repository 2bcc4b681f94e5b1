"""evaluate.py: batch-independent embeddings, the Python API, mteb's protocol, perplexity, the CLI.

Offline with the tiny model and small slices of ../shared/data (written to a temporary folder).
Local files as mteb tasks, the result cache and the summary table: tests/infra/test_mteb_tasks.py.
"""
import json
import math
import time

import numpy as np
import pytest
import torch

import evaluate
import policy
from helpers import NEW_EVAL as NEW  # rationale tokens of the `encoder` fixture
from infra import cli, diagnostics

SEE = "(see: python evaluate.py -h)"  # the end of every parser error line


# ----------------------------------------------------------------------------- the mteb protocol

def test_encoder_satisfies_mteb_protocol(encoder):
    from mteb.models.model_meta import ScoringFunction
    from mteb.models.models_protocols import EncoderProtocol

    assert isinstance(encoder, EncoderProtocol)
    meta = encoder.mteb_model_meta
    assert meta.name == "grace/tiny" and meta.revision == "tiny-seed0"
    assert meta.similarity_fn_name is ScoringFunction.COSINE
    baseline = evaluate.GraceEncoder("tiny", model=encoder.model, tokenizer=encoder.tokenizer,
                                     rationale=False)
    assert baseline.mteb_model_meta.experiment_name != meta.experiment_name  # filed apart
    # so are runs with another system prompt or prompt length; a default run keeps its name

    def name(**kw):
        return evaluate.GraceEncoder("tiny", model=encoder.model, tokenizer=encoder.tokenizer,
                                     max_new_tokens=NEW, batch_size=8,
                                     **kw).mteb_model_meta.experiment_name

    names = [name(), name(system_prompt="Describe the text."), name(max_length=256)]
    assert names[0] == meta.experiment_name and len(set(names)) == 3


# ----------------------------------------------------------------------------- encoding

TEXTS = ["A man is playing a guitar.", "Short.",
         "The quick brown fox jumps over the lazy dog near the river bank.",
         "A woman slices an onion.",
         "Two dogs run across a field of tall grass while a child watches."]


def test_embeddings_do_not_depend_on_batch_composition(tiny):
    model, tokenizer = tiny
    kw = dict(max_new_tokens=NEW)
    alone = np.concatenate([evaluate.encode_texts(model, tokenizer, [t], **kw) for t in TEXTS])
    sorted_batches = evaluate.encode_texts(model, tokenizer, TEXTS, batch_size=2, **kw)
    one_batch = evaluate.encode_texts(model, tokenizer, TEXTS, batch_size=8, sort=False, **kw)
    assert alone.dtype == np.float32 and alone.shape == (len(TEXTS), model.config.hidden_size)
    np.testing.assert_allclose(sorted_batches, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(one_batch, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(alone, axis=1), 1.0, atol=1e-5)


def test_rationale_modes_differ_and_no_rationale_pools_the_prompt(tiny):
    model, tokenizer = tiny
    with_r, rationales = evaluate.encode_texts(model, tokenizer, TEXTS, max_new_tokens=NEW,
                                               return_rationales=True)
    without = evaluate.encode_texts(model, tokenizer, TEXTS, rationale=False)
    assert all(rationales) and not np.allclose(with_r, without, atol=1e-3)
    ids, mask, start = policy.build_prompts(tokenizer, TEXTS)
    with torch.no_grad():
        direct = policy.mean_pool(policy.hidden_states(model, ids, mask),
                                  policy.pool_mask_from(mask, start)).numpy()
    np.testing.assert_allclose(without, direct, atol=1e-5, rtol=0)


def test_task_instruction_goes_to_the_system_prompt_by_prompt_type(tiny):
    import mteb
    from mteb.types import PromptType

    model, tokenizer = tiny
    enc = evaluate.GraceEncoder("tiny", model=model, tokenizer=tokenizer, instructions=True)
    meta = mteb.get_task("SciFact").metadata  # metadata only: nothing is downloaded
    assert meta.prompt["query"] in enc.system_prompt_for(meta, PromptType.query)
    assert enc.system_prompt_for(meta, PromptType.document) == policy.DEFAULT_SYSTEM_PROMPT


# ----------------------------------------------------------------------------- CLI

@pytest.mark.slow
def test_cli_summary_table_with_baseline_and_result_files(sts_file, tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["--local", str(sts_file), "--baseline", "tiny", "--max-new-tokens", str(NEW),
            "--out", str(out)]
    rc = evaluate.main(argv)
    text = capsys.readouterr().out
    assert rc == 0
    assert "LocalSTS_sts_dev" in text and "average STS (1)" in text
    assert "diff" in text and "+0.00" in text
    assert "rationale tokens (mean)" in text and "empty rationales (%)" in text
    assert f"rationale <= {NEW} tokens (given)" in text and "system prompt (default)" in text
    # mteb's own cache layout under --out (mteb.ResultCache(out) reads it), the path printed
    files = list(out.glob("results/grace__tiny/tiny-seed0/experiments/*/LocalSTS_sts_dev.json"))
    assert len(files) == 1 and f"results in {files[0].parent}" in text
    assert evaluate.main(argv) == 0  # a rerun reuses both results
    text = capsys.readouterr().out
    assert text.count("(cached)") == 2 and "rationale tokens (mean)" not in text
    assert evaluate.main(argv + ["--recompute"]) == 0
    assert "(cached)" not in capsys.readouterr().out


def _corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A man plays a guitar.\nA cat sleeps on the sofa.\n\n"
                      "Stocks fell sharply today.\n")
    return corpus


def test_cli_explain_with_corpus(tmp_path, capsys):
    rc = evaluate.main(["--explain", "Someone is playing music.",
                        "--corpus", str(_corpus(tmp_path)),
                        "--max-new-tokens", str(NEW), "--neighbours", "2"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "=== text: Someone is playing music." in text
    assert text.count("rationale:") == 3  # the text + 2 neighbours (of 3 corpus texts)


@pytest.mark.parametrize("argv", [["--top-k", "3"], ["--top-k=3"], ["--top-k"]])
def test_top_k_was_renamed_neighbours(argv, tmp_path, capsys):
    full = ["--explain", "hi", "--corpus", str(_corpus(tmp_path))] + argv
    assert evaluate.main(full) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: --top-k was renamed --neighbours {SEE}\n"
    assert captured.out == ""
    with pytest.raises(SystemExit) as e:
        cli.evaluate_args(argv)
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert cli.evaluate_args(["--explain", "hi", "--neighbours", "2"]).neighbours == 2
    assert cli.evaluate_args(["--explain", "hi"]).neighbours == 3


def _bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n'
                    '{"sentence1": "a", "sentence2": "b"}\n')
    return path


@pytest.mark.parametrize("argv, message", [
    # every mteb task / benchmark is built to find the close matches: seconds
    pytest.param(["--tasks", "STSBenchmrk"],
                 "unknown task 'STSBenchmrk'; close matches: STSBenchmark,",
                 marks=pytest.mark.slow),
    pytest.param(["--benchmark", "MTEB(eng, v9)"],
                 "unknown benchmark 'MTEB(eng, v9)'; close matches: MTEB(eng, v",
                 marks=pytest.mark.slow),
    (["--local", "{tmp}/bad.jsonl"], "bad.jsonl:2: field 'score' is missing"),
    (["--local", "{tmp}/missing.jsonl"], "missing.jsonl: no such file or folder"),
    (["--local", "{tmp}/broken.jsonl"], "broken.jsonl:1:"),
    (["--explain", "hi", "--corpus", "{tmp}/missing.txt"], "missing.txt: no such file"),
    (["--local", "{tmp}/bad.jsonl", "--model", "{tmp}/no_such_model"], "model folder not found"),
    # offline (conftest): the hub task has no data
    (["--tasks", "STSBenchmark"], "could not be downloaded"),
    (["--explain", "hi", "--corpus", "{tmp}/empty.txt"], "empty.txt: no texts"),
    (["--perplexity", "{tmp}/empty.txt"], "empty.txt: no texts"),
    (["--explain", "hi", "--max-length", "5"],
     "--max-length 5: max_length=5 is too short for the prompt template"),
])
def test_cli_bad_input_one_line_nonzero(argv, message, tmp_path, capsys):
    _bad_jsonl(tmp_path)
    (tmp_path / "broken.jsonl").write_text('{"sentence1": "a",\n')
    (tmp_path / "empty.txt").write_text("\n  \n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = evaluate.main(argv + ["--max-new-tokens", "2", "--out", str(tmp_path / "results")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # anything before it is mteb's logging, not ours
    assert rc != 0 and "Traceback" not in err
    assert last.startswith("error: ") and message in last and err.count("error: ") == 1
    if "download" in message:
        assert "--local" in last


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be in [1, 65536], got 0"),
    (["--max-new-tokens=-1"], "--max-new-tokens must be in [0, 131072], got -1"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
])
def test_cli_bad_numbers_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.evaluate_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", str(10 ** 8)], "--max-new-tokens must be in [0, 131072], got 100000000"),
    (["--batch-size", str(10 ** 21)], f"--batch-size must be in [1, 65536], got {10 ** 21}"),
    (["--seed", str(10 ** 21)], f"--seed must be in [0, {2 ** 63 - 1}], got {10 ** 21}"),
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--limit", "0", "--local", "x"], f"--limit must be in [1, {2 ** 40}], got 0"),
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "foo:0"], "--device"),
    (["--explain", "hi", "--tasks", "STS12"], "--explain prints rationales only"),
    (["--explain", "hi", "--local", "x.jsonl"], "--explain prints rationales only"),
    (["--explain", "hi", "--benchmark", "MTEB(eng, v1)"], "--explain prints rationales only"),
    (["--corpus", "c.txt", "--tasks", "STS12"], "--corpus is searched with --explain"),
    (["--limit", "5", "--tasks", "STS12"], "--limit cuts --local tasks only"),
    (["--limit", "5", "--protocol", "release"], "--limit cuts --local tasks only"),
    (["--explain", "   "], "--explain: a text is empty or whitespace only"),
    (["--max-new-tokens", "many"], "invalid int value: 'many'"),
])
def test_cli_bad_flags_one_line_exit_2(argv, message, capsys):
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def _faulty(tmp_path, case):
    """A local task file or folder with one fault; -> its path."""
    def sts(score):
        return {"sentence1": "a cat", "sentence2": "a dog", "score": score}

    if case.startswith("sts"):
        bad = {"sts_nan": "NaN", "sts_inf": "Infinity", "sts_bool": "true"}.get(case)
        rows = [sts(1.0), '{"sentence1": "x", "sentence2": "y", "score": %s}' % bad] if bad else \
            [sts(2.0), sts(2.0), sts(2.0)] if case == "sts_constant" else [sts(1.0)]
        return _write(tmp_path / f"{case}.jsonl", rows)
    if case.startswith("cls"):
        two = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(6)]
        rows = {"cls_one_class": [{"text": f"t{i}", "label": "a"} for i in range(6)],
                "cls_singleton": two + [{"text": "z", "label": "c"}],
                "cls_blank": [{"text": "t1", "label": "a"}, {"text": "   ", "label": "b"}]}[case]
        return _write(tmp_path / f"{case}.jsonl", rows)
    folder = tmp_path / case
    docs = [{"_id": "d1", "text": "first"}, {"_id": "d2", "text": "second"}]
    if case == "beir_duplicate_id":
        docs.append({"_id": "d1", "text": "again"})
    _write(folder / "corpus.jsonl", docs)
    _write(folder / "queries.jsonl", [{"_id": "q1", "text": "which one"}])
    header = "query-id\tcorpus-id\tscore"
    qrels = {"beir_header_only": [header],
             "beir_no_relevant": [header, "q1\td1\t0"]}.get(case, ["q1\td1\t1"])
    _write(folder / "qrels" / "test.tsv", qrels)
    return folder


@pytest.mark.parametrize("case, message", [
    ("sts_nan", ":2: field 'score' must be finite"),
    ("sts_inf", ":2: field 'score' must be finite"),
    ("sts_bool", ":2: field 'score' must be a number"),
    ("sts_constant", "Spearman's correlation is undefined for a constant"),
    ("sts_one_row", "needs at least 2 pairs, found 1"),
    ("cls_one_class", "needs at least 2 labels, found 1"),
    ("cls_singleton", ":7: label 'c' has a single row"),
    ("cls_blank", ":2: field 'text' is only whitespace"),
    ("beir_duplicate_id", "corpus.jsonl:3: duplicate _id 'd1' (also on line 1)"),
    ("beir_header_only", "test.tsv: only a header line, no judgements"),
    ("beir_no_relevant", "test.tsv: no relevant document"),
])
def test_degenerate_local_tasks_one_line_exit_2(case, message, tmp_path, capsys):
    path = _faulty(tmp_path, case)
    assert evaluate.main(["--local", str(path), "--out", ""]) == 2  # refused before a model loads
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1
    assert message in err


def test_offline_typo_in_hub_model_name_fails_at_once(sts_file, capsys):
    start = time.perf_counter()
    rc = evaluate.main(["--local", str(sts_file), "--baseline", "Qwen/Qwen2.5-1.5B-Instrct",
                        "--out", ""])
    captured = capsys.readouterr()  # read once: a second read holds only what came after
    err = captured.err
    assert rc == 2 and err.startswith("error: model 'Qwen/Qwen2.5-1.5B-Instrct'")
    assert err.count("\n") == 1
    assert time.perf_counter() - start < 10
    # before any task ran
    assert "grace/tiny" not in captured.out and "LocalSTS" not in captured.out


# -------------------------------------------------------------- one embedding path, the Python API

def test_encode_texts_is_policy_encode(tiny):
    model, tokenizer = tiny
    greedy = policy.encode(model, tokenizer, TEXTS, max_new_tokens=NEW).embeddings.numpy()
    ours = evaluate.encode_texts(model, tokenizer, TEXTS, max_new_tokens=NEW)
    np.testing.assert_allclose(ours, greedy, atol=1e-5)
    # sampled: the same draws when the batch is the same and the generator has the same seed
    gen = torch.Generator().manual_seed(7)
    sampled = policy.encode(model, tokenizer, TEXTS, max_new_tokens=NEW, temperature=1.0,
                            generator=gen)
    ours, rats = evaluate.encode_texts(model, tokenizer, TEXTS, max_new_tokens=NEW,
                                       temperature=1.0, seed=7, sort=False,
                                       batch_size=len(TEXTS), return_rationales=True)
    np.testing.assert_allclose(ours, sampled.embeddings.numpy(), atol=1e-5)
    assert rats == diagnostics.rationale_stats(tokenizer, sampled.rollout)[0]


def test_python_api_is_sentence_transformers_shaped(tiny):
    model, tokenizer = tiny
    enc = evaluate.GraceEncoder("tiny", model=model, tokenizer=tokenizer, max_new_tokens=NEW)
    emb = enc.encode(TEXTS, batch_size=2, show_progress_bar=True, convert_to_tensor=False,
                     normalize_embeddings=True)
    assert isinstance(emb, np.ndarray) and emb.dtype == np.float32
    assert emb.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(emb, evaluate.encode_texts(model, tokenizer, TEXTS,
                                                          max_new_tokens=NEW), atol=1e-5)
    tensor = enc.encode(TEXTS[:2], convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor)
    assert torch.allclose(tensor, torch.from_numpy(emb[:2]), atol=1e-5)
    assert enc.encode(TEXTS[0]).shape == (64,)
    assert torch.allclose(enc.similarity(emb[:1], emb[:1]), torch.ones(1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="text 1 is empty or whitespace only"):
        enc.encode(["fine", " \t"])
    # mteb's DataLoader of dict batches gives the same vectors
    loader = [{"text": TEXTS[:3]}, {"text": TEXTS[3:]}]
    from_loader = enc.encode(loader, task_metadata=None, hf_split="test", hf_subset="default")
    np.testing.assert_allclose(from_loader, emb, atol=1e-5)


def test_checkpoint_grace_json_sets_defaults(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    folder = tmp_path / "step-20"
    model.save_pretrained(folder), tokenizer.save_pretrained(folder)
    (folder / "grace.json").write_text(json.dumps({
        "max_new_tokens": 3, "temperature": 1.0, "system_prompt": "Describe.",
        "max_prompt_tokens": 512, "base_model": "tiny", "step": 20}))
    enc = evaluate.GraceEncoder(str(folder))
    assert enc.settings["max_new_tokens"] == 3 and enc.system_prompt == "Describe."
    assert enc.settings["max_length"] == 512
    assert enc.settings["temperature"] == 0.0  # evaluation stays greedy
    assert "rationale <= 3 tokens (grace.json)" in enc.describe()
    assert evaluate.GraceEncoder(str(folder), max_new_tokens=5).settings["max_new_tokens"] == 5
    assert evaluate.main(["--model", str(folder), "--explain", "A cat."]) == 0
    assert "rationale <= 3 tokens (grace.json)" in capsys.readouterr().out  # printed at start


# ----------------------------------------------------------------------------- perplexity

def test_perplexity_matches_a_float64_hand_computation(tiny):
    import copy

    model, tokenizer = tiny
    texts = ["A man is playing a guitar.", "Short.", "Two dogs run across a field of tall grass."]
    ours = diagnostics.perplexity(model, tokenizer, texts, batch_size=2)  # batched, left-padded
    ref = copy.deepcopy(model).double()
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            logp = ref(input_ids=ids).logits[0, :-1].log_softmax(-1)
            nll -= logp.gather(-1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
    assert ours == pytest.approx(math.exp(nll / count), rel=1e-4)


@pytest.mark.slow  # two models loaded and collected (gc.collect): over 1.5 s in a full session
def test_cli_perplexity(tmp_path, capsys):
    path = tmp_path / "held_out.txt"
    path.write_text("A man plays a guitar.\n\nA cat sleeps on the sofa.\n")
    assert evaluate.main(["--perplexity", str(path), "--baseline", "tiny", "--out", ""]) == 0
    out = capsys.readouterr().out
    assert out.count("perplexity on 2 texts") == 2


# ----------------------------------------------------------------------------- -h and --compile

@pytest.mark.slow
def test_help_is_fast_and_shows_defaults():
    import subprocess
    import sys

    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-X", "importtime", str(evaluate.__file__), "-h"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "(default: 16)" in run.stdout
    assert "(default: .)" in run.stdout and "../shared" not in run.stdout
    # -X importtime: "import time: self | cumulative | module", one line per module imported
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()
                if line.startswith("import time:")}
    assert "torch" in imported and "infra.cli" in imported  # the listing is there to check
    assert not {m for m in imported if m == "mteb" or m.startswith("mteb.")}, "-h imports mteb"
    assert time.perf_counter() - start < 60


@pytest.mark.slow
def test_the_compiled_sampler_gives_the_plain_embeddings(tiny):
    """compile=True (static cache, torch.compile, prompts padded to a bucket) embeds as plain."""
    model, tok = tiny
    texts = ["A cat sleeps on the mat.", "Rain."]
    plain = evaluate.encode_texts(model, tok, texts, max_new_tokens=5, batch_size=2)
    fast = evaluate.encode_texts(model, tok, texts, max_new_tokens=5, batch_size=2, compile=True)
    assert np.allclose(plain, fast, atol=1e-4)
    enc = evaluate.GraceEncoder("tiny", model=model, tokenizer=tok, device="cpu")
    assert enc.settings["compile"] is False


# ----------------------------------------------------------------------------- --no-normalize

def _raw_means(model, sequences, attention_mask, pool_mask):
    """By hand, float64: each row's hidden states at its pooled positions, averaged."""
    with torch.no_grad():
        hidden = policy.hidden_states(model, sequences, attention_mask).double()
    return np.stack([hidden[i, pool_mask[i].bool()].mean(0).numpy() for i in range(len(hidden))])


def test_no_normalize_is_the_raw_masked_mean(tiny):
    model, tokenizer = tiny
    # the prompt alone: build_prompts' pool mask (text on, no system prompt)
    ids, mask, start = policy.build_prompts(tokenizer, TEXTS)
    ref = _raw_means(model, ids, mask, policy.pool_mask_from(mask, start))
    raw = evaluate.encode_texts(model, tokenizer, TEXTS, rationale=False, normalize=False)
    np.testing.assert_allclose(raw, ref, atol=1e-5, rtol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    unit = evaluate.encode_texts(model, tokenizer, TEXTS, rationale=False)
    np.testing.assert_allclose(unit, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    # with a rationale (greedy: the same rollout): text + rationale, through the encoder too
    enc = policy.encode(model, tokenizer, TEXTS, max_new_tokens=NEW)
    ro = enc.rollout
    ref = _raw_means(model, ro.sequences, ro.attention_mask, enc.pool_mask)
    encoder = evaluate.GraceEncoder("tiny", model=model, tokenizer=tokenizer, max_new_tokens=NEW,
                                    normalize=False)
    raw = encoder.encode(TEXTS)
    np.testing.assert_allclose(raw, ref, atol=1e-5, rtol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    assert "raw mean, not normalised (given)" in encoder.describe()
    assert "L2-normalised mean (default)" in evaluate.GraceEncoder(
        "tiny", model=model, tokenizer=tokenizer).describe()


@pytest.mark.parametrize("argv, expected", [
    ([], None), (["--normalize"], True), (["--no-normalize"], False)])
def test_normalize_flag(argv, expected):
    assert cli.evaluate_args(["--explain", "hi"] + argv).normalize is expected


# ----------------------------------------------------------------------------- --protocol

# The release's evaluation (eval.sh + eval_mteb.py), written out here from its scripts
RELEASE_PROMPT = ("Read and analyze the following text, then you need to provide your reasoning "
                  "within <think></think> tags. Finally, generate a comprehensive understanding "
                  "of this text.")
RELEASE = dict(max_new_tokens=2048, system_prompt=RELEASE_PROMPT, max_length=1024,
               temperature=1.0, top_p=1.0, normalize=False)


def _checkpoint(tiny, folder, **saved):
    model, tokenizer = tiny
    model.save_pretrained(folder), tokenizer.save_pretrained(folder)
    (folder / "grace.json").write_text(json.dumps(dict(saved, base_model="tiny", step=20)))
    return folder


def test_release_protocol_settings(tiny, tmp_path):
    model, tokenizer = tiny
    enc = evaluate.GraceEncoder("tiny", model=model, tokenizer=tokenizer, protocol="release")
    assert enc.embedding() == dict(RELEASE, seed=0, rationale=True)
    assert set(enc.sources.values()) == {"release"}
    # a flag given wins; grace's own defaults stay grace's
    enc = evaluate.GraceEncoder("tiny", model=model, tokenizer=tokenizer, protocol="release",
                                temperature=0.0, normalize=True, seed=3)
    assert enc.settings["temperature"] == 0.0 and enc.settings["normalize"] is True
    assert enc.settings["seed"] == 3 and enc.settings["max_new_tokens"] == 2048
    enc = evaluate.GraceEncoder("tiny", model=model, tokenizer=tokenizer)
    assert enc.embedding() == dict(max_new_tokens=256, system_prompt=policy.DEFAULT_SYSTEM_PROMPT,
                                   max_length=1024, temperature=0.0, top_p=1.0, seed=0,
                                   normalize=True, rationale=True)
    # a checkpoint's grace.json fills the three it saves under grace's protocol only
    folder = _checkpoint(tiny, tmp_path / "ckpt", max_new_tokens=5, system_prompt="Describe.",
                         max_prompt_tokens=512)
    grace = evaluate.GraceEncoder(str(folder), model=model, tokenizer=tokenizer)
    assert (grace.settings["max_new_tokens"], grace.system_prompt,
            grace.settings["max_length"]) == (5, "Describe.", 512)
    release = evaluate.GraceEncoder(str(folder), model=model, tokenizer=tokenizer,
                                    protocol="release")
    assert (release.settings["max_new_tokens"], release.system_prompt,
            release.settings["max_length"]) == (2048, RELEASE_PROMPT, 1024)


@pytest.mark.parametrize("argv, benchmark", [
    (["--protocol", "release"], "GRACE-release"),
    (["--protocol", "release", "--tasks", "STS12"], None),
    (["--protocol", "release", "--local", "x.jsonl"], None),
    (["--protocol", "release", "--benchmark", "MTEB(eng, v1)"], "MTEB(eng, v1)"),
    (["--protocol", "release", "--explain", "hi"], None),
    ([], None),
])
def test_release_protocol_runs_the_release_tasks_when_none_are_named(argv, benchmark):
    args = cli.evaluate_args(argv)
    assert args.benchmark == benchmark
    # the flags it sets stay unset in the parser: the encoder fills them from the protocol
    assert (args.temperature, args.top_p, args.normalize, args.max_new_tokens) == (None,) * 4


def test_cli_release_protocol_says_what_it_embeds_with(capsys):
    assert evaluate.main(["--protocol", "release", "--explain", "A cat.",
                          "--max-new-tokens", "2", "--max-length", "200"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "rationale <= 2 tokens (given), temperature 1.0, top-p 1.0, seed 0 (release)" in line
    assert "prompt <= 200 tokens (given)" in line and "raw mean, not normalised (release)" in line
    assert f"system prompt (release): {RELEASE_PROMPT[:57] + '...'!r}" in line


def test_cli_release_protocol_says_which_task_runs_another_split(capsys):
    """One line per task that has no split "test", before the models load (offline here: the
    task's data set is then refused, in one line)."""
    rc = evaluate.main(["--protocol", "release", "--tasks", "MSMARCO,STS12", "--out", "",
                        "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert rc == 2 and "could not be downloaded" in captured.err.strip().splitlines()[-1]
    lines = captured.out.splitlines()
    assert lines[0] == ("MSMARCO: the release asked for split 'test', which mteb 2.26.24 does not "
                        "define for this task; grace runs its 'dev' split instead")
    assert lines[1].startswith("== grace/tiny: rationale <= 2 tokens (given), temperature 1.0")
    assert sum("split" in line for line in lines) == 1


def test_cli_protocol_refuses_an_unknown_one(capsys):
    with pytest.raises(SystemExit) as e:
        cli.evaluate_args(["--protocol", "paper"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'paper'" in err


# ----------------------------------------------------------------------------- --baseline

def test_baseline_gets_the_first_models_settings(tiny, tmp_path):
    """embedding() of the first encoder makes the second embed as it does."""
    model, tokenizer = tiny
    folder = _checkpoint(tiny, tmp_path / "ckpt", max_new_tokens=5, system_prompt="Describe.",
                         max_prompt_tokens=512)
    first = evaluate.GraceEncoder(str(folder), model=model, tokenizer=tokenizer, top_p=0.9)
    second = evaluate.GraceEncoder("tiny", model=model, tokenizer=tokenizer, **first.embedding())
    assert second.embedding() == first.embedding()
    assert (second.settings["max_new_tokens"], second.system_prompt, second.settings["top_p"],
            second.settings["max_length"]) == (5, "Describe.", 0.9, 512)


def recorded_encoders(monkeypatch):
    """-> the list every GraceEncoder that evaluate.py builds from now on is appended to."""
    made = []

    class Recorded(evaluate.GraceEncoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(evaluate, "GraceEncoder", Recorded)
    return made


@pytest.mark.slow  # two models, an mteb task each
def test_cli_baseline_embeds_with_the_first_models_settings(tiny, sts_file, tmp_path, capsys,
                                                            monkeypatch):
    made = recorded_encoders(monkeypatch)
    folder = _checkpoint(tiny, tmp_path / "ckpt", max_new_tokens=5)
    common = ["--local", str(sts_file), "--limit", "4", "--out", ""]
    assert evaluate.main(["--model", str(folder), "--baseline", "tiny"] + common) == 0
    out = capsys.readouterr().out
    assert [e.settings["max_new_tokens"] for e in made] == [5, 5]
    assert made[0].embedding() == made[1].embedding()
    label = f"{folder.parent.name}/{folder.name}"
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("== ")] == \
        [f"== {label}", "== grace/tiny"]
    assert out.count(f"== {label}: rationale <= 5 tokens (grace.json)") == 1
    assert out.count(f"== grace/tiny: rationale <= 5 tokens (as {label})") == 1
    assert max(e.stats["tokens"] / e.stats["texts"] for e in made) <= 5
    made.clear()  # the other way round: tiny's defaults, the checkpoint's grace.json unread
    assert evaluate.main(["--model", "tiny", "--baseline", str(folder)] + common) == 0
    assert [e.settings["max_new_tokens"] for e in made] == [256, 256]
    assert "== grace/tiny: rationale <= 256 tokens (default)" in capsys.readouterr().out


# ------------------------------------------------------- bad input: model folders, grace.json, ...

def _saved(tiny, folder, weights=None, tokenizer=True, **grace):
    """tiny saved as a checkpoint folder; weights: a function to change them first."""
    import copy

    model, tok = tiny
    if weights:
        model = copy.deepcopy(model)
        weights(model)
    model.save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    if grace:
        (folder / "grace.json").write_text(json.dumps(grace))
    return folder


def _nan(model):
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")


@pytest.mark.parametrize("case, message", [
    ("cut", "model.safetensors is missing or cut short; copy or save the model again"),
    ("no_tokenizer", "no tokenizer (none of tokenizer.json"),
    ("nan", "the weights hold NaN or inf values"),
    ("string_tokens", "grace.json: field 'max_new_tokens' must be an integer >= 0, got 'many'"),
    ("negative_tokens", "grace.json: field 'max_new_tokens' must be an integer >= 0, got -3"),
    ("int_prompt", "grace.json: field 'system_prompt' must be a non-empty string, got 7"),
    ("zero_prompt_tokens", "field 'max_prompt_tokens' must be an integer >= 1, got 0"),
    ("out_is_a_file", "--out {tmp}/taken is a file; give a folder for the results"),
])
def test_bad_model_folders_and_settings_one_line_exit_2(case, message, tiny, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    grace = {"string_tokens": dict(max_new_tokens="many"),
             "negative_tokens": dict(max_new_tokens=-3), "int_prompt": dict(system_prompt=7),
             "zero_prompt_tokens": dict(max_prompt_tokens=0)}.get(case, {})
    _saved(tiny, folder, weights=_nan if case == "nan" else None,
           tokenizer=case != "no_tokenizer", **grace)
    if case == "cut":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    (tmp_path / "taken").write_text("not a folder")
    out = str(tmp_path / ("taken" if case == "out_is_a_file" else "results"))
    capsys.readouterr()  # save_pretrained's progress bar
    rc = evaluate.main(["--model", str(folder), "--explain", "A cat.", "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in err


def test_huge_rationale_length_is_bounded_by_the_models_positions(tiny, tmp_path, capsys):
    """max_new_tokens 10**9 in grace.json once grew to ~20 GB: now capped, with one line, to what
    the model can attend to after the longest prompt (tiny: 4096 positions)."""
    folder = _saved(tiny, tmp_path / "ckpt", max_new_tokens=10 ** 9)
    capsys.readouterr()
    assert evaluate.main(["--model", str(folder), "--explain", "A cat.",
                          "--max-length", "4090"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ("note: rationale length 1000000000 capped to 6: the model has 4096 "
                            "positions, the prompt may take 4090\n")
    assert "rationale <= 6 tokens (grace.json, capped)" in captured.out
    model, tok = tiny
    enc = evaluate.GraceEncoder("tiny", model=model, tokenizer=tok, max_new_tokens=10 ** 9)
    assert enc.settings["max_new_tokens"] == 4096 - 1024
    # a prompt limit beyond the positions (GPT-2's 1024 = max_length 1024): the positions bound it
    enc = evaluate.GraceEncoder("tiny", model=model, tokenizer=tok, max_length=5000,
                                max_new_tokens=10 ** 6)
    assert enc.settings["max_new_tokens"] == 4096
    assert evaluate.GraceEncoder("tiny", model=model, tokenizer=tok, max_length=4096,
                                 max_new_tokens=256).settings["max_new_tokens"] == 256


def test_ctrl_c_exits_130_quietly(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "run", interrupted)
    assert evaluate.main(["--explain", "hi"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "Ctrl-C" in err


def test_a_checkpoint_marked_stale_warns_once(tiny, tmp_path, capsys):
    model, tok = tiny
    # as train.py marks a final/ that a resumed run went past (runfolder.mark_final_stale)
    folder = _saved(tiny, tmp_path / "final", stale=True, superseded_by_step=40, max_new_tokens=3)
    capsys.readouterr()
    evaluate.GraceEncoder(str(folder), model=model, tokenizer=tok)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: {folder}: its grace.json says stale")
    assert "(to step 40)" in err
    (folder / "grace.json").write_text(json.dumps(dict(stale=False, max_new_tokens=3)))
    evaluate.GraceEncoder(str(folder), model=model, tokenizer=tok)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- the Python API

@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=-1), r"batch_size must be in \[1, "),
    (dict(batch_size=0), r"batch_size must be in \[1, "),
    (dict(batch_size=2.5), "batch_size must be an integer, got 2.5"),
    (dict(batch_size=True), "batch_size must be an integer, got True"),
    (dict(temperature=-1), r"temperature must be in \[0.0, 100.0\], got -1"),
    (dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
    (dict(top_p=0), r"top_p must be in \(0, 1\], got 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(max_new_tokens=-1), r"max_new_tokens must be in \[0, "),
    (dict(max_length=0), r"max_length must be in \[1, "),
    (dict(seed=-1), r"seed must be in \[0, "),
    (dict(seed="7"), "seed must be an integer, got '7'"),
])
def test_python_api_refuses_bad_numbers_in_one_line(kwargs, message, tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match=message) as e:
        evaluate.GraceEncoder("tiny", model=model, tokenizer=tok, **kwargs)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=message):
        evaluate.encode_texts(model, tok, TEXTS[:2], **kwargs)
    if "batch_size" in kwargs:
        enc = evaluate.GraceEncoder("tiny", model=model, tokenizer=tok)
        with pytest.raises(ValueError, match=message):
            enc.encode(TEXTS[:2], **kwargs)
    with pytest.raises(ValueError, match=r"threads must be in \[1, 1024\], got 0"):
        evaluate.GraceEncoder("tiny", model=model, tokenizer=tok, threads=0)


@pytest.fixture(scope="module")
def st_encoder(tiny):
    model, tok = tiny
    return evaluate.GraceEncoder("tiny", model=model, tokenizer=tok, max_new_tokens=NEW)


def test_sentence_transformers_arguments_are_honoured(st_encoder, tiny):
    model, tok = tiny
    texts = TEXTS[:3]
    raw = evaluate.encode_texts(model, tok, texts, max_new_tokens=NEW, normalize=False)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(st_encoder.encode(texts, normalize_embeddings=False), raw,
                               atol=1e-5)
    np.testing.assert_allclose(st_encoder.encode(texts), unit, atol=1e-5)
    cut = st_encoder.encode(texts, truncate_dim=16)
    np.testing.assert_allclose(cut, raw[:, :16] / np.linalg.norm(raw[:, :16], axis=1,
                                                                  keepdims=True), atol=1e-5)
    as_list = st_encoder.encode(texts, convert_to_numpy=False)
    assert isinstance(as_list, list) and all(isinstance(t, torch.Tensor) for t in as_list)
    np.testing.assert_allclose(torch.stack(as_list).numpy(), unit, atol=1e-5)
    prompted = evaluate.encode_texts(model, tok, ["query: " + t for t in texts],
                                     max_new_tokens=NEW)
    np.testing.assert_allclose(st_encoder.encode(texts, prompt="query: "), prompted, atol=1e-5)
    same = st_encoder.encode(texts, output_value="sentence_embedding", precision="float32",
                             device="cpu", pool=None, chunk_size=None, prompt_name=None)
    np.testing.assert_allclose(same, unit, atol=1e-5)


def test_encode_query_and_encode_document(st_encoder, tiny):
    model, tok = tiny
    texts = TEXTS[:2]
    task = "Given a claim, find documents that support it"
    query = evaluate.encode_texts(model, tok, texts, max_new_tokens=NEW,
                                  system_prompt=f"{policy.DEFAULT_SYSTEM_PROMPT}\nTask: {task}")
    np.testing.assert_allclose(st_encoder.encode_query(texts, instruction=task), query, atol=1e-5)
    plain = evaluate.encode_texts(model, tok, texts, max_new_tokens=NEW)
    np.testing.assert_allclose(st_encoder.encode_query(texts), plain, atol=1e-5)
    np.testing.assert_allclose(st_encoder.encode_document(texts), plain, atol=1e-5)
    assert st_encoder.encode_document(texts[0], convert_to_tensor=True).shape == (64,)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_name="query"), "prompt_name: GraceEncoder has no named prompts"),
    (dict(output_value="token_embeddings"), "output_value='token_embeddings': only"),
    (dict(output_value=None), "output_value=None: only"),
    (dict(precision="int8"), "precision='int8': only 'float32'"),
    (dict(device="meta"), "device='meta': the encoder is on cpu"),
    (dict(pool={"processes": []}), "pool / chunk_size: no multi-process encoding"),
    (dict(chunk_size=2), "pool / chunk_size: no multi-process encoding"),
    (dict(truncate_dim=65), "truncate_dim must be at most the embedding size 64, got 65"),
    (dict(truncate_dim=0), r"truncate_dim must be in \[1, "),
    (dict(normalize_embeddings="yes"), "normalize_embeddings must be True, False or None"),
    (dict(prompt=3), "prompt must be a string, got 3"),
])
def test_sentence_transformers_arguments_not_supported_are_refused(kwargs, message, st_encoder):
    with pytest.raises(ValueError, match=message) as e:
        st_encoder.encode(TEXTS[:1], **kwargs)
    assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="unknown argument 'normalise'"):
        st_encoder.encode(TEXTS[:1], normalise=True)


def test_threads_one_by_default_none_leaves_torch_alone(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(torch, "get_num_threads", torch.get_num_threads)  # restored after
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        evaluate.GraceEncoder("tiny", model=model, tokenizer=tok, threads=None)
        assert torch.get_num_threads() == 2
        evaluate.GraceEncoder("tiny", model=model, tokenizer=tok)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert cli.evaluate_args([]).threads == 1 and cli.evaluate_args(["--threads", "2"]).threads == 2
    with pytest.raises(SystemExit):
        cli.evaluate_args(["--threads", "0"])


# ----------------------------------------------------------------------------- fair comparisons

def test_cli_baseline_is_embedded_exactly_as_the_model(tiny, tmp_path, capsys, monkeypatch):
    """The checkpoint's rationale length (and prompt, decoding) is the baseline's too, whichever
    model's folder holds a grace.json; --no-rationale applies to both, --baseline-no-rationale to
    the baseline alone. The settings are printed once per model."""
    made = recorded_encoders(monkeypatch)
    monkeypatch.setattr(evaluate.diagnostics, "perplexity", lambda *a, **k: 1.0)  # settings only
    monkeypatch.setattr(evaluate.gc, "collect", lambda: 0)
    folder = _saved(tiny, tmp_path / "ckpt", max_new_tokens=32, system_prompt="Describe.",
                    max_prompt_tokens=512)
    texts = tmp_path / "texts.txt"
    texts.write_text("A cat.\n")
    capsys.readouterr()

    def run(*flags):
        made.clear()
        assert evaluate.main(["--model", str(folder), "--baseline", "tiny-lm", "--perplexity",
                              str(texts), "--out", "", *flags]) == 0
        return capsys.readouterr().out

    out = run()
    assert made[0].embedding() == made[1].embedding()
    assert made[1].settings["max_new_tokens"] == 32 and made[1].system_prompt == "Describe."
    assert made[1].settings["max_length"] == 512 and made[1].settings["rationale"]
    heads = [line for line in out.splitlines() if line.startswith("== ")]
    assert len(heads) == 2 and out.count("rationale <=") == 2
    assert heads[0].startswith(f"== {folder}: rationale <= 32 tokens (grace.json)")
    assert heads[1].startswith(f"== tiny-lm: rationale <= 32 tokens (as {folder})")
    run("--no-rationale")
    assert [e.settings["rationale"] for e in made] == [False, False]
    out = run("--baseline-no-rationale")
    assert [e.settings["rationale"] for e in made] == [True, False]
    assert made[1].settings["max_length"] == 512 and made[1].system_prompt == "Describe."
    assert "== tiny-lm: no rationale" in out
