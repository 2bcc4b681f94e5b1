"""The command lines of train.py and evaluate.py: flags, presets, range checks, the one error type.

Bad input anywhere (a flag, a file, a folder) is a UsageError: printed as one line on stderr,
exit status 2, nothing written. Parsers here fail the same way (`Parser.error`).
"""
import argparse
import difflib
import importlib
import inspect
import json
import math
import os
import sys
from pathlib import Path

import torch

import lora
import policy
import reward

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = ROOT / "data" / "sample_triples.jsonl"


class UsageError(Exception):
    """Bad input: printed as one line on stderr, exit status 2, nothing written."""


class TrainingError(Exception):
    """Training went wrong in a way the user must act on (divergence): one line, exit status 1."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other input error
        print(f"error: {message}{self.did_you_mean(message)} (see: python {self.prog} -h)",
              file=sys.stderr)
        raise SystemExit(2)

    def did_you_mean(self, message):
        """' (did you mean --steps?)' for a mistyped flag in argparse's 'unrecognized arguments'
        message, else ''. (argparse's own suggest_on_error needs Python 3.14.)"""
        if not message.startswith("unrecognized arguments: "):
            return ""
        flags = [o for a in self._actions if a.help != argparse.SUPPRESS
                 for o in a.option_strings if o.startswith("--")]
        hints = []
        for word in [w.split("=")[0] for w in message.split(": ", 1)[1].split()]:
            # a flag the word extends (--lr-rate: --lr), else the closest spelling (--stpes)
            close = sorted((f for f in flags if word.startswith(f + "-")), key=len)[-1:] or \
                difflib.get_close_matches(word, flags, n=1) if word.startswith("--") else []
            hints += [f"{word}: did you mean {close[0]}?"] if close else []
        return f" ({'; '.join(hints)})" if hints else ""


class HelpFormatter(argparse.HelpFormatter):
    """Appends the real default to each help line (None and False are not defaults to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class Renamed(argparse.Action):
    """A flag that was renamed (const: the new name): one line pointing to it."""

    def __init__(self, *args, **kw):
        super().__init__(*args, nargs="?", help=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was renamed {self.const}")


def check_ranges(parser, args, ranges):
    """Every flag in ranges {name: (low, high)} that was set must be finite and within
    [low, high]."""
    for k, (low, high) in ranges.items():
        v = getattr(args, k)
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            parser.error(f"--{k.replace('_', '-')} must be a finite number, got {v}")
        if not low <= v <= high:
            parser.error(f"--{k.replace('_', '-')} must be in [{low}, {high}], got {v}")


def check_device(parser, name):
    """A device this machine has: cpu, cuda or cuda:N (else one line, exit 2)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name!r} is not a device (cpu, cuda, cuda:N)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: this torch build or machine has no CUDA GPU; "
                     "use --device cpu")


# ----------------------------------------------------------------------------- train.py

# The authors' system prompt, quoted exactly: GasolSun36/GRACE uses it in training
# (verl/utils/dataset/rl_dataset.py and verl/workers/reward_manager/*.py, PROMPT2) and in
# evaluation (eval_mteb.py, PROMPT).
RELEASE_SYSTEM_PROMPT = (
    "Read and analyze the following text, then you need to provide your reasoning within "
    "<think></think> tags. Finally, generate a comprehensive understanding of this text.")

# Defaults by preset; --preset picks one (automatic for the built-in models), any flag
# overrides it. Batch sizes count texts of all ranks together (the release's meaning).
PRESETS = {
    # The authors' release: Qwen2.5-1.5B-Instruct on 4 x H100.
    "release": dict(batch_size=64, group_size=8, mini_batch_size=16, max_new_tokens=2048, lr=1e-6,
                    epochs=2, system_prompt=RELEASE_SYSTEM_PROMPT),
    # The random 0.3M demo model: nothing moves at lr 1e-6 in 20 steps, so 3e-4.
    "tiny": dict(batch_size=8, group_size=4, mini_batch_size=4, max_new_tokens=24, lr=3e-4,
                 steps=20, system_prompt=policy.DEFAULT_SYSTEM_PROMPT),
    # The small LM of tools/pretrain.py: bench/learning.py's setting, 30 steps in ~1.5 min
    # (README, "Watch it learn").
    "tiny-lm": dict(batch_size=16, group_size=4, mini_batch_size=16, max_new_tokens=32, lr=1e-4,
                    steps=30, system_prompt=policy.DEFAULT_SYSTEM_PROMPT),
}


