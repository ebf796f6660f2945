"""Packed rows (utils/model/packing.py): the layout keeps every real token once, where the rows
had it."""
from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import find_packed_sequence_indices

from utils.model.forward import position_ids_from_mask
from utils.model.packing import first_fit_decreasing, pack, packed_shape

PAD = 7


def ragged(rows: int, prompt: int, answer: int, seed: int, vocab: int = 1000):
    """Step 3's layout: left-padded prompts of 1..prompt tokens, right-padded answers of
    1..answer tokens (the widest fills its columns)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(10, vocab, (rows, prompt + answer), generator=g)
    prompts = torch.randint(1, prompt + 1, (rows,), generator=g)
    answers = torch.randint(1, answer + 1, (rows,), generator=g)
    answers[0] = answer
    cols = torch.arange(prompt + answer)
    mask = ((cols >= prompt - prompts[:, None]) & (cols < prompt + answers[:, None])).long()
    return seq.masked_fill(mask == 0, PAD), mask


# ------------------------------------------------------------------ the layout


def test_first_fit_decreasing_places_the_longest_first_into_the_first_bin_with_room():
    assert first_fit_decreasing([5, 3, 2, 4, 1], 5) == [(0, 0), (2, 0), (2, 3), (1, 0), (1, 4)]
    assert packed_shape([5, 3, 2, 4, 1]) == (3, 5)
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([6], 5)


@pytest.mark.parametrize("seed", range(4))
def test_every_real_token_is_packed_once_at_its_position(seed):
    seq, mask = ragged(9, 12, 7, seed)
    packed = pack(seq, mask, 12, PAD)
    real = mask.bool()
    width = int(mask.sum(1).max())
    assert packed.input_ids.shape == (packed_shape(mask.sum(1).tolist())[0], width)
    assert packed.input_ids.size(0) <= seq.size(0)
    assert packed.tokens.unique().numel() == packed.tokens.numel() == int(mask.sum())  # each once
    flat_ids, flat_pos = packed.input_ids.flatten(), packed.position_ids.flatten()
    assert torch.equal(flat_ids[packed.tokens], seq[real])  # round trip, in the rows' order
    assert torch.equal(flat_pos[packed.tokens], position_ids_from_mask(mask)[real])
    rest = torch.ones_like(flat_ids, dtype=torch.bool).index_fill(0, packed.tokens, False)
    assert (flat_ids[rest] == PAD).all()


@pytest.mark.parametrize("seed", range(4))
def test_the_answer_maps_point_at_each_answer_token_and_its_predictor(seed):
    seq, mask = ragged(9, 12, 7, seed)
    packed = pack(seq, mask, 12, PAD)
    answers = seq[:, 12:]
    assert packed.target.numel() == int(mask[:, 12:].sum())
    ids, pos = packed.input_ids.flatten(), packed.position_ids.flatten()
    assert torch.equal(ids[packed.source + 1], answers.flatten()[packed.target])  # the next token is the answer's
    assert torch.equal(pos[packed.source] + 1, pos[packed.source + 1])  # in the same sequence
    values = torch.arange(1, packed.target.numel() + 1, dtype=torch.float)
    rows = packed.unpack(values)
    assert rows.shape == answers.shape and torch.equal(rows[mask[:, 12:].bool()], values)
    assert (rows[mask[:, 12:] == 0] == 0).all()


def test_transformers_reads_one_sequence_per_row_and_one_per_tail():
    seq, mask = ragged(9, 12, 7, 0)
    packed = pack(seq, mask, 12, PAD)
    segments = find_packed_sequence_indices(packed.position_ids)
    width, flat = packed.width, segments.flatten()
    lengths = mask.sum(1)
    start = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    for row in range(seq.size(0)):  # a row's tokens: one segment, no other row's, no tail
        mine = packed.tokens[start[row]:start[row] + lengths[row]]
        others = torch.cat([packed.tokens[:start[row]], packed.tokens[start[row] + lengths[row]:]])
        bin_ = mine[0] // width
        assert flat[mine].unique().numel() == 1
        same_bin = torch.arange(bin_ * width, (bin_ + 1) * width)
        outside = same_bin[~torch.isin(same_bin, mine)]
        assert not torch.isin(flat[outside], flat[mine]).any()
        assert not torch.isin(others, mine).any()


def test_packing_is_deterministic_and_an_answer_without_a_prompt_is_refused():
    seq, mask = ragged(9, 12, 7, 1)
    a, b = pack(seq, mask, 12, PAD), pack(seq.clone(), mask.clone(), 12, PAD)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "position_ids", "source", "target"))
    mask[2, :12] = 0
    with pytest.raises(ValueError, match="no prompt token predicts it"):
        pack(seq, mask, 12, PAD)
