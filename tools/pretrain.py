"""Pretrain `tiny-lm`: a small real causal LM, built offline from WordNet, to stand in for an \
LLM policy.

What it is: a Qwen2-shaped decoder (a few million parameters, tied embeddings) with its own
byte-level BPE tokenizer (a Qwen2Tokenizer with the project's chat template
`infra.tiny.TINY_CHAT_TEMPLATE`, EOS <|im_end|>, pad <|endoftext|>). Unlike the random `tiny`, its
hidden states depend on the text, so GRACE can show learning on a CPU.

What it is trained on: only WordNet 3.0 (its example sentences and glosses: the files
wordnet_examples.txt and wordnet_glosses.txt in the folder given as --data-dir, with its licence
notice WORDNET_LICENSE_debian_copyright), with next-token loss on two kinds of sequence:
- plain text: the lines, joined by <|endoftext|> and cut into --seq-len chunks
  (language modelling);
- chat samples in exactly GRACE's prompt (system = policy.DEFAULT_SYSTEM_PROMPT, user = a line),
  whose assistant turn is "<think>" + the line's longest words + "</think>" + the line restated
  (its first --restate-words words), then <|im_end|>. So the policy answers a GRACE prompt with a
  short rationale (about 15-45 tokens) about *this* text that ends with EOS, and the hidden states
  it writes while restating the text depend on the text, not on the long shared system prompt.
A held-out slice of lines (--heldout-lines) is used neither for the tokenizer nor for training; its
perplexity, measured on the weights as saved (bfloat16), is reported at the end. No evaluation set
(STS, SICK, SciFact, ...) is read.

Licence: WordNet 3.0 licence (permissive, Princeton University); its notice is copied next to the
weights (WORDNET_LICENSE) as the licence requires; the model card is README.md there.

Time: the default build takes about 11 minutes on one CPU thread (1.3M parameters, 600 steps of 32
sequences, about 2M tokens). On a busy machine keep it to one thread: two OpenMP threads that must
share cores with other jobs were 8x slower here. Rerun (deterministic from --seed, for a given
thread count):

    OMP_NUM_THREADS=1 python tools/pretrain.py --data-dir DIR      # -> out/tiny-lm/
    OMP_NUM_THREADS=1 python tools/pretrain.py --data-dir DIR --out models/tiny-lm  # shipped

The build is written beside --out in a hidden temporary folder and renamed into place only once
it is complete (weights, tokenizer, metrics and card together): a bad flag, a diverging loss or a
kill leaves the folder that was there as it was.
"""
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Run as `python tools/pretrain.py` from anywhere: the project's modules live one folder up, at
# the repo root.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import policy  # noqa: E402
from infra import cli, data, runfolder, tiny  # noqa: E402

CORPUS_FILES = ("wordnet_examples.txt", "wordnet_glosses.txt")
LICENSE_FILE = "WORDNET_LICENSE_debian_copyright"


# flag: (lowest allowed, highest allowed); float flags must also be finite (cli.check_ranges)
RANGES = dict(seed=(0, 2**32 - 1), max_lines=(0, 1 << 40), heldout_lines=(1, 1 << 30),
              vocab_size=(259, 1 << 20), hidden=(2, 1 << 16), layers=(1, 1024), heads=(1, 1024),
              kv_heads=(1, 1024), ffn=(1, 1 << 20), steps=(1, 1 << 40), batch_size=(1, 1 << 20),
              seq_len=(2, 1 << 16), chat_share=(0, 1), restate_words=(1, 1 << 20), lr=(0, 1),
              warmup=(0, 1 << 40), weight_decay=(0, 1), log_every=(1, 1 << 40))
MIN_LINES = 20  # a tenth of them is held out: at least 2 lines to measure perplexity on


def parse_args(argv=None):
    p = cli.Parser(prog="tools/pretrain.py", description=__doc__.split("\n")[0],
                   formatter_class=cli.HelpFormatter)
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help=f"folder with the WordNet 3.0 files {' and '.join(CORPUS_FILES)} "
                        f"and {LICENSE_FILE} "
                        "(needed: there is no default; relative to the repo root)")
    p.add_argument("--out", default="out/tiny-lm",
                   help="output folder (relative to the repo root); a previous build there is "
                        "replaced once the new one is complete; models/tiny-lm is the shipped one")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the split, the data order and the init")
    p.add_argument("--max-lines", type=int, default=0,
                   help="use only the first N corpus lines (0 = all; for tests)")
    p.add_argument("--heldout-lines", type=int, default=2000,
                   help="lines kept out for the held-out perplexity")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="BPE vocabulary size, special tokens and the 256 bytes included")
    p.add_argument("--hidden", type=int, default=128, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="number of decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2,
                   help="key/value heads (grouped-query attention)")
    p.add_argument("--ffn", type=int, default=384, help="MLP intermediate size")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=96,
                   help="tokens per plain-text chunk (chat samples are cut at 2x)")
    p.add_argument("--chat-share", type=float, default=0.6,
                   help="share of each batch that is chat samples")
    p.add_argument("--restate-words", type=int, default=24,
                   help="words of the text the assistant turn restates")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=40,
                   help="linear warm-up steps, then cosine decay to lr/10")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between loss records in metrics.jsonl")
    args = p.parse_args(argv)
    cli.check_ranges(p, args, RANGES)
    if args.hidden % (2 * args.heads):  # rotary embeddings need an even head size
        p.error(f"--hidden {args.hidden} must be a multiple of 2 x --heads {args.heads}")
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    return args