def train_parser(suppress=False):
    """The CLI. suppress=True gives the same parser with no defaults:
    it tells which flags were given."""
    p = Parser(prog="train.py", description="Train a GRACE policy: rationales -> embeddings -> "
               "contrastive rewards -> group-relative policy gradient.",
               formatter_class=HelpFormatter,
               argument_default=argparse.SUPPRESS if suppress else None)

    def group(title):
        g = p.add_argument_group(title)

        def a(*names, default=None, **kw):
            if kw.get("action") == "store_true":
                default = False
            g.add_argument(*names, **({} if suppress else {"default": default}), **kw)
        return a

    def per_preset(key):
        return "; by preset: " + ", ".join(f"{name} {values.get(key, '-')}"
                                           for name, values in PRESETS.items())

    a = group("model and data")
    a("--model", default="tiny",
      help="causal LM folder or hub name, or a built-in: tiny (random), tiny-lm (pretrained here)")
    a("--data", default=str(SAMPLE_DATA),
      help="JSONL / CSV / Parquet / .txt file, or a datasets hub name (see infra/data.py)")
    a("--mode", default="supervised", choices=["supervised", "unsupervised"],
      help="(query, positive, negative) records, or one text per record")
    a("--objective", default="grpo", choices=["grpo", "contrastive"],
      help="GRACE's policy gradient, or the InfoNCE baseline on the same embeddings "
           "(supervised only)")
    a("--preset", choices=list(PRESETS), help="defaults for the flags marked 'by preset' "
      "(default: tiny / tiny-lm for those models and their checkpoints, else release)")
    a("--max-prompt-tokens", type=int, default=1024,
      help="prompt length limit; longer texts are cut")
    prompt = p.add_argument_group("system prompt").add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt", help="the instruction before each text, in training "
                        "and in grace.json (evaluate.py's default); by preset: release the "
                        "release's own (cli.RELEASE_SYSTEM_PROMPT), tiny and tiny-lm "
                        "policy.DEFAULT_SYSTEM_PROMPT")
    prompt.add_argument("--system-prompt-file", metavar="FILE", help="read --system-prompt from "
                        "FILE (UTF-8, its final line break dropped; default: --system-prompt's)")
    a("--steps", type=int, help="rollout batches to train on (default: --epochs' worth; not "
      "with --epochs)" + per_preset("steps"))
    a("--epochs", type=int, help="passes over the data, the run's length: given, it replaces the "
      "preset's (or the resumed run's) steps" + per_preset("epochs"))
    a = group("rollouts")
    a("--group-size", type=int, help="G rationales per text" + per_preset("group_size"))
    a("--max-new-tokens", type=int, help="rationale length limit" + per_preset("max_new_tokens"))
    a("--temperature", type=float, default=1.0, help="sampling temperature of the main rollouts")
    a("--side-temperature", type=float, default=0.5,
      help="temperature of the query and negative rationales")
    a("--top-p", type=float, default=1.0,
      help="nucleus of the main rollouts (log-probs are scored unfiltered)")
    a("--top-k", type=int, default=0,
      help="top-k of the main rollouts, 0 = off (log-probs are scored unfiltered)")
    a("--rollout-rows", type=int, default=0, help="rationales sampled at once per rank, 0 = all; "
      "bounds the KV cache (rows x (prompt + new tokens) per layer), which at the release's batch "
      "outgrows a 3-4B model; compiled, a shorter last chunk compiles once more: pick a divisor "
      "of the rows per rank")
    a("--compile", default="auto", choices=["auto", "on", "off"],
      help="static-cache + torch.compile sampler with bucketed prompt widths; auto = on for CUDA, "
           "off on CPU")
    a = group("reward")
    a("--reward", default="release", choices=list(reward.REWARDS),
      help="GRACE's released reward or per-rollout InfoNCE")
    a("--tau", type=float, default=0.1,
      help="similarity temperature of the reward (and of --objective contrastive)")
    a("--no-scale", action="store_true", help="release reward: do not divide its terms by tau")
    a("--clustering-weight", type=float, help="release reward: weight of s_clu (default: 0.2)")
    a("--cross-group-weight", type=float, help="release reward: weight of s_x (default: 0.2)")
    a("--in-batch-weight", type=float, default=0.0, help="release reward, supervised: weight of "
      "s_ib, a per-rollout push away from the other texts' queries (0 = as released; "
      "reward.grace_rewards)")
    a("--no-length-penalty", action="store_true",
      help="no -1 reward for rationales cut at --max-new-tokens")
    a("--scale-adv-by-std", action="store_true",
      help="divide advantages by the group std (GRPO; the release does not)")
    a = group("optimisation")
    a("--batch-size", type=int, help="texts per rollout batch, all ranks together (the "
      "release's train_batch_size; N ranks: batch / N each)" + per_preset("batch_size"))
    a("--mini-batch-size", type=int, help="texts per optimizer step, all ranks together (the "
      "release's ppo_mini_batch_size; N ranks: mini / N each); batch / mini optimizer steps per "
      "rollout batch" + per_preset("mini_batch_size"))
    a("--micro-batch-size", type=int, help="texts per forward/backward on EACH rank: gradient "
      "accumulation (default: a rank's share of the mini-batch, mini / N)")
    a("--ppo-epochs", type=int, default=1, help="passes over each rollout batch "
      "(--objective contrastive: optimizer steps per batch)")
    a("--lr", type=float, help="AdamW learning rate, constant" + per_preset("lr"))
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    a("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip")
    a("--clip-eps", type=float, default=0.2, help="PPO ratio clip: rho in [1 - eps, 1 + eps]")
    a("--dual-clip", type=float, default=3.0,
      help="cap on the loss of negative-advantage tokens: -c A (verl's clip_ratio_c)")
    a("--kl-coef", type=float, default=0.001,
      help="KL penalty weight beta; 0 = the release (no reference model)")
    a("--kl-type", default="k3", choices=["k1", "k2", "k3"],
      help="KL estimator in the loss. Its gradient: k1 has E[grad] = 0 (regularises nothing in "
           "the loss; k1 belongs in the reward, where it gives the unbiased reverse-KL gradient); "
           "k2 gives the reverse-KL gradient; k3 (the release's 'low_var_kl') the forward-KL "
           "gradient")
    a("--aggregation", default="token", choices=["token", "sequence", "constant"],
      help="loss mean over all tokens | per sequence then rows | Dr.GRPO's sum / "
           "(rows x max_new_tokens)")
    a("--grad-checkpointing", action="store_true",
      help="recompute activations in backward (long rationales)")
    a("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and AdamW "
      "state over the processes (FSDP2, one unit per decoder layer; see infra/fsdp.py)")
    a("--offload", action="store_true",
      help="with --fsdp: keep the shards and AdamW on the CPU (CPUOffloadPolicy)")
    a("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank beside frozen "
      "weights (lora.py; 0 = full fine-tuning); the KL reference is the same model, adapters off")
    a("--lora-alpha", type=float, help="LoRA scale alpha: the update is (alpha / rank) B A x "
      "(default: 2 x --lora-rank, a scale of 2 at every rank)")
    a("--lora-dropout", type=float, default=0.0,
      help="dropout on the adapters' input, in the forward that carries gradient only")
    a("--lora-targets", nargs="+", default=list(lora.TARGETS), metavar="NAME",
      help="the nn.Linear layers that get adapters, by the last part of their name")
    a("--lora-export", default="merged", choices=["merged", "adapters"],
      help="what final/ holds: the merged model (plain weights) or the adapters alone")
    a("--seed", type=int, default=0, help="seeds data order, sampling and the tiny model")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu",
      help="cpu, cuda or cuda:N")
    a("--threads", type=int, default=1, help="CPU threads for torch (1 is fastest for tiny "
      "models on a busy machine; see README)")
    a = group("checkpoints")
    a("--out", default="out",
      help="run folder: step-N/ checkpoints, final/, metrics.jsonl, config.json")
    a("--save-every", type=int, default=10, help="steps between checkpoints")
    a("--keep-last", type=int, default=3,
      help="checkpoints kept (each holds optimizer state, 2x the weights)")
    a("--resume", nargs="?", const="latest", help="continue the run in --out from its newest "
      "complete checkpoint (or from the step-N folder given); its saved settings are used")
    a("--force-resume", action="store_true", help="with --resume: apply flags that change the "
      "run (model, data, ...) and another number of processes")
    a("--config", metavar="FILE", help="take the settings of a run's config.json (e.g. "
      "out/config.json) as defaults: a relaunch; flags given override them; device, threads "
      "and --compile stay this machine's (default: none)")
    a = group("evaluation and logging")
    a("--eval-every", type=int, default=0,
      help="STS Spearman on --eval-pairs pairs every N steps (0: never)")
    a("--eval-pairs", type=int, default=200, help="pairs of --eval-data used by --eval-every")
    a("--eval-data", help="STS JSONL (sentence1, sentence2, score) for --eval-every")
    a("--log-rationales", type=int, default=10,
      help="print a text and its rationale every N steps (0: never)")
    a("--report-to", default="none", choices=["none", "tensorboard"], help="also write every "
      "metric to OUT/tensorboard/ (needs `pip install tensorboard`)")
    return p


