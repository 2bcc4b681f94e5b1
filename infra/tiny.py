"""The built-in "tiny" model's folder: writes models/tiny/ (config + tokenizer, no weights).

policy.load("tiny", seed=s) reads that folder and draws random weights from seed s (a ~0.3M Qwen2),
so the demo and the tests need no download. This file is how the folder was made; rebuild it
(same bytes) with

    python -m infra.tiny                  # -> models/tiny/

- build_tokenizer(): a byte-level BPE trained here in milliseconds, as a Qwen2Tokenizer with a
                     chat template
- config():          the Qwen2Config of the tiny model for a tokenizer
- write():           both saved, plus generation_config.json and a README, into a folder

It imports nothing from the project (policy imports nothing from infra/, and this must
not import policy).
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "models" / "tiny"
SAMPLE_DATA = ROOT / "data" / "sample_triples.jsonl"

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The tokenizer's fixed training lines: policy.DEFAULT_SYSTEM_PROMPT and policy.FALLBACK_TEMPLATE
# as they were when models/tiny/ was written. Copied, not imported: the tokenizer is frozen once
# shipped, so a later edit of policy's prompt must not change it (tests/infra/test_tiny.py checks
# the folder against a fresh build).
CORPUS_LINES = (
    "Read the text below and analyse it. First reason about it step by step inside "
    "<think></think> tags, then write a comprehensive understanding of the text: its topic, "
    "its key facts and what it means.",
    "System: {system}\n\nText: {text}\n\nAnalysis:",
    "<think> </think>",
)


def default_corpus():
    """The fixed lines above, then every text of data/sample_triples.jsonl."""
    lines = list(CORPUS_LINES)
    for line in SAMPLE_DATA.read_text(encoding="utf-8").splitlines():
        lines.extend(json.loads(line).values())
    return lines


def build_tokenizer(vocab_size=1024, corpus=None):
    """Byte-level BPE trained on `corpus` (default: default_corpus()), as a Qwen2Tokenizer.

    Trained with Qwen2's own pre-tokenizer and normaliser, because AutoTokenizer rebuilds those
    for a qwen2 folder: any other choice would give different ids after save + load.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(default_corpus() if corpus is None else corpus, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", unk_token=None, padding_side="left")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def config(tokenizer):
    """The tiny Qwen2: hidden 64, 4 layers, 4 heads (2 key/value), tied embeddings, ~0.3M
    parameters."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, attention_dropout=0.0,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def write(folder=FOLDER):
    """config.json, generation_config.json (EOS <|im_end|>, pad <|endoftext|>), the tokenizer files
    and a README into `folder`. No weights: policy.load draws them from its seed."""
    from transformers import GenerationConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    cfg = config(tokenizer)
    cfg.save_pretrained(folder)
    generation = GenerationConfig.from_model_config(cfg)  # what from_config gives the model
    generation.eos_token_id, generation.pad_token_id = (tokenizer.eos_token_id,
                                                        tokenizer.pad_token_id)
    generation.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(README, encoding="utf-8")
    return folder


README = """# tiny

The built-in `tiny` model of this repo: `policy.load("tiny", seed=s)` reads this folder and \
draws random
weights from seed `s` (same seed, same weights), so the demo and the tests run offline in \
milliseconds.

- **What is here**: `config.json` (a Qwen2 of about 0.3M parameters: hidden 64, 4 layers, \
4 attention heads,
  2 key/value heads, tied embeddings), `generation_config.json` (EOS `<|im_end|>`, \
pad `<|endoftext|>`) and a
  byte-level BPE tokenizer of 1024 tokens with the chat template \
`<|im_start|>role\\ncontent<|im_end|>\\n`.
  No weights: the model is random and learns nothing about language; for a small pretrained \
one see `tiny-lm`.
- **The tokenizer** was trained on the project's default system prompt, its fallback prompt \
template and
  the texts of `data/sample_triples.jsonl`. It is frozen: the tests check this folder against \
a fresh build.

## Rebuild

From the repo root (writes the same files again):

    python -m infra.tiny
"""


if __name__ == "__main__":
    print(f"wrote {write(Path(sys.argv[1]) if len(sys.argv) > 1 else FOLDER)}")
