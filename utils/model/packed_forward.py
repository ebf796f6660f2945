"""Forwards over packed rows (utils/model/packing.py), and whether a model may take them.

The model is called as always (DeepSpeed engine, peft wrapper: DeepSpeed 0.19's engine.forward
registers the hooks its backward needs, so the forward must go through it), on the bins, with
position ids and no attention mask. Only the positions whose outputs are needed reach the LM
head: a forward pre-hook on the head hands it those rows' hidden states (transformers'
logits_to_keep keeps the same columns in every row, which a bin cannot use). What the family
does after its head (a logit scale, a softcap) still applies.

Whether a model packs is measured, not listed: on its first packed call, a few of the batch's
rows are run padded and packed into one bin, and packed again with the first sequence's tokens
changed. If the packed outputs differ from the padded ones beyond the dtype's tolerance, or the
later sequences' outputs follow the first one's tokens (attention leaks between sequences: the
family builds its mask without the position ids, as transformers 5's OPT does), or the packed
forward raises, the model keeps the padded forwards for the rest of the run (one line says which
model and why). The decision is cached per model object and agreed on by every process.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch
from torch import nn

from utils import dist, flops
from utils.model.forward import accepts, unwrap
from utils.model.packing import Packed, bin_width, pack, packed_shape

# outputs(model, seq, attention_mask, prompt_len, packed or None for the padded forward) -> (B, A)
Outputs = Callable[[nn.Module, torch.Tensor, torch.Tensor, int, "Packed | None"], torch.Tensor]

CHECK_ROWS = 3
# The check's two tests, max |difference| over the checked rows' answer tokens:
# - packed against padded: fp32 differs by summation order alone; half precision rounds each
#   matmul differently for other shapes, by up to 0.24 nats on SmolLM2-135M in bf16 (a leak
#   between its packed sequences moves log-probs by 5-8, a nat on average);
# - a bin's later sequences when its first one's tokens change: computed from the same inputs
#   at the same shapes, they come out the same in any dtype unless something leaks between
#   sequences (tiny random OPT in bf16: 0.2, under the bf16 noise of the first test).
FULL_AGREEMENT, HALF_AGREEMENT = 1e-4, 1.0
ISOLATION = 1e-4

_decided: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
_ratios: "weakref.WeakKeyDictionary[nn.Module, float | None]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _head_sees(model: nn.Module, packed: Packed):
    """The LM head gets (1, K, H): the hidden states at packed.source only."""
    head = unwrap(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _, args: (packed.gather(args[0]).unsqueeze(0), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def packed_logits(model: nn.Module, packed: Packed) -> torch.Tensor:
    """(K, V) logits predicting each answer token of the packed rows."""
    with _head_sees(model, packed):
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
    return logits[0]


def packed_values(critic: nn.Module, packed: Packed) -> torch.Tensor:
    """(K,) values of a RewardModel (or its engine) at the states before each answer token;
    the value head is one output wide, so it runs on every position."""
    return packed.gather(critic(packed.input_ids, None, position_ids=packed.position_ids))


def pack_rows(seq: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, width: int | None = None) -> Packed:
    # the bins' tails are read by nothing: any id in the vocabulary will do for them
    return pack(seq, attention_mask, prompt_len, pad_token_id=0, width=width)


def pack_for(model: nn.Module, seq: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> Packed:
    """The rows packed at the bin width that costs `model` least (packing.bin_width)."""
    lengths = attention_mask.sum(1).tolist()
    return pack_rows(seq, attention_mask, prompt_len, bin_width(lengths, attention_ratio(model)))


def packed_shape_for(model: nn.Module, lengths: list[int]) -> tuple[int, int]:
    """(bins, width) of pack_for's layout of rows with these real-token counts (FLOP counts)."""
    return packed_shape(lengths, bin_width(lengths, attention_ratio(model)))