# flag: (lowest allowed, highest allowed); every float flag must also be finite
RANGES = dict(batch_size=(1, 1 << 20), group_size=(1, 1024), mini_batch_size=(1, 1 << 20),
              micro_batch_size=(1, 1 << 20), rollout_rows=(0, 1 << 20), ppo_epochs=(1, 1000),
              steps=(1, 1 << 40), epochs=(1, 1 << 20), max_prompt_tokens=(1, 1 << 20),
              max_new_tokens=(1, 1 << 20), save_every=(1, 1 << 40), keep_last=(1, 1 << 20),
              eval_pairs=(2, 1 << 30), eval_every=(0, 1 << 40), log_rationales=(0, 1 << 40),
              seed=(0, 2**32 - 1), threads=(1, 1024), top_k=(0, 1 << 30), lr=(0, 1),
              weight_decay=(0, 1), kl_coef=(0, 1e6), clustering_weight=(-1e6, 1e6),
              cross_group_weight=(-1e6, 1e6), in_batch_weight=(-1e6, 1e6), dual_clip=(1, 1e6),
              temperature=(1e-4, 100),
              side_temperature=(0, 100), top_p=(1e-6, 1), tau=(1e-4, 1e6), clip_eps=(1e-6, 1e6),
              max_grad_norm=(1e-12, 1e12), lora_rank=(0, 1 << 16), lora_alpha=(1e-6, 1e6),
              lora_dropout=(0, 0.99))


