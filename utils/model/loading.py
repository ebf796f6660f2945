"""Load tokenizers and causal LMs the way every training step needs them."""
from __future__ import annotations

import os

import torch
from torch import nn

from utils.config import ConfigError
from utils.model.resolve import not_found, resolve_model_path
from utils.model.tiny import EOT

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
          "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
# Text whose encoding must agree for two tokenizers to count as the same (see tokenizers_match).
PROBE = "Hello, World! 12345 + 678 = 13023.\n\n\tÜber café — naïve 你好 <|endoftext|> don't"


def _load(loader, path: str, name: str, **kwargs):
    """from_pretrained with user-facing errors: a missing model is a ConfigError, not a traceback."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        if not os.path.isdir(path):
            raise not_found(name) from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot load {name} ({path}): {first}") from err


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, padding_side: str = "right"):
    """HF tokenizer that always has a pad token (eos when the model defines none)."""
    from transformers import AutoTokenizer
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    path = resolve_model_path(name_or_path)
    tok = _load(AutoTokenizer, path, name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            tok.add_special_tokens({"eos_token": EOT})
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_causal_lm(name_or_path: str, tokenizer, dtype: torch.dtype = torch.float32,
                   dropout: float | None = None, trust_remote_code: bool = False,
                   gradient_checkpointing: bool = False):
    """Causal LM whose special ids and embedding size agree with `tokenizer`."""
    from transformers import AutoModelForCausalLM
    return load_hf_model(AutoModelForCausalLM, name_or_path, tokenizer, dtype, dropout,
                         trust_remote_code, gradient_checkpointing)


def load_hf_model(auto_class, name_or_path: str, tokenizer, dtype: torch.dtype = torch.float32,
                  dropout: float | None = None, trust_remote_code: bool = False,
                  gradient_checkpointing: bool = False, **config_overrides):
    """Any Auto* model class, set up the same way: ids from the tokenizer, embeddings resized
    to fit it, dropout and gradient checkpointing as asked."""
    from transformers import AutoConfig
    path = resolve_model_path(name_or_path)
    config = _load(AutoConfig, path, name_or_path, trust_remote_code=trust_remote_code)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = _load(auto_class, path, name_or_path, config=config, dtype=dtype,
                  trust_remote_code=trust_remote_code)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # multiple of 8: tensor-core friendly, as DeepSpeed-Chat does
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    if dropout is not None:
        set_dropout(model, dropout)
    if gradient_checkpointing:
        # non-reentrant: works when the inputs need no grad (frozen embeddings under LoRA)
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.config.use_cache = False
    return model


def _is_dropout_prob(key: str, value) -> bool:
    return (("dropout" in key.lower() or key.endswith("pdrop"))
            and isinstance(value, (int, float)) and not isinstance(value, bool))


def _set_dropout_attrs(obj, p: float) -> None:
    for key, value in list(vars(obj).items()):
        if _is_dropout_prob(key, value):
            setattr(obj, key, p)


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout probability to `p`: the config's fields (so a save keeps them), the
    nn.Dropout modules, and the float copies attention modules keep (Llama, OPT, BLOOM)."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {p}")
    p = float(p)
    config = getattr(model, "config", None)
    if config is not None:
        _set_dropout_attrs(config, p)
        for sub in ("text_config", "decoder"):
            if hasattr(config, sub) and hasattr(getattr(config, sub), "__dict__"):
                _set_dropout_attrs(getattr(config, sub), p)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        _set_dropout_attrs(module, p)


def auto_dtype_name(device) -> str:
    """The fastest safe training dtype here: bf16 where the hardware computes in it natively
    (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else fp16 on older GPUs, else fp32.
    Measured on an AVX2-only CPU: a bf16 matmul ran at 19 GFLOP/s against 153 in fp32."""
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    fast_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if fast_bf16 else "fp32"


def resolve_dtype_name(name: str, device) -> str:
    """'auto' -> what auto_dtype_name picks; anything else is validated and returned."""
    if str(name).lower() == "auto":
        return auto_dtype_name(device)
    resolve_dtype(name, device)
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[DTYPES[str(name).lower()]]


def resolve_dtype(name: str, device) -> torch.dtype:
    """'bf16' / 'fp32' / 'fp16' / 'auto' -> torch dtype, refusing fp16 where it cannot run (CPU)."""
    if str(name).lower() == "auto":
        name = auto_dtype_name(device)
    dtype = DTYPES.get(str(name).lower())
    if dtype is None:
        raise ConfigError(f"unknown dtype {name!r}: use auto, bf16, fp32 or fp16")
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"unknown device {device!r}") from err
    if dtype is torch.float16 and kind == "cpu":
        raise ConfigError("fp16 needs a CUDA device; on CPU use --dtype bf16 or fp32")
    return dtype


def _specials(tok) -> tuple:
    return (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token,
            sorted(map(str, tok.all_special_tokens)))


def tokenizers_match(tok_a, tok_b) -> bool:
    """Same vocabulary, same special tokens and same ids for a probe text, whatever the class
    (two classes over one vocabulary can still split text differently)."""
    return (tok_a.get_vocab() == tok_b.get_vocab() and _specials(tok_a) == _specials(tok_b)
            and tok_a(PROBE)["input_ids"] == tok_b(PROBE)["input_ids"])


def require_same_tokenizer(tokenizer, name_or_path: str, role: str, reference_name: str,
                           trust_remote_code: bool = False) -> None:
    """Models that exchange token ids (actor, reference, critic, reward) must share a tokenizer:
    raise one clear ConfigError when `name_or_path`'s differs from `tokenizer`."""
    other = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if not tokenizers_match(tokenizer, other):
        raise ConfigError(f"the {role} ({name_or_path}) has a different tokenizer from "
                          f"{reference_name}: they exchange token ids, so both must use the same "
                          "tokenizer (train the reward model from the actor's Step 1 output)")
