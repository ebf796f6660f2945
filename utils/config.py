"""The one configuration definition shared by every step.

Each group of flags is a dataclass whose fields carry their help text. A step's config
is a dataclass inheriting the groups it needs (Step 1 = data + model + LoRA + optimizer +
runtime + logging); `parse_config` turns it into an argparse parser once, so a flag is
defined in exactly one place and means the same thing in every step.

Flag names follow DeepSpeed-Chat (`--data_path`, `--zero_stage`, ...); the dashed spelling
(`--data-path`) is accepted too, and so are DeepSpeed-Chat's flags that are named differently
here or have no use (utils/upstream_flags.py). No flag is reached by an abbreviation.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from utils.upstream_flags import add_upstream_flags, pop_ignored, warn_ignored


class ConfigError(ValueError):
    """A user-facing configuration problem: reported as one line, exit code 2."""


def cache_dir() -> Path:
    """Root of everything built at run time (tokenizers, converted models, tokenized data)."""
    return Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit")).expanduser()


DTYPES = ("auto", "bf16", "fp32", "fp16")  # --dtype of every step and chat.py
CHAT_TEMPLATE_MODES = ("auto", "none")  # --chat_template of every step (utils/data/render.py)
SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def doc(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class DataConfig:
    data_path: list[str] = field(default_factory=lambda: ["bundled"], metadata=doc(
        "Data sources, blended: hub names DeepSpeed-Chat accepts (Dahoas/rm-static, ...), local "
        "json/jsonl/parquet/csv files or save_to_disk folders, or 'bundled' (the embedded task)."))
    data_split: str = field(default="2,4,4", metadata=doc(
        "Shares of each source for steps 1,2,3, e.g. '2,4,4' (seeded, disjoint between steps)."))
    sft_only_data_path: list[str] = field(default_factory=list, metadata=doc(
        "Extra sources used only by Step 1 (not split)."))
    data_output_path: str = field(default="", metadata=doc(
        "Where tokenized data is cached (default: $RLHFKIT_CACHE/data)."))
    max_seq_len: int = field(default=512, metadata=doc("Maximum tokens per sequence."))
    num_examples: int = field(default=0, metadata=doc(
        "Use at most this many raw examples per source before splitting (0 = all)."))
    chat_template: str = field(default="auto", metadata=doc(
        "How conversational rows (messages, or prompt/chosen/rejected given as {role, content} lists) "
        "become text: auto = with the tokenizer's chat template when it has one; none = as "
        "DeepSpeed-Chat's ' Human: ... Assistant:' text, like every plain-text row.",
        choices=CHAT_TEMPLATE_MODES))
    # Not a flag: set once the step's data are built, so training_config.json records the format
    # the model trained on (template, human_assistant or mixed) and chat.py talks to it in it.
    data_format: str = field(default="", init=False, metadata=doc(
        "How the step's rows were rendered (set by the run)."))


@dataclass
class ModelConfig:
    model_name_or_path: str = field(default="tiny-llama", metadata=doc(
        "Hub id, local HF directory, or built-in name: tiny-<family> (opt, llama, gpt2, gpt_neox, "
        "bloom, gptj, gpt_neo, codegen, qwen2) or smollm2-135m."))
    dropout: float | None = field(default=None, metadata=doc(
        "Set every dropout probability of the model to this value (default: keep the model's)."))
    dtype: str = field(default="auto", metadata=doc(
        "Training dtype: bf16, fp32, fp16 (CUDA only), or auto = bf16 where the hardware runs it "
        "natively (recent GPUs, CPUs with AVX512-BF16/AMX), else fp16 on GPU / fp32 on CPU.",
        choices=DTYPES))
    gradient_checkpointing: bool = field(default=False, metadata=doc(
        "Recompute activations in backward to save memory."))
    trust_remote_code: bool = field(default=False, metadata=doc(
        "Allow model code from the hub to run (off by default)."))
    add_eot_token: bool = field(default=True, metadata=doc(
        "Append the tokenizer's end-of-text token to every answer so the model learns to stop."))


@dataclass
class LoRAConfig:
    lora_dim: int = field(default=0, metadata=doc("LoRA rank; 0 disables LoRA."))
    lora_module_name: str = field(default="", metadata=doc(
        "Only add LoRA to linear layers whose name contains this (default: all attention and MLP "
        "projections)."))
    lora_alpha: float = field(default=0.0, metadata=doc(
        "LoRA alpha: the update B @ A is scaled by alpha / lora_dim (default 0 = lora_dim, scale 1). "
        "DeepSpeed-Chat scales by 1 / lora_dim: --lora_alpha 1 reproduces it."))
    only_optimize_lora: bool = field(default=False, metadata=doc(
        "Freeze the base weights and train only the LoRA matrices."))
    lora_learning_rate: float = field(default=5e-4, metadata=doc("Learning rate of LoRA parameters."))


@dataclass
class OptimConfig:
    per_device_train_batch_size: int = field(default=8, metadata=doc("Training batch per process."))
    per_device_eval_batch_size: int = field(default=8, metadata=doc("Evaluation batch per process."))
    learning_rate: float = field(default=2e-5, metadata=doc("Peak learning rate."))
    weight_decay: float = field(default=0.0, metadata=doc("AdamW weight decay."))
    num_train_epochs: int = field(default=1, metadata=doc("Passes over the training data."))
    max_steps: int = field(default=0, metadata=doc(
        "Stop after this many optimizer steps (0 = run all epochs)."))
    gradient_accumulation_steps: int = field(default=1, metadata=doc(
        "Micro-batches accumulated per optimizer step."))
    lr_scheduler_type: str = field(default="cosine", metadata=doc(
        "Schedule after warmup: linear, cosine, cosine_with_restarts, polynomial, constant, "
        "constant_with_warmup.", choices=SCHEDULES))
    num_warmup_steps: int = field(default=0, metadata=doc("Linear warmup steps."))
    max_grad_norm: float = field(default=1.0, metadata=doc("Gradient clipping norm (0 = off)."))
    compute_fp32_loss: bool = field(default=False, metadata=doc(
        "Compute the loss from fp32 logits (more exact under bf16/fp16)."))


@dataclass
class ZeroConfig:
    """One trained model's ZeRO stage (Step 3 has one per model instead)."""
    zero_stage: int = field(default=0, metadata=doc("DeepSpeed ZeRO stage 0-3.", choices=(0, 1, 2, 3)))


