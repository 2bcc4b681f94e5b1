"""What the entry points print besides their own lines: progress, and third-party noise.

- progress_bar(): tqdm's bar on a terminal; in a log (stderr not a terminal, tqdm off) a Heartbeat
- Heartbeat:      a plain line every ~30 s (what, done / total, per second, time left)
- quiet():        off with the known harmless warnings and progress bars of the libraries below us;
                  called first thing by train.py's and evaluate.py's main()
"""
import os
import sys
import time
import warnings

HEARTBEAT_SECONDS = 30.0

# (message regex, module regex): warnings known to say nothing about a run
HARMLESS_WARNINGS = [
    # mteb's classification on a few rows per label (a smoke run), or a label never predicted
    (r"The number of unique classes is greater than 50%", r"sklearn\."),
    (r".* ill-defined and being set to 0\.0", r"sklearn\."),
    # mteb says "superseded" twice: a log line (kept) and this warning of the same text
    (r"The task '.*' is superseded by", r"mteb\."),
]


class Heartbeat:
    """tqdm's interface (update, set_postfix, close) printing a line each `every` seconds:
    '   DESC: 120/713 texts, 4.1 texts/s, about 145 s left (rationale 22 tok)'. Nothing before the
    first interval, so a short step prints nothing."""

    def __init__(self, total=None, desc=None, unit="text", every=None, clock=time.monotonic,
                 write=None, initial=0, **_tqdm_only):
        self.total, self.desc, self.unit, self.clock = total, desc, unit, clock
        self.every = HEARTBEAT_SECONDS if every is None else every
        self.write = write or (lambda line: print(line, flush=True))
        self.n, self.initial, self.postfix = initial, initial, ""  # initial: a resumed count
        self.start = self.last = clock()

    def update(self, n=1):
        self.n += n
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        rate = (self.n - self.initial) / max(now - self.start, 1e-9)  # this run's own pace
        line = f"   {self.desc + ': ' if self.desc else ''}{self.n}"
        line += f"/{self.total}" if self.total else ""
        line += f" {self.unit}s, {rate:.1f} {self.unit}s/s"
        if self.total and rate > 0:
            line += f", about {duration((self.total - self.n) / rate)} left"
        self.write(line + (f" ({self.postfix})" if self.postfix else ""))

    def set_postfix(self, ordered_dict=None, refresh=True, **values):
        values = dict(ordered_dict or {}, **values)
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self):
        pass


def duration(seconds):
    """3725 -> '1h02m', 130 -> '2m10s', 7 -> '7s'."""
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else \
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def terminal():
    """Whether stderr is a terminal: where tqdm draws its bars."""
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress_bar(*, disable=None, **kwargs):
    """disable=None: tqdm's bar on a terminal, a Heartbeat otherwise; True: nothing at all."""
    from tqdm.auto import tqdm

    if disable is None and not terminal():
        return Heartbeat(**kwargs)
    return tqdm(disable=disable, **dict(dict(dynamic_ncols=True), **kwargs))


def quiet():
    """Silence what the libraries print for nothing: the warnings in HARMLESS_WARNINGS (by message
    and module; every other warning stays), transformers' "Loading weights" bar (one per model
    load), datasets' Map / Generating-split bars, and the hub's download bars off a terminal (a
    log fills with carriage returns). A variable the user set (HF_*_DISABLE_PROGRESS_BARS) wins."""
    for message, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    on_terminal = terminal()
    hub_bars = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets imports
    if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["datasets"].disable_progress_bars()
    from huggingface_hub import utils as hub
    from transformers.utils import logging as transformers_logging

    with warnings.catch_warnings():  # the hub warns when HF_HUB_DISABLE_PROGRESS_BARS=0 is set
        warnings.simplefilter("ignore")
        transformers_logging.disable_progress_bar()  # also the hub's bars: back on below
    if on_terminal and hub_bars is None:
        hub.enable_progress_bars()
