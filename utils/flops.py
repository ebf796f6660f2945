"""FLOP counts the way DeepSpeed-Chat's paper (after Megatron-LM) counts them, for TFLOPs figures.

A forward pass of a decoder with l layers, hidden size h and vocabulary V over B sequences of s
tokens costs 24 * B * s * l * h^2 * (1 + s / (6h) + V / (16 l h)); training costs 3 forwards
(4 with activation checkpointing). Generating one token costs about 2 * params FLOPs per
sequence plus the attention over the KV cache (4 * l * h * context).
The formula assumes multi-head attention and a 4h MLP; for other shapes (GQA, SwiGLU) it is
the paper's convention, not an exact count, which keeps figures comparable with the paper.
"""
from __future__ import annotations


def shape(config) -> tuple[int, int, int]:
    """(layers, hidden, vocab) from an HF config of any family."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    return int(layers), int(hidden), int(config.vocab_size)


def forward_flops(config, batch: int, seq_len: int) -> float:
    layers, h, vocab = shape(config)
    return 24.0 * batch * seq_len * layers * h * h * (1 + seq_len / (6 * h) + vocab / (16 * layers * h))


def training_flops(config, batch: int, seq_len: int, checkpointing: bool = False) -> float:
    return (4 if checkpointing else 3) * forward_flops(config, batch, seq_len)


def generation_flops(config, num_params: int, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Prefill of the prompt plus new_tokens decode steps over a growing cache."""
    layers, h, _ = shape(config)
    prefill = forward_flops(config, batch, prompt_len)
    mean_context = prompt_len + (new_tokens + 1) / 2
    decode = batch * new_tokens * (2.0 * num_params + 4.0 * layers * h * mean_context)
    return prefill + decode