@dataclass
class RuntimeConfig:
    offload: bool = field(default=False, metadata=doc(
        "Offload optimizer state (and, with ZeRO-3, parameters) to CPU memory."))
    deepspeed_config: str = field(default="", metadata=doc(
        "A DeepSpeed JSON whose entries override the built config."))
    seed: int = field(default=1234, metadata=doc("Random seed (data split, init, sampling)."))
    local_rank: int = field(default=-1, metadata=doc("Set by the deepspeed launcher."))
    output_dir: str = field(default="", metadata=doc("Where the trained model is saved."))
    overwrite_output_dir: bool = field(default=False, metadata=doc(
        "Allow writing into an output_dir that already holds a model."))


@dataclass
class CheckpointConfig:
    save_steps: int = field(default=0, metadata=doc(
        "Write a resumable checkpoint (engines, optimizer, scheduler, RNG, data position) to "
        "<output_dir>/checkpoints every this many optimizer steps (Step 3: PPO rounds) and at the end (0 = none; "
        "SIGTERM/SIGINT always write one before exiting)."))
    save_total_limit: int = field(default=2, metadata=doc(
        "Keep only the newest this many checkpoints (0 = keep all)."))
    resume: bool = field(default=False, metadata=doc(
        "Continue from the newest complete checkpoint in --output_dir, at the same data position "
        "(a fresh start when there is none)."))
    max_nonfinite_steps: int = field(default=5, metadata=doc(
        "Updates in a row skipped for a NaN/inf loss (each counted and logged) before the run "
        "stops; the last checkpoint stays intact."))