def train_args(argv=None):
    """-> (args, the set of flags given on the command line)."""
    p = train_parser()
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--config")
    config = peek.parse_known_args(argv)[0].config
    from_config = read_train_config(p, config) if config else {}
    p.set_defaults(**from_config)  # the config's values are the defaults, flags override them
    args = p.parse_args(argv)
    args._from_config = set(from_config)  # (where a value came from, for error messages)
    given = set(vars(train_parser(suppress=True).parse_args(argv)))
    if {"steps", "epochs"} <= given:
        p.error("--steps and --epochs both set the run's length: pass one")
    if args.system_prompt_file is not None:  # the file's text is the setting --system-prompt
        args.system_prompt = read_system_prompt(p, args.system_prompt_file)
        given.add("system_prompt")
    elif args.system_prompt is not None and not args.system_prompt.strip():
        p.error("--system-prompt is empty")
    args.preset = args.preset or default_preset(args.model)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if "epochs" in given:  # its steps, not the preset's or the config's (train.prepare counts)
        args.steps = None
    # one process: a whole mini-batch (check_run refines it for N ranks: mini / N)
    args.micro_batch_size = args.micro_batch_size or args.mini_batch_size
    check_ranges(p, args, RANGES)
    check_device(p, args.device)
    takes = inspect.signature(reward.REWARDS[args.reward]).parameters
    wrong = [f"--{flag.replace('_', '-')}" for option, flag in REWARD_FLAGS.items()
             if flag in given and option not in takes]
    if wrong:
        p.error(f"{', '.join(wrong)} only apply to --reward release, not --reward {args.reward}")
    if args.in_batch_weight and args.mode != "supervised":
        p.error("--in-batch-weight is for --mode supervised (the unsupervised reward's s_x is "
                "already its in-batch term: --cross-group-weight)")
    if args.objective == "contrastive" and args.mode != "supervised":
        p.error("--objective contrastive needs --mode supervised "
                "(query, positive, negative records)")
    args.clustering_weight = 0.2 if args.clustering_weight is None else args.clustering_weight
    args.cross_group_weight = 0.2 if args.cross_group_weight is None else args.cross_group_weight
    lora_flags = sorted(f"--{k.replace('_', '-')}" for k in given - {"lora_rank"} if "lora_" in k)
    if lora_flags and not args.lora_rank and not args.resume:  # (resumed: the saved run's rank)
        p.error(f"{', '.join(lora_flags)}: LoRA settings, they need --lora-rank R (> 0)")
    if args.lora_rank and args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank
    if args.compile == "auto":
        args.compile = "on" if args.device.startswith("cuda") else "off"
    return args, given


