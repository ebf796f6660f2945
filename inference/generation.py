"""KV-cache generation on a plain HF causal LM, as the hybrid engine runs it.

Generation is Hugging Face `generate` on the inference copy, with a GenerationConfig made from
scratch (nothing inherited from the checkpoint's generation_config: SmolLM2's, for one, would
add its own sampling defaults). Against a hand-written decode loop over a DynamicCache it gives
the same tokens at the same speed on SmolLM2-135M (HF's per-step overhead shows only on models of
a few million parameters; docs/2026-11-23-hybrid-engine.md), and it keeps every family's
position-id and cache quirks right, so it stays.
"""
from __future__ import annotations

import contextlib

import torch

from utils.rl_math import answer_mask


def generation_config(*, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int,
                      top_p: float, pad_token_id: int, eos_token_id):
    """A complete GenerationConfig: every field the sampler reads is set here."""
    from transformers import GenerationConfig
    sampling = dict(do_sample=True, temperature=float(temperature), top_k=int(top_k),
                    top_p=float(top_p)) if do_sample else dict(do_sample=False)
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1,
                            use_cache=True, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                            bos_token_id=None, repetition_penalty=1.0, **sampling)


def check_sampling(do_sample: bool, temperature: float, top_k: int, top_p: float,
                   max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")


def pad_to_width(tokens: torch.Tensor, width: int, pad_token_id: int) -> torch.Tensor:
    """Right-pad (B, T) ids to (B, width): `generate` stops early once every row has ended."""
    if tokens.shape[1] >= width:
        return tokens[:, :width]
    pad = tokens.new_full((tokens.shape[0], width - tokens.shape[1]), pad_token_id)
    return torch.cat([tokens, pad], dim=1)


def answer_lengths(answers: torch.Tensor, eos_token_id) -> torch.Tensor:
    """(B,) tokens each row really generated: up to and including its first eos (all of them
    without an eos id, as generate then never stops early)."""
    if eos_token_id is None:
        return torch.full((answers.shape[0],), answers.shape[1], device=answers.device)
    # the one first-eos rule of the toolkit; its pad id is only read when there is no eos id
    return answer_mask(answers, eos_token_id, pad_token_id=-1).sum(dim=1)


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed for one generate() call, from `generator` (or torch's global RNG)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


@contextlib.contextmanager
def seeded_rng(seed: int | None, device: torch.device):
    """Run with torch's RNG seeded to `seed`, then put the caller's RNG state back.

    HF `generate` samples from the global RNG; a fixed seed here makes sampling reproducible
    from a torch.Generator, and identical on every rank of a tensor-parallel group (their
    logits are identical after the all-reduce, so identical RNG streams pick the same tokens).
    None leaves the RNG alone."""
    if seed is None:
        yield
        return
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        yield