@dataclass
class LogConfig:
    enable_tensorboard: bool = field(default=False, metadata=doc("Write TensorBoard events."))
    tensorboard_path: str = field(default="", metadata=doc(
        "TensorBoard folder (default: <output_dir>/tensorboard)."))
    print_loss: bool = field(default=False, metadata=doc("Print the loss of every step."))
    log_interval: int = field(default=10, metadata=doc("Steps between metric log lines."))
    eval_interval: int = field(default=0, metadata=doc(
        "Also evaluate every this many optimizer steps (0 = before training and after each epoch)."))
    disable_tqdm: bool = field(default=False, metadata=doc("Hide progress bars."))


def _is_list(tp) -> bool:
    return typing.get_origin(tp) is list


def _scalar_type(tp):
    """int | None -> int; list[str] -> str."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if _is_list(tp) or (args and typing.get_origin(tp) in (typing.Union, types.UnionType)):
        return args[0]
    return tp


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line, not the whole usage text, and a flag is never
    reached by an abbreviation (`--deepspeed` must not be read as `--deepspeed_config`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


_Parser = ArgumentParser


class _RaisingParser(_Parser):
    """For checking flags inside another program (train.py): a bad flag raises ConfigError."""

    def error(self, message):
        raise ConfigError(message)


@dataclass(frozen=True)
class Flag:
    """One command-line flag of a config: its flat name, the dotted path of the field it sets
    (`actor_zero_stage` -> `actor.zero_stage`), and that field's type, default and help."""
    name: str
    path: str
    type: object
    default: object
    metadata: dict


def group(cls, prefix: str = "", help: dict[str, str] | None = None, **defaults):
    """A field holding a nested config group (a composed config, e.g. Step 3's `actor`). Its
    fields are flags named `prefix + field name` (DeepSpeed-Chat's flat names: `--actor_lora_dim`
    sets `actor.lora_dim`); `defaults` and `help` override the group's own per use."""
    return field(default_factory=lambda: cls(**defaults),
                 metadata={"group": cls, "prefix": prefix, "help": help or {}, "defaults": defaults})


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def config_flags(config_cls, prefix: str = "", path: str = "", overrides: dict | None = None) -> list[Flag]:
    """Every flag of a config class, nested groups expanded in place (one mechanism for flat
    and composed configs: a flat config's flags are its fields)."""
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        if not f.init:  # set by the run, not by a flag (e.g. DataConfig.data_format)
            continue
        if "group" in f.metadata:
            meta = f.metadata
            out += config_flags(meta["group"], prefix + meta["prefix"], f"{path}{f.name}.",
                                {"help": meta["help"], "defaults": meta["defaults"]})
            continue
        default, metadata = _default(f), dict(f.metadata)
        if overrides:
            default = overrides["defaults"].get(f.name, default)
            metadata["help"] = overrides["help"].get(f.name, metadata.get("help", ""))
        out.append(Flag(prefix + f.name, path + f.name, hints[f.name], default, metadata))
    return out


def flag_table(config_cls) -> dict[str, str]:
    """The alias table: flat flag name (DeepSpeed-Chat's) -> dotted field path."""
    return {flag.name: flag.path for flag in config_flags(config_cls)}


def from_flat(config_cls, values: dict):
    """A config instance from flat flag values (an argparse namespace's vars). Every flag of
    the class must be present; nested groups are built from their prefixed flags."""
    unknown = set(values) - set(flag_table(config_cls))
    if unknown:
        raise TypeError(f"{config_cls.__name__} has no flag(s) {', '.join(sorted(unknown))}")
    return _build(config_cls, values, "")


def _build(config_cls, values: dict, prefix: str):
    kwargs = {}
    for f in dataclasses.fields(config_cls):
        if "group" in f.metadata:
            kwargs[f.name] = _build(f.metadata["group"], values, prefix + f.metadata["prefix"])
        elif f.init:
            kwargs[f.name] = values[prefix + f.name]
    return config_cls(**kwargs)


def to_flat(cfg) -> dict:
    """The inverse of from_flat: {flat flag name: value}."""
    return {flag.name: resolve(cfg, flag.path) for flag in config_flags(type(cfg))}


