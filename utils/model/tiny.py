"""`tiny-<family>`: random-init models of a few million parameters sharing one small tokenizer.

They make every code path (each architecture's quirks: Conv1D in GPT-2, fused QKV in
BLOOM/CodeGen/GPT-NeoX, ALiBi, GQA) runnable on a CPU in seconds. The tokenizer is a
byte-level BPE trained on the bundled task text, so the tiny models can actually learn it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import zlib
from pathlib import Path

import torch

from utils.config import cache_dir
from utils.model.cache import MODEL_FILES, TOKENIZER_FILES, build_once, read_stamp, save_model
from utils.data.bundled import tokenizer_training_text

# Bump when the recipe below changes so cached builds are redone.
TINY_VERSION = 1
EOT = "<|endoftext|>"
PAD = "<|pad|>"
VOCAB_SIZE = 8192
MAX_POSITIONS = 1024
# Qwen2's pre-tokenizer (digits one by one). transformers' AutoTokenizer rebuilds a qwen2
# model's tokenizer with this regex whatever tokenizer_config.json says, so using it for
# the shared tokenizer is what keeps token ids identical across all families.
SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
               r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

HIDDEN, LAYERS, HEADS = 128, 4, 4  # tiny-<family>: hidden 128, MLP 512, 4 layers
# `tiny-<family>-h<N>`: hidden N, MLP 4N, 2 layers. Sizes on both sides of ZeRO-3's parameter
# persistence threshold (parameters under it stay whole on every rank, a separate code path):
# h64 has 4k-element attention matrices, h256 has 262k-element MLP matrices.
SIZED_LAYERS = 2


def parse_tiny_name(name: str) -> tuple[str, int] | None:
    """'tiny-llama' -> ('llama', 128); 'tiny-qwen2-h64' -> ('qwen2', 64); None if not a tiny name."""
    match = re.fullmatch(r"tiny-(\w+?)(?:-h(\d+))?", name)
    if match is None or match.group(1) not in TINY_FAMILIES:
        return None
    hidden = int(match.group(2) or HIDDEN)
    return (match.group(1), hidden) if hidden % 32 == 0 and 32 <= hidden <= 2048 else None


def _family_kwargs(family: str, hidden: int = HIDDEN) -> dict:
    """Config kwargs per family (vocab and special ids are added by the caller)."""
    ffn, layers = 4 * hidden, LAYERS if hidden == HIDDEN else SIZED_LAYERS
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=HEADS,
                  max_position_embeddings=MAX_POSITIONS)
    gpt_style = dict(n_embd=hidden, n_layer=layers, n_head=HEADS, n_positions=MAX_POSITIONS)
    return {
        "opt": dict(common, ffn_dim=ffn, word_embed_proj_dim=hidden),
        "llama": dict(common, intermediate_size=ffn, num_key_value_heads=2),
        "qwen2": dict(common, intermediate_size=ffn, num_key_value_heads=2),
        "gpt2": dict(gpt_style, n_inner=ffn),
        "gpt_neox": dict(common, intermediate_size=ffn, rotary_pct=0.25),
        "bloom": dict(hidden_size=hidden, n_layer=layers, n_head=HEADS),  # ALiBi: no position limit
        "gptj": dict(gpt_style, n_inner=ffn, rotary_dim=min(16, hidden // HEADS)),
        "gpt_neo": dict(hidden_size=hidden, num_layers=layers, num_heads=HEADS,
                        max_position_embeddings=MAX_POSITIONS, intermediate_size=ffn,
                        attention_types=[[["global", "local"], layers // 2]], window_size=256),
        # CodeGen splits its fused QKV into 4 groups, and tensor parallelism halves that again.
        "codegen": dict(gpt_style, n_head=8, n_ctx=MAX_POSITIONS, n_inner=ffn, rotary_dim=min(8, hidden // 8)),
    }[family]


TINY_FAMILIES = ("opt", "llama", "gpt2", "gpt_neox", "bloom", "gptj", "gpt_neo", "codegen", "qwen2")


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(texts):
    """Byte-level BPE over `texts` (an iterable of str), wrapped as a transformers tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  special_tokens=[EOT, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    # unk_token is set because the qwen2 tokenizer class forces it; bytes never need it.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT,
                                   unk_token=EOT, pad_token=PAD, model_max_length=MAX_POSITIONS)


def save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save_pretrained(out)
    # A generic class name keeps AutoTokenizer from swapping in a family-specific class
    # with different pre-tokenization (it still does for qwen2: see SPLIT_REGEX).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _training_texts() -> list[str]:
    return list(tokenizer_training_text())


@functools.lru_cache(maxsize=1)
def _training_text_digest() -> str:
    """Fingerprint of the training text: a cached tokenizer is rebuilt when the text changes."""
    sha = hashlib.sha256()
    for text in _training_texts():
        sha.update(text.encode() + b"\0")
    return sha.hexdigest()[:16]


def tokenizer_path() -> Path:
    """The shared tiny tokenizer, trained once on the bundled text and cached."""
    stamp = {"kind": "tiny-tokenizer", "version": TINY_VERSION, "text_sha": _training_text_digest()}

    def build(tmp: Path) -> None:
        save_tokenizer(train_tokenizer(_training_texts()), tmp)

    return build_once(cache_dir() / "tokenizers" / "tiny-bpe", stamp, build, required=TOKENIZER_FILES)


# ---------------------------------------------------------------- models

def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def tiny_config(family: str, tokenizer, hidden: int = HIDDEN):
    from transformers import AutoConfig
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return AutoConfig.for_model(family, **_family_kwargs(family, hidden), **ids)


def _name(family: str, hidden: int) -> str:
    return f"tiny-{family}" if hidden == HIDDEN else f"tiny-{family}-h{hidden}"


def build_tiny(family: str, tokenizer, out: Path, hidden: int = HIDDEN) -> None:
    """Seeded random init (same name -> same weights), saved as a plain HF directory."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    config = tiny_config(family, tokenizer, hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(_name(family, hidden)))
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    save_model(model, out)  # not model.save_pretrained: that writes nothing on a rank other than 0
    save_tokenizer(tokenizer, out)


def tiny_model_path(family: str, hidden: int = HIDDEN) -> Path:
    from transformers import PreTrainedTokenizerFast
    tok_dir = tokenizer_path()
    tok_stamp = read_stamp(tok_dir)
    name = _name(family, hidden)
    stamp = {"kind": name, "version": TINY_VERSION, "tokenizer": tok_stamp}

    def build(tmp: Path) -> None:
        build_tiny(family, PreTrainedTokenizerFast.from_pretrained(tok_dir), tmp, hidden)

    return build_once(cache_dir() / "models" / name, stamp, build, required=MODEL_FILES)
