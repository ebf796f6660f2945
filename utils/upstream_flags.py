"""DeepSpeed-Chat's flags that have another name here, or no use: the one table all steps share.

Every flag of DeepSpeed-Chat's step 1, step 2 (reward model and DPO) and step 3 `parse_args`
(current and older releases, plus the five `deepspeed.add_config_arguments` adds) that is not
already one of this project's own flags is listed below, so its example scripts run unchanged.
A flag either sets the field that means the same here, or is accepted and ignored with one
warning line naming why. They are hidden from `--help`; README "Coming from DeepSpeed-Chat"
lists them.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

# Which upstream script a step's config stands for (its config class's `upstream_step`).
STEP1, STEP2, DPO, STEP3 = "step1", "step2", "dpo", "step3"
ALL = (STEP1, STEP2, DPO, STEP3)
ONE_MODEL = (STEP1, STEP2, DPO)


@dataclass(frozen=True)
class UpstreamFlag:
    name: str
    steps: tuple[str, ...]  # the upstream scripts that have it
    to: str = ""  # the field it sets here ("" = none)
    value: type | None = None  # the type of its argument; None = a switch
    const: object = None  # what a switch sets `to` to
    ignored: str = ""  # why it has no effect here: printed as a warning when used


_EOT = "the tokenizer's own end-of-text token is appended (--add_eot_token, on by default)"

UPSTREAM_FLAGS = (
    # deepspeed.add_config_arguments: DeepSpeed is always on here, its JSON is --deepspeed_config
    UpstreamFlag("--deepspeed", ALL),
    UpstreamFlag("--deepscale", ALL),
    UpstreamFlag("--deepscale_config", ALL, to="deepspeed_config", value=str),
    UpstreamFlag("--deepspeed_mpi", ALL, ignored="start the run with the deepspeed launcher (or mpirun: "
                 "deepspeed.init_distributed discovers the MPI ranks itself)"),
    # older names of flags that exist here
    UpstreamFlag("--disable_dropout", ONE_MODEL, to="dropout", const=0.0),
    UpstreamFlag("--disable_actor_dropout", (STEP3,), to="actor_dropout", const=0.0),
    UpstreamFlag("--disable_critic_dropout", (STEP3,), to="critic_dropout", const=0.0),
    # Step 3 before its rename: the prompts per rollout were "train" batch, the PPO batch "mini"
    UpstreamFlag("--per_device_train_batch_size", (STEP3,), to="per_device_generation_batch_size", value=int),
    UpstreamFlag("--per_device_mini_train_batch_size", (STEP3,), to="per_device_training_batch_size", value=int),
    UpstreamFlag("--generation_batch_numbers", (STEP3,), to="generation_batches", value=int),
    # no counterpart here
    UpstreamFlag("--eot_token", (STEP1,), value=str, ignored=_EOT),
    UpstreamFlag("--end_of_conversation_token", ONE_MODEL, value=str, ignored=_EOT),
    UpstreamFlag("--eval_iters", (STEP2,), value=int,
                 ignored="evaluation always covers the whole held-out share"),
    UpstreamFlag("--add_eot_token", (STEP3,), ignored="answers end at the tokenizer's own end-of-text token"),
    UpstreamFlag("--preprocessing_num_workers", (STEP3,), value=int,
                 ignored="tokenized data is built once and cached (--data_output_path)"),
    UpstreamFlag("--enable_mixed_precision_lora", (STEP3,),
                 ignored="ZeRO++ quantized frozen weights are not implemented; LoRA trains in --dtype"),
    UpstreamFlag("--align_overflow", (STEP3,),
                 ignored="a non-finite loss adds nothing to its own model's step, actor and critic "
                 "each (--max_nonfinite_steps)"),
)

_NOTES = "_upstream_notes"  # namespace attribute collecting the ignored flags used


class _Action(argparse.Action):
    def __init__(self, option_strings, dest, flag: UpstreamFlag, **kwargs):
        self.flag = flag
        super().__init__(option_strings, dest, nargs=0 if flag.value is None else None, type=flag.value,
                         default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        if self.flag.to:
            setattr(namespace, self.flag.to, self.flag.const if self.flag.value is None else values)
        if self.flag.ignored:
            setattr(namespace, _NOTES, {**getattr(namespace, _NOTES, {}), self.flag.name: self.flag.ignored})


def flags_for(step: str | None, fields: set[str]) -> list[UpstreamFlag]:
    """The table's flags of upstream `step` whose target field this config has."""
    return [f for f in UPSTREAM_FLAGS if step in f.steps and (not f.to or f.to in fields)]


def add_upstream_flags(parser: argparse.ArgumentParser, step: str | None, fields: set[str]) -> None:
    for flag in flags_for(step, fields):
        if flag.name not in parser._option_string_actions:  # a flag of our own wins
            parser.add_argument(flag.name, dest=flag.to or _NOTES, action=_Action, flag=flag)


def pop_ignored(namespace: argparse.Namespace) -> dict[str, str]:
    """Remove and return {flag: why it is ignored} for the ignored flags the command line used."""
    return vars(namespace).pop(_NOTES, {})


def warn_ignored(notes: dict[str, str]) -> None:
    """One warning line per ignored flag, from global rank 0 only (every rank parses the same flags)."""
    if os.environ.get("RANK", "0") != "0":
        return
    for name, why in notes.items():
        print(f"warning: {name} (DeepSpeed-Chat) has no effect here: {why}", file=sys.stderr, flush=True)