def resolve(cfg, path: str):
    """The value at a dotted field path (`actor.zero_stage`)."""
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def build_parser(config_cls, description: str = "", parser_cls=_Parser) -> argparse.ArgumentParser:
    parser = parser_cls(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        epilog="DeepSpeed-Chat's flags are accepted too (README: Coming from DeepSpeed-Chat).")
    flags = config_flags(config_cls)
    for flag in flags:
        kwargs = {"dest": flag.name, "help": flag.metadata.get("help", "")}
        if flag.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_list(flag.type) and flag.metadata.get("repeat"):  # `--f a --f b` and `--f a b` both add
            kwargs.update(nargs="+", action="extend", type=_scalar_type(flag.type))
        elif _is_list(flag.type):
            kwargs.update(nargs="*", type=_scalar_type(flag.type))
        else:
            kwargs["type"] = _scalar_type(flag.type)
        if "choices" in flag.metadata:
            kwargs["choices"] = flag.metadata["choices"]
        parser.add_argument(f"--{flag.name}", default=flag.default, **kwargs)
    add_upstream_flags(parser, getattr(config_cls, "upstream_step", None), {flag.name for flag in flags})
    return parser


def parse_config(config_cls, argv=None, description: str = "", exit_on_error: bool = True, warn: bool = True):
    """Parse argv into an instance of `config_cls` (nested groups built from their flat flags:
    from_flat), then run its `validate()` if it has one. With exit_on_error=False a bad flag
    raises ConfigError instead of exiting. With warn, each DeepSpeed-Chat flag used that has no
    effect here gets one warning line (rank 0)."""
    parser = build_parser(config_cls, description, _Parser if exit_on_error else _RaisingParser)
    ns = parser.parse_args(_underscore_flags(parser, sys.argv[1:] if argv is None else list(argv)))
    ignored = pop_ignored(ns)
    if warn:
        warn_ignored(ignored)
    cfg = from_flat(config_cls, vars(ns))
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _underscore_flags(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Accept `--data-path` for `--data_path` without listing both spellings in --help."""
    known = set(parser._option_string_actions)
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and flag not in known:
            alt = "--" + flag[2:].replace("-", "_")
            alt_neg = "--no-" + flag[5:].replace("-", "_") if flag.startswith("--no-") else None
            flag = alt if alt in known else alt_neg if alt_neg in known else flag
        out.append(flag + eq + value)
    return out


def parse_data_split(split: str) -> list[float]:
    """'2,4,4' -> [0.2, 0.4, 0.4]; raises ConfigError on anything else."""
    try:
        parts = [float(p) for p in split.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"--data_split {split!r} must be three non-negative numbers "
                          "separated by commas, e.g. 2,4,4")
    total = sum(parts)
    return [p / total for p in parts]


def validate_run(cfg, default_output_dir: str, positive: dict[str, int]) -> None:
    """Checks and defaults every step shares: the data split, the output and data-cache
    folders, the checkpoint counts, and `positive` ({flag: its value}) at least 1."""
    parse_data_split(cfg.data_split)
    if not cfg.output_dir:
        cfg.output_dir = default_output_dir
    if not cfg.data_output_path:
        cfg.data_output_path = str(cache_dir() / "data")
    require_positive(positive)
    for flag, value in {"--save_steps": cfg.save_steps, "--save_total_limit": cfg.save_total_limit,
                        "--max_nonfinite_steps": cfg.max_nonfinite_steps}.items():
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")


def require_positive(values: dict[str, int]) -> None:
    """Each {flag: value} at least 1."""
    for flag, value in values.items():
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1 (got {value})")


def validate_training(cfg, default_output_dir: str) -> None:
    """validate_run for the one-model steps (1, 2, DPO), plus their LoRA check."""
    validate_run(cfg, default_output_dir, {
        "--per_device_train_batch_size": cfg.per_device_train_batch_size,
        "--per_device_eval_batch_size": cfg.per_device_eval_batch_size,
        "--gradient_accumulation_steps": cfg.gradient_accumulation_steps, "--max_seq_len": cfg.max_seq_len})
    if cfg.only_optimize_lora and cfg.lora_dim <= 0:
        raise ConfigError("--only_optimize_lora needs --lora_dim > 0")