# ----------------------------------------------------------------------------- data

def read_lines(data_dir, max_lines=0):
    """Unique non-empty lines of the WordNet files, in file order
    (duplicates would leak into held-out)."""
    seen, lines = set(), []
    for name in CORPUS_FILES:
        for _, line in data.read_lines(Path(data_dir) / name):  # the project's one line reader
            line = line.strip()
            if line and line not in seen:
                seen.add(line)
                lines.append(line)
    return lines[:max_lines] if max_lines else lines


def split_lines(lines, heldout, seed):
    """-> (train, held-out): a seeded shuffle, the last `heldout` lines held out
    (at most a tenth)."""
    lines = list(lines)
    random.Random(seed).shuffle(lines)
    n = min(heldout, len(lines) // 10)
    return lines[:len(lines) - n], lines[len(lines) - n:]


def think_note(text, k=3):
    """The k longest words of the text, in text order: a cheap 'topic' note that WordNet alone
    gives."""
    words = [w.strip(".,;:!?()\"'") for w in text.split()]
    longest = sorted(range(len(words)), key=lambda i: (-len(words[i]), i))[:k]
    return " ".join(words[i] for i in sorted(longest) if words[i])


def assistant_turn(text, restate_words):
    return f"<think>\n{think_note(text)}\n</think>\n{' '.join(text.split()[:restate_words])}"


def chat_text(tokenizer, text, restate_words):
    """A full GRACE conversation: the exact prompt policy.render_prompt builds,
    then the answer + EOS."""
    messages = [{"role": "system", "content": policy.DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": text},
                {"role": "assistant", "content": assistant_turn(text, restate_words)}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def tokenizer_corpus(lines, restate_words):
    """The training lines plus the chat scaffolding, repeated so its words become single tokens."""
    scaffold = [policy.DEFAULT_SYSTEM_PROMPT, "system\nuser\nassistant\n<think>\n</think>\n"] * 200
    return lines + scaffold + [assistant_turn(t, restate_words) for t in lines[:2000]]


def build_tokenizer(texts, vocab_size):
    """Byte-level BPE as a Qwen2Tokenizer with the chat template: the tiny model's builder on our
    corpus."""
    return tiny.build_tokenizer(vocab_size=vocab_size, corpus=texts)


def plain_chunks(tokenizer, lines, seq_len, rng):
    """Endless (seq_len,) chunks of the lines, shuffled each pass, joined by <|endoftext|>."""
    buf, eot = [], tokenizer.convert_tokens_to_ids("<|endoftext|>")
    while True:
        order = list(lines)
        rng.shuffle(order)
        for s in range(0, len(order), 256):  # tokenise in batches: fast, and memory stays small
            for ids in tokenizer(order[s:s + 256], add_special_tokens=False)["input_ids"]:
                buf.extend(ids + [eot])
                while len(buf) >= seq_len:
                    yield buf[:seq_len]
                    buf = buf[seq_len:]


def chat_samples(tokenizer, lines, max_len, restate_words, rng):
    """Endless chat-sample token lists, one per line, shuffled each pass."""
    while True:
        order = list(lines)
        rng.shuffle(order)
        for s in range(0, len(order), 256):
            texts = [chat_text(tokenizer, t, restate_words) for t in order[s:s + 256]]
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                yield ids[:max_len]


def collate(rows, pad_id):
    """Right-padded (B, T) input_ids, attention_mask, labels (-100 on padding)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def batches(tokenizer, lines, args, rng):
    plain = plain_chunks(tokenizer, lines, args.seq_len, rng)
    chat = chat_samples(tokenizer, lines, 2 * args.seq_len, args.restate_words, rng)
    n_chat = round(args.batch_size * args.chat_share)
    while True:
        rows = [next(chat) for _ in range(n_chat)] + [next(plain)
                                                      for _ in range(args.batch_size - n_chat)]
        yield collate(rows, tokenizer.pad_token_id)


# ----------------------------------------------------------------------------- model and training

def build_model(tokenizer, args):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=True, attention_dropout=0.0,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def lr_at(step, args):
    """Linear warm-up, then cosine from lr to lr/10
    (small models like a high peak and a soft landing)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, tokenizer, lines, args, metrics_file):
    """Next-token loss with AdamW; appends {step, loss, lr, tokens, seconds} to metrics_file."""
    # no decay on norms and biases
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    data = batches(tokenizer, lines, args, random.Random(args.seed + 1))
    model.train()
    start, tokens, running = time.time(), 0, None
    with open(metrics_file, "a") as f, \
            tqdm(range(args.steps), desc="pretrain", dynamic_ncols=True) as bar:
        for step in bar:
            ids, mask, labels = next(data)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            if not math.isfinite(loss.item()):  # diverged: later steps would only spread the NaN
                raise cli.TrainingError(f"step {step}: the loss is {loss.item()}; nothing saved "
                                        "(try a lower --lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tokens += int(mask.sum())
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            bar.set_postfix(loss=f"{running:.3f}")
            if step % args.log_every == 0 or step == args.steps - 1:
                f.write(json.dumps({"step": step, "loss": round(loss.item(), 4),
                                    "lr": lr_at(step, args), "tokens": tokens,
                                    "seconds": round(time.time() - start, 1)}) + "\n")
    model.eval()
    return {"final_train_loss": round(running, 4), "train_tokens": tokens,
            "train_minutes": round((time.time() - start) / 60, 2)}


@torch.no_grad()
def heldout_perplexity(model, tokenizer, lines, seq_len, batch_size=32):
    """exp(mean next-token loss) over the held-out lines, joined and chunked as the plain training
    text."""
    eot, stream = tokenizer.convert_tokens_to_ids("<|endoftext|>"), []
    for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [eot])
    chunks = [stream[s:s + seq_len] for s in range(0, len(stream), seq_len)]
    chunks = [c for c in chunks if len(c) > 1]  # a 1-token chunk predicts nothing
    total, count = 0.0, 0
    for s in range(0, len(chunks), batch_size):
        ids, mask, labels = collate(chunks[s:s + batch_size], tokenizer.pad_token_id)
        n = int(mask[:, 1:].sum())  # predicted tokens; .loss is their mean
        total, count = (total + model(input_ids=ids, attention_mask=mask,
                                      labels=labels).loss.item() * n, count + n)
    return math.exp(total / count)


# ----------------------------------------------------------------------------- output

def save(model, tokenizer, out, data_dir, summary, argv):
    """Weights in bfloat16 (policy.load casts back to float32), tokenizer, licence notice,
    model card; into `out`, the temporary folder that replace_folder renames into place."""
    model.to(torch.bfloat16).save_pretrained(out)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    shutil.copyfile(Path(data_dir) / LICENSE_FILE, out / "WORDNET_LICENSE")
    write_card(out, summary, argv)


def write_card(out, summary, argv):
    cmd = "OMP_NUM_THREADS=1 python tools/pretrain.py" + "".join(f" {a}" for a in argv)
    (Path(out) / "README.md").write_text(MODEL_CARD.format(cmd=cmd,
                                                           system=policy.DEFAULT_SYSTEM_PROMPT,
                                                           **summary),
                                         encoding="utf-8")


MODEL_CARD = """# tiny-lm

A small Qwen2-shaped causal LM ({params:,} parameters, vocabulary {vocab}, hidden {hidden}, \
{layers} layers)
with a byte-level BPE tokenizer, pretrained from scratch on CPU by `tools/pretrain.py` of this \
repo. It is the
project's offline stand-in for a chat LLM: a GRACE policy small enough to train on a laptop.

- **Corpus**: WordNet 3.0 example sentences and glosses only ({train_lines:,} training lines; \
{heldout_lines:,}
  held out). No evaluation data (STS, SICK, SciFact, ...) was used.
- **Training**: next-token loss on plain text (lines joined by `<|endoftext|>`) and on chat \
samples in
  GRACE's exact prompt (system prompt below, user = a line) whose assistant turn is
  `<think>` + the line's longest words + `</think>` + the line restated, then `<|im_end|>` (EOS).
  {steps} steps of {batch_size} sequences, {train_tokens:,} tokens, {train_minutes} minutes on \
one CPU thread
  (a shared 2-core machine); final train loss {final_train_loss}.
- **Held-out perplexity** (bfloat16 weights as shipped, {heldout_lines:,} WordNet lines): \
{heldout_ppl:.2f}
- **Chat format**: `<|im_start|>role\\ncontent<|im_end|>\\n`; EOS `<|im_end|>`, pad \
`<|endoftext|>`.
- **Files**: `metrics.jsonl` is the loss curve; `WORDNET_LICENSE` is WordNet's licence notice, \
which must
  ship with these weights.

System prompt it was trained with: "{system}"

## Licence

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. The corpus is used \
under the
WordNet 3.0 licence; see `WORDNET_LICENSE` (its notice and disclaimer apply to these weights too).

## Rebuild

From the repo root, with the WordNet 3.0 files (`wordnet_examples.txt`, `wordnet_glosses.txt` \
and the licence
notice `WORDNET_LICENSE_debian_copyright`) in the `--data-dir` folder (deterministic from \
`--seed` at a given
thread count):

    {cmd}
"""


def check_inputs(args):
    """-> (data folder, output folder), or a UsageError: the WordNet files must be there, and --out
    must be new, empty or an earlier build (anything else in it would be lost on replacing it)."""
    needed = [*CORPUS_FILES, LICENSE_FILE]
    if args.data_dir is None:
        raise cli.UsageError(f"pretrain.py needs the WordNet 3.0 example sentences and glosses "
                             f"({', '.join(needed)}): give --data-dir, the folder holding them")
    data_dir = ROOT / args.data_dir  # an absolute path stays as it is
    missing = [n for n in needed if not (data_dir / n).is_file()]
    if missing:
        raise cli.UsageError(f"pretrain.py needs the WordNet 3.0 example sentences and glosses "
                             f"({', '.join(needed)}): {data_dir} has no {', '.join(missing)}")
    out = ROOT / args.out
    if out.exists() and not out.is_dir():
        raise cli.UsageError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / "WORDNET_LICENSE").is_file():
        raise cli.UsageError(f"--out {out} holds files that are not a pretrain.py build; "
                             "give another --out")
    return data_dir, out


def replace_folder(tmp, out):
    """Make the complete build `tmp` the folder `out`: durable first, then renamed over (the old
    one moved aside and deleted only once the new one is in place, as checkpoints are)."""
    for p in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors write 0700 / 0600
        p.chmod(0o755 if p.is_dir() else 0o644)
    runfolder.fsync_tree(tmp)
    runfolder._swap_in(tmp, out)


def build(args, argv):
    data_dir, out = check_inputs(args)
    lines = read_lines(data_dir, args.max_lines)
    if len(lines) < MIN_LINES:  # (an empty corpus would never fill a batch)
        raise cli.UsageError(f"{data_dir}: {len(lines)} distinct lines in "
                             f"{' and '.join(CORPUS_FILES)}; pretrain.py needs {MIN_LINES}")
    torch.manual_seed(args.seed)
    train_lines, held = split_lines(lines, args.heldout_lines, args.seed)
    tokenizer = build_tokenizer(tokenizer_corpus(train_lines, args.restate_words), args.vocab_size)
    model = build_model(tokenizer, args)
    params = sum(p.numel() for p in model.parameters())
    print(f"{len(train_lines):,} train lines, {len(held):,} held out; vocab {len(tokenizer)}; "
          f"{params:,} parameters")
    out.parent.mkdir(parents=True, exist_ok=True)
    # the build goes beside --out, hidden, and replaces it only when complete: a failure or a
    # kill leaves the old folder whole (a SIGKILL also leaves this .tmp-* folder behind)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        summary = train(model, tokenizer, train_lines, args, tmp / "metrics.jsonl")
        model.to(torch.bfloat16).to(torch.float32)  # measure the weights as they will be shipped
        summary.update(params=params, vocab=len(tokenizer), hidden=args.hidden,
                       layers=args.layers, steps=args.steps, batch_size=args.batch_size,
                       train_lines=len(train_lines), heldout_lines=len(held),
                       heldout_ppl=heldout_perplexity(model, tokenizer, held, args.seq_len))
        if not (math.isfinite(summary["heldout_ppl"]) and runfolder.is_finite_state(model)):
            raise cli.TrainingError("the trained weights are not finite; nothing saved "
                                    "(try a lower --lr)")
        with open(tmp / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"final": True, **summary}) + "\n")
        save(model, tokenizer, tmp, data_dir, summary, argv)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(summary))
    print(f"wrote {out}")
    return model, tokenizer, summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        return build(args, argv)
    except (cli.UsageError, data.DataError) as e:  # one line, not a traceback; nothing written
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except cli.TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # the temporary build is already gone; --out is as it was
        sys.exit(130)


if __name__ == "__main__":
    main()