# where it runs, not what it computes: not taken from --config (nor from a resumed run)
CONFIG_SKIPS = {"device", "threads", "compile"}


def read_train_config(parser, path):
    """--config FILE -> {setting: value}: a JSON object whose keys are train.py's settings (a run's
    config.json), each value checked as its flag checks it (type, choices, range), but for
    CONFIG_SKIPS; a file that is not that is one line naming it and the key."""
    def bad(why):
        parser.error(f"--config {path}: {why}")
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        bad("no such file")
    except (OSError, UnicodeDecodeError) as e:
        bad(f"unreadable ({getattr(e, 'strerror', None) or e})")
    except ValueError as e:
        bad(f"not valid JSON ({e})")
    if not isinstance(config, dict):
        bad("not a JSON object of settings (a run's config.json is one)")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    for k, v in config.items():
        if k not in actions:
            close = difflib.get_close_matches(k, actions, n=1)
            bad(f"unknown key {k!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                        " (not a setting of train.py)"))
        problem = _config_problem(actions[k], v)
        if problem:
            bad(f"key {k!r}: {problem}")
    return {k: float(v) if actions[k].type is float and v is not None else v
            for k, v in config.items() if k not in CONFIG_SKIPS}


def _config_problem(action, v):
    """What is wrong with a config value for this flag's setting, or None."""
    if v is None:
        return None if action.default is None else "null, but it needs a value"
    if action.nargs == 0:  # store_true
        return None if isinstance(v, bool) else f"expected true or false, got {v!r}"
    if action.nargs == "+":  # --lora-targets
        ok = isinstance(v, list) and v and all(isinstance(x, str) for x in v)
        return None if ok else f"expected a list of strings, got {json.dumps(v)}"
    kind = {int: (int,), float: (int, float)}.get(action.type, (str,))
    if not isinstance(v, kind) or isinstance(v, bool):
        wanted = {int: "an integer", float: "a number"}.get(action.type, "a string")
        return f"expected {wanted}, got {json.dumps(v)}"
    if action.choices and v not in action.choices:
        return f"{v!r} is not one of {', '.join(map(str, action.choices))}"
    low, high = RANGES.get(action.dest, (-math.inf, math.inf))
    if isinstance(v, float) and not math.isfinite(v) or not isinstance(v, str) and \
            not low <= v <= high:
        return f"must be in [{low}, {high}], got {v}"
    return None


def read_system_prompt(parser, path):
    """--system-prompt-file's text, its final line break dropped; a missing, unreadable or empty
    file is one line naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except FileNotFoundError:
        parser.error(f"--system-prompt-file {path}: no such file")
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"--system-prompt-file {path}: unreadable "
                     f"({getattr(e, 'strerror', None) or e})")
    if not text.strip():
        parser.error(f"--system-prompt-file {path} is empty")
    return text


def check_run(args, given, world, records):
    """Settings that need the number of processes (world) or of records, before anything is
    written: --fsdp needs torchrun, and the GLOBAL --batch-size / --mini-batch-size (all ranks
    together, as released) must split evenly -> UsageError naming the numbers. Sets a rank's
    micro-batch default: its share of a mini-batch."""
    if not args.resume or (args.kl_coef and args.objective == "grpo"):  # it will be loaded
        check_model(args.model)  # first: a mistyped path is not a preset's batch-size problem
    if args.report_to == "tensorboard":
        try:
            importlib.import_module("torch.utils.tensorboard")  # it imports tensorboard
        except ImportError:
            raise UsageError("--report-to tensorboard needs the tensorboard package: "
                             "pip install tensorboard") from None
    if args.offload and not args.fsdp:
        raise UsageError("--offload needs --fsdp")
    if args.lora_rank and args.fsdp:
        raise UsageError("--lora-rank with --fsdp is not supported (the adapters are not sharded: "
                         "LoRA's small optimizer state is what lets one GPU train; drop --fsdp)")
    if args.fsdp and world == 1 and "RANK" not in os.environ:
        raise UsageError("--fsdp needs torchrun (torchrun --nproc_per_node=N train.py ...; "
                         "N = 1 works too)")
    if args.eval_every and not args.eval_data:
        raise UsageError("--eval-every needs --eval-data FILE (JSONL with sentence1, sentence2, "
                         "score, e.g. the STS Benchmark dev split)")

    def flag(k):  # "--batch-size 64 (from the release preset)": where a value not given came from
        where = "" if k in given else " (from the resumed run)" if args.resume else \
            f" (from {args.config})" if k in getattr(args, "_from_config", ()) else \
            f" (from the {args.preset} preset)"
        return f"--{k.replace('_', '-')} {getattr(args, k)}{where}"
    batch, mini = args.batch_size, args.mini_batch_size
    if batch > records:
        raise UsageError(f"{flag('batch_size')} is more than the {records} records of --data")
    split = f"does not split over {world} processes"
    problem = (f"{flag('batch_size')} {split}" if batch % world else
               f"{flag('mini_batch_size')} {split}" if mini % world else
               f"{flag('batch_size')} is not a whole number of mini-batches of "
               f"{flag('mini_batch_size')}" if batch % mini else None)
    if problem:
        raise UsageError(f"{problem} (both count the texts of all processes together)")
    if "micro_batch_size" not in given and not args.resume:
        args.micro_batch_size = mini // world


def check_model(name):
    """--model names a model: a built-in, or a local folder (a path, or a name whose first part is
    a folder here) with a config.json that parses -> else a UsageError naming it. A hub name
    ("org/name") is left to the loading: checking it would be a download."""
    path = os.path.expanduser(name)
    local = name.startswith((".", "/", "~")) or os.path.exists(path) or name.count("/") > 1 or \
        os.path.isdir(name.split("/")[0])
    if name in ("tiny", "tiny-lm") or not local:
        return
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"--model {name}: no such model folder (no {name}/config.json)")
    try:
        json.loads(Path(path, "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {name}: config.json is not valid JSON ({e})") from None


def check_lengths(args, model, tokenizer):
    """The prompt template with this run's system prompt must fit --max-prompt-tokens, and a
    prompt and its rationale the model's positions (else a UsageError naming the flags)."""
    try:
        policy.build_prompts(tokenizer, ["x"], args.system_prompt, args.max_prompt_tokens)
    except ValueError as e:
        raise UsageError(f"--max-prompt-tokens {args.max_prompt_tokens}: {e}") from e
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and args.max_prompt_tokens + args.max_new_tokens > limit:
        raise UsageError(f"--max-prompt-tokens {args.max_prompt_tokens} + --max-new-tokens "
                         f"{args.max_new_tokens} exceeds the model's {limit} positions")


# a reward's option: the flag that sets it
REWARD_FLAGS = {"with_scale": "no_scale", "clustering_weight": "clustering_weight",
                "cross_group_weight": "cross_group_weight", "in_batch_weight": "in_batch_weight"}


def reward_options(args):
    """The options the chosen reward takes (its keyword arguments), from their flags."""
    values = dict(with_scale=not args.no_scale, clustering_weight=args.clustering_weight,
                  cross_group_weight=args.cross_group_weight,
                  in_batch_weight=args.in_batch_weight)
    takes = inspect.signature(reward.REWARDS[args.reward]).parameters
    return {k: v for k, v in values.items() if k in takes}


def default_preset(model):
    """tiny and tiny-lm (and checkpoints trained from them) get their own presets;
    anything else the release's."""
    info = Path(model) / "grace.json"
    if info.exists():
        try:
            return json.loads(info.read_text()).get("preset", "release")
        except (OSError, json.JSONDecodeError):
            return "release"
    return model if model in PRESETS else "release"



# ----------------------------------------------------------------------------- evaluate.py

def evaluate_args(argv=None):
    p = Parser(prog="evaluate.py", formatter_class=HelpFormatter,
               description="MTEB scores of a GRACE policy (a rationale per text, then mean "
                           "pooling), under grace's protocol or the release's "
                           "(docs/evaluation.md).")
    g = p.add_argument_group("models")
    g.add_argument("--model", action="append",
                   help="model folder, hub name or 'tiny'; twice = compare (default: tiny)")
    g.add_argument("--baseline",
                   help="a second model, embedded exactly as the first (rationale length, prompt, "
                        "decoding) and shown side by side")
    g.add_argument("--baseline-no-rationale", action="store_true",
                   help="with --baseline: pool the baseline's prompt alone (the first model keeps "
                        "its rationale)")
    g.add_argument("--device",
                   help="cpu, cuda, cuda:N (default: cuda if available, in bf16, else cpu)")
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--tasks",
                   help="comma-separated mteb task names, e.g. STSBenchmark.v2,SciFact")
    g.add_argument("--benchmark",
                   help="an mteb benchmark name, e.g. 'MTEB(eng, v1)' (the classic English MTEB), "
                        "or GRACE-release: the release's 55 tasks, split test, every language "
                        "subset")
    # torchrun takes --local
    g.add_argument("--local", "--local-files", action="append", metavar="FILE_OR_DIR",
                   help="your own task: STS .jsonl | BEIR retrieval folder | classification file "
                        "or train+test folder")
    g.add_argument("--limit", type=int, help="smoke run: the first N pairs (STS), queries "
                   "(retrieval: with every document judged for them, and --corpus-limit others) "
                   "or rows per split (classification) of each --local task; refused with hub "
                   "tasks, which mteb runs whole")
    g.add_argument("--corpus-limit", type=int, metavar="M",
                   help="a --local retrieval task searches its judged documents and a seeded "
                        "sample of M others (default: with --limit as many as judged ones, else "
                        "all; 0 = all)")
    g.add_argument("--perplexity", metavar="FILE",
                   help="also print each model's LM perplexity on these texts (one per line)")
    g.add_argument("--explain", nargs="+", metavar="TEXT",
                   help="print the rationale written for each text, then stop")
    g.add_argument("--corpus", help="with --explain: texts to search (one per line, or "
                   ".jsonl/.csv with 'text')")
    g.add_argument("--neighbours", type=int, default=3,
                   help="with --corpus: nearest texts shown per text")
    g.add_argument("--top-k", action=Renamed, const="--neighbours")
    g = p.add_argument_group("the embedding")
    g.add_argument("--protocol", default="grace", choices=["grace", "release"],
                   help="release: embed as the authors' evaluation did (their system prompt, "
                        "temperature 1.0, top-p 1.0, 2048 new tokens, prompt <= 1024 tokens, the "
                        "raw mean; without --tasks/--benchmark/--local/--perplexity: "
                        "--benchmark GRACE-release); a flag given overrides it")
    g.add_argument("--max-new-tokens", type=int,
                   help="rationale length cap (default: the checkpoint's grace.json, else 256)")
    g.add_argument("--system-prompt",
                   help="the instruction before each text (default: grace.json's, else policy's)")
    g.add_argument("--max-length", type=int,
                   help="prompt length cap in tokens (default: grace.json's, else 1024)")
    g.add_argument("--temperature", type=float,
                   help="0 = greedy (default: 0; --protocol release: 1.0)")
    g.add_argument("--top-p", type=float,
                   help="nucleus sampling, with --temperature > 0 (default: 1.0)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed, with --temperature > 0")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction,
                   help="L2-normalise the mean-pooled embedding (default: yes; --protocol "
                        "release: no, the raw mean)")
    g.add_argument("--no-rationale", action="store_true",
                   help="pool the prompt alone: the base-model baseline")
    g.add_argument("--instructions", action="store_true",
                   help="add mteb's task instruction to the system prompt")
    g.add_argument("--batch-size", type=int, default=16, help="texts per forward")
    g.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="static-cache + torch.compile sampler; auto = on for CUDA, off on CPU")
    g.add_argument("--threads", type=int, default=1, help="CPU threads for torch (1 is fastest "
                   "for small models on a busy machine; see docs/evaluation.md)")
    g = p.add_argument_group("results")
    g.add_argument("--out", default=".",
                   help="mteb's result cache: OUT/results/MODEL/REVISION/experiments/SETTINGS/"
                        "TASK.json, reused by reruns, read by mteb.ResultCache(OUT) ('' = keep "
                        "none)")
    g.add_argument("--recompute", action="store_true",
                   help="ignore results already in --out, and overwrite them")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar on a terminal, no progress line every 30 s in a log")
    args = p.parse_args(argv)
    check_ranges(p, args, dict(batch_size=(1, 2 ** 16), max_new_tokens=(0, 2 ** 17),
                               max_length=(1, 2 ** 20), neighbours=(1, 10 ** 6),
                               seed=(0, 2 ** 63 - 1), limit=(1, 2 ** 40), temperature=(0, 100),
                               corpus_limit=(0, 2 ** 40), threads=(1, 1024)))
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file; give a folder for the results")
    if args.baseline_no_rationale and not args.baseline:
        p.error("--baseline-no-rationale needs --baseline MODEL")
    if args.protocol == "release" and not (args.tasks or args.benchmark or args.local or
                                           args.explain or args.perplexity):
        args.benchmark = "GRACE-release"  # the release's task list (infra/mteb_tasks.py)
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.explain and (args.tasks or args.benchmark or args.local or args.perplexity or
                         args.limit):
        p.error("--explain prints rationales only: drop --tasks, --benchmark, --local, "
                "--perplexity and --limit")
    if args.corpus and not args.explain:
        p.error("--corpus is searched with --explain TEXT; without --explain it does nothing")
    if (args.limit or args.corpus_limit is not None) and (args.tasks or args.benchmark):
        flag = "--limit" if args.limit else "--corpus-limit"
        p.error(f"{flag} cuts --local tasks only; mteb's hub tasks run whole "
                f"(drop {flag} or the hub tasks)")
    if args.system_prompt is not None and not args.system_prompt.strip():
        p.error("--system-prompt is empty")
    if args.device:
        check_device(p, args.device)
    if args.explain and any(not t.strip() for t in args.explain):
        p.error("--explain: a text is empty or whitespace only")
    args.model = (args.model or ["tiny"]) + ([args.baseline] if args.baseline else [])
    return args