def attention_ratio(model: nn.Module) -> float | None:
    """utils.flops.attention_ratio of `model`'s shape; None where it cannot be counted (bins as
    wide as the longest row)."""
    key = unwrap(model)
    if key not in _ratios:
        try:
            _ratios[key] = flops.attention_ratio(flops.shape(key.config, key))
        except (AttributeError, ValueError):
            _ratios[key] = None
    return _ratios[key]


def packs(model: nn.Module, seq: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
          outputs: Outputs) -> bool:
    """Whether `model` takes packed forwards; measured on this batch the first time it is asked."""
    key = unwrap(model)
    if key not in _decided:
        if not dist.all_ranks(bool(attention_mask[:, prompt_len:].any())):
            return False  # no answer token to compare on (on some process): padded, decided later
        why = _why_not(model, seq, attention_mask, prompt_len, outputs)
        _decided[key] = dist.all_ranks(why is None)
        if not _decided[key] and dist.is_main():
            print(f"{_name(key)}: padded forwards ({why or 'the packed outputs differ on another process'})",
                  flush=True)
    return _decided[key]


def decision(model: nn.Module) -> bool | None:
    """The cached decision for `model` (None: not asked yet)."""
    return _decided.get(unwrap(model))


def _why_not(model, seq, attention_mask, prompt_len: int, outputs: Outputs) -> str | None:
    """None when a few rows of the batch, packed into one bin, give the padded outputs and keep
    to themselves; else the reason."""
    if not accepts(model, "position_ids"):
        return "its forward takes no position ids (ALiBi: BLOOM)"
    rows = attention_mask[:, prompt_len:].any(1).nonzero().flatten()[:CHECK_ROWS]
    seq, attention_mask = seq[rows], attention_mask[rows]
    changed = _first_row_changed(seq, attention_mask)
    # one bin, and a tail: what packed sequences must not see of each other is there
    width = int(attention_mask.sum()) + 2
    with torch.no_grad(), _eval(model):
        want = outputs(model, seq, attention_mask, prompt_len, None)
        try:
            got, moved = [outputs(model, ids, attention_mask, prompt_len,
                                  pack_rows(ids, attention_mask, prompt_len, width)) for ids in (seq, changed)]
        except Exception as err:  # noqa: BLE001 - any failure of the packed path means: do not pack
            return f"the packed forward raised {type(err).__name__}: {err}"
    answers = attention_mask[:, prompt_len:].bool()
    others = answers.clone()
    others[_first(attention_mask)] = False
    return (_gap_over(got, want, answers, _agreement(model), "packed and padded outputs differ")
            or _gap_over(got, moved, others, ISOLATION, "a packed sequence's outputs follow the one before it"))


def _first(attention_mask: torch.Tensor) -> int:
    """The row packed first into a bin: the longest (the first of them)."""
    return int(attention_mask.sum(1).argmax())


def _first_row_changed(seq: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`seq` with the first-packed row's real tokens rotated by one."""
    out, row = seq.clone(), _first(attention_mask)
    real = attention_mask[row].bool()
    out[row, real] = seq[row, real].roll(1)
    return out


def _gap_over(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor, tolerance: float, what: str) -> str | None:
    gap = float((a.float() - b.float()).abs()[where].max()) if where.any() else 0.0
    return None if gap <= tolerance else f"{what} by up to {gap:.3g} > {tolerance:g}"


def _agreement(model: nn.Module) -> float:
    """The packed-vs-padded tolerance of what the model computes in: its first parameter's
    dtype (the embedding's; LoRA's come later)."""
    return FULL_AGREEMENT if torch.finfo(next(unwrap(model).parameters()).dtype).bits >= 32 else HALF_AGREEMENT


@contextlib.contextmanager
def _eval(model: nn.Module):
    """Dropout off for the comparison (the actor is in training mode when first asked in the update)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return f"{type(model).__name__} ({getattr(config, 'model_type', '?')}, {getattr(config, '_name_or_path', '')})"
