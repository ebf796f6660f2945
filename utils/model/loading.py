"""Load tokenizers and causal LMs the way every training step needs them."""
from __future__ import annotations

import os
import pickle

import torch
from torch import nn

from utils.config import ConfigError
from utils.model.pickled import (dschat_reward_to_sequence_classification, is_dschat_reward_model,
                                 pickle_refusal, pickled_weight_files, read_state_dict)
from utils.model.resolve import not_found, resolve_model_path
from utils.model.tiny import EOT

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
          "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
# Text whose encoding must agree for two tokenizers to count as the same (see tokenizers_match).
PROBE = "Hello, World! 12345 + 678 = 13023.\n\n\tÜber café — naïve 你好 <|endoftext|> don't"


def _one_line(err: BaseException, limit: int = 400) -> str:
    """An exception's message as one line (transformers' messages often span several)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _load(loader, path: str, name: str, what: str, **kwargs):
    """from_pretrained with user-facing errors: a missing or unloadable model (corrupt JSON, an
    unknown model_type, a truncated weights file...) is one ConfigError line, not a traceback."""
    return _guarded(lambda: loader.from_pretrained(path, **kwargs), path, name, what)


def _guarded(build, path: str, name: str, what: str):
    """`build()`, its errors turned into one ConfigError line (see _load)."""
    try:
        return build()
    except ConfigError:
        raise
    except pickle.UnpicklingError as err:  # not expected (pickles are read in pickled.py), but never a traceback
        raise ConfigError(pickle_refusal(name, "its weights file", err)) from err
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, RuntimeError, SafetensorError...
        if not os.path.isdir(path) and isinstance(err, (OSError, ValueError)):
            raise not_found(name) from err
        where = "" if str(path) == str(name) else f" ({path})"
        raise ConfigError(f"cannot load the {what} of {name}{where}: {_one_line(err)}") from err


def _check_weights(model, info: dict, name: str, causal_lm: bool) -> None:
    """Refuse a checkpoint that does not fill the model: weights of another shape than config.json
    says, or weights absent (from_pretrained would start those from random values and only warn).
    A task head on top of a causal LM (the reward model's value head) is allowed to be new."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, saved, wanted = mismatched[0][:3]
        raise ConfigError(f"cannot load the weights of {name}: {len(mismatched)} do not fit its config.json "
                          f"(e.g. {key} is {tuple(saved)} in the checkpoint, {tuple(wanted)} in the model)")
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    missing = sorted(k for k in info.get("missing_keys") or [] if causal_lm or (prefix and k.startswith(prefix)))
    if missing:
        raise ConfigError(f"cannot load the weights of {name}: {len(missing)} of the model's weights are not in "
                          f"its checkpoint (e.g. {missing[0]}): a truncated or foreign checkpoint")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, padding_side: str = "right"):
    """HF tokenizer that always has a pad token (eos when the model defines none)."""
    from transformers import AutoTokenizer
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    path = resolve_model_path(name_or_path)
    tok = _load(AutoTokenizer, path, name_or_path, "tokenizer", trust_remote_code=trust_remote_code)
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
    config = _load(AutoConfig, path, name_or_path, "config", trust_remote_code=trust_remote_code)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    for key, value in config_overrides.items():
        setattr(config, key, value)
    causal_lm = auto_class.__name__ == "AutoModelForCausalLM"
    pickles = pickled_weight_files(path, name_or_path)
    if pickles:
        model, info = _load_pickled(auto_class, pickles, path, name_or_path, config, dtype, trust_remote_code,
                                    causal_lm)
    else:
        model, info = _load(auto_class, path, name_or_path, "weights", config=config, dtype=dtype,
                            trust_remote_code=trust_remote_code, use_safetensors=True,
                            ignore_mismatched_sizes=True, output_loading_info=True)
    _check_weights(model, info, name_or_path, causal_lm=causal_lm)
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


def _load_pickled(auto_class, files: list[str], path: str, name: str, config, dtype, trust_remote_code: bool,
                  causal_lm: bool):
    """from_pretrained of weights we read from pickles (utils/model/pickled.py): the state dict
    goes to the class `auto_class` would pick, built first on the meta device only to learn it."""
    from transformers import GenerationConfig
    state = read_state_dict(files, name)
    with torch.device("meta"):
        model_class = type(_guarded(lambda: auto_class.from_config(config, trust_remote_code=trust_remote_code),
                                    path, name, "weights"))
    if is_dschat_reward_model(state):
        if causal_lm:
            raise ConfigError(f"{name} holds a reward model in DeepSpeed-Chat's layout (rwtransformer.* and "
                              "v_head.weight), not a causal LM: use it as the reward model or critic, and a "
                              "Step 1 model as the actor or reference")
        state = dschat_reward_to_sequence_classification(state, model_class.base_model_prefix)
    model, info = _guarded(lambda: model_class.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, ignore_mismatched_sizes=True,
        output_loading_info=True), path, name, "weights")
    model.config.name_or_path = path
    if model.can_generate():  # from_pretrained(None, ...) did not read the folder's generation_config.json
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError):  # none there (or unreadable): the defaults from config.json stay
            pass
    return model, info


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
    """The fastest safe training dtype here: on CUDA bf16 where the GPU computes in it, else
    fp16; on CPU bf16 where its matmuls measure >= 1.5x faster than fp32's, else fp32
    (utils/model/dtype_probe.py)."""
    if torch.device(device).type == "cuda":
        return "bf16" if _cuda_bf16() else "fp16"
    from utils.model.dtype_probe import cpu_auto_dtype_name
    return cpu_auto_dtype_name()


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
    if dtype is torch.bfloat16 and kind == "cuda" and torch.cuda.is_available() and not _cuda_bf16():
        raise ConfigError("bf16 needs a GPU that computes in it (compute capability 8.0 or newer); "
                          "on this one use --dtype fp16 or fp32")
    return dtype


def _cuda_bf16() -> bool:
    """Whether this GPU has native bf16 (emulated bf16 on older GPUs runs, but slowly)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


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
