"""Unpadded rows for Step 3's forwards: the real tokens of left-padded prompt + right-padded
answer rows, packed into a few bins (issue 21, item 3).

Rows are placed first-fit-decreasing into bins of one width: the longest row, or up to twice
that where the model's cost says fewer, fuller bins pay for their longer attention (bin_width).
Attention per token then costs at most twice what it did in a padded row (one bin holding every
token would cost T^2 under a dense mask, e.g. CPU SDPA). Each packed sequence numbers its positions from 0 and no attention mask
is passed: transformers (masking_utils.find_packed_sequence_indices) then reads where a
sequence starts from the position ids and keeps attention inside it, when the family passes
its position ids to the mask (whether it does is measured: utils/model/packed_forward.py). A
bin's unused tail holds pad ids numbered 0, 1, ... of their own: a sequence of its own that no
real token attends to, whose outputs are never read.

Pure tensor bookkeeping, no model: `pack` lays out the bins and the index maps that bring a
per-position output back to the rows' (B, A) answer layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Candidate bin widths, in longest rows. Rows longer than half the width cannot share a bin, so at
# the longest row's width alone a rollout whose lengths spread between a quarter and all of it
# keeps much of its padding as bin tails (SmolLM2, prompts 20-64 and answers 5-32 tokens: 2760
# tokens read for 2020 real, 3072 padded; 2070 at 1.5x). A wider bin pays attention over more
# keys per token, 2x at most here.
WIDTHS = (1.0, 1.25, 1.5, 2.0)


@dataclass
class Packed:
    """Bins of real tokens and where each row's tokens went.

    input_ids, position_ids: (N, W) bins; `tokens`: (T,) flat bin index (row * W + column) of
    every real token, in the rows' order; `source`: (K,) flat bin index of the position whose
    output predicts each answer token (the real token before it), `target`: (K,) flat index of
    that answer token in the (B, A) answer layout; `answers`: (B, A) shape of that layout."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    tokens: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    answers: tuple[int, int]

    @property
    def width(self) -> int:
        return self.input_ids.size(1)

    def gather(self, outputs: torch.Tensor) -> torch.Tensor:
        """(N, W, ...) per-position outputs -> (K, ...) at the positions `source` names."""
        return outputs.flatten(0, 1)[self.source]

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """(K, ...) values, one per answer token -> (B, A, ...), 0 where a row has no answer token."""
        b, a = self.answers
        out = values.new_zeros((b * a, *values.shape[1:]))
        return out.index_copy(0, self.target, values).view(b, a, *values.shape[1:])


def first_fit_decreasing(lengths: list[int], width: int) -> list[tuple[int, int]]:
    """(bin, offset) of each length: longest first (ties by index, so the layout is the same for
    the same lengths), each into the first bin with room. Bins are `width` wide."""
    free: list[int] = []
    place = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > width:
            raise ValueError(f"a row of {n} tokens does not fit a bin of {width}")
        b = next((b for b, room in enumerate(free) if room >= n), None)
        if b is None:
            b = len(free)
            free.append(width)
        place[i] = (b, width - free[b])
        free[b] -= n
    return place


def packed_shape(lengths: list[int], width: int | None = None) -> tuple[int, int]:
    """(bins, width) that `pack` lays rows of these real-token counts out in (default width: the
    longest row)."""
    width = max(max(lengths, default=0), 1) if width is None else width
    return max((b for b, _ in first_fit_decreasing(lengths, width)), default=0) + 1, width


def bin_width(lengths: list[int], attention_ratio: float | None) -> int:
    """The bin width among WIDTHS x the longest row that costs least: bins x W tokens, each
    weighing 1 + attention_ratio x W (its attention over W keys, against its weight matmuls;
    utils.flops.attention_ratio). None: the longest row."""
    longest = max(max(lengths, default=0), 1)
    if attention_ratio is None:
        return longest

    def cost(width: int) -> float:
        bins, _ = packed_shape(lengths, width)
        return bins * width * (1 + attention_ratio * width)
    return min((int(longest * k) for k in WIDTHS), key=cost)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, pad_token_id: int,
         width: int | None = None) -> Packed:
    """Pack the real tokens (attention_mask 1) of (B, L) rows whose answers start at column
    `prompt_len`. `width`: the bins' width (default: the longest row, so at most B bins)."""
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    width = max(int(lengths.max()) if width is None else width, 1)
    place = torch.tensor(first_fit_decreasing(lengths.tolist(), width), dtype=torch.long).view(-1, 2)
    n_bins = int(place[:, 0].max()) + 1 if len(place) else 1
    rank = mask.long().cumsum(1) - 1  # each real token's position in its own sequence
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: each row's tokens in order
    tokens = place[rows, 0] * width + place[rows, 1] + rank[rows, cols]
    ids = input_ids.new_full((n_bins * width,), pad_token_id).index_copy(0, tokens, input_ids[rows, cols])
    positions = _tail_positions(place, lengths, n_bins, width).index_copy(0, tokens, rank[rows, cols])
    source, target = _answer_maps(mask, rank, rows, cols, tokens, prompt_len)
    return Packed(ids.view(n_bins, width), positions.view(n_bins, width), tokens, source, target,
                  (mask.size(0), mask.size(1) - prompt_len))


def _tail_positions(place: torch.Tensor, lengths: torch.Tensor, n_bins: int, width: int) -> torch.Tensor:
    """(N * W,) positions numbering each bin from the end of its real tokens: 0, 1, ... in the
    tail (the real tokens' own positions are written over the rest)."""
    used = torch.zeros(n_bins, dtype=torch.long).index_add(0, place[:, 0], lengths.long())
    return (torch.arange(width) - used[:, None]).clamp(min=0).flatten()


def _answer_maps(mask, rank, rows, cols, tokens, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, target) of every real answer token: the bin index of the real token before it
    (its predictor), and its index in the (B, A) answer layout."""
    answer = cols >= prompt_len
    if bool((rank[rows, cols][answer] == 0).any()):
        raise ValueError("an answer token is the first real token of its row: no prompt token predicts it")
    width = mask.size(1) - prompt_len
    return tokens[answer] - 1, rows[answer] * width + cols[answer] - prompt_len
