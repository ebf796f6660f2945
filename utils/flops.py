"""Matmul FLOPs of a decoder's forward, training step and generation, counted from its shapes.

Counted, at 2 FLOPs per multiply-add, every matmul the model runs:
- each layer's projections: q and o of width heads x head_dim, k and v of width
  kv_heads x head_dim (GQA/MQA), and the MLP: 3 matmuls of hidden x intermediate when gated
  (SwiGLU/GeGLU: llama, mistral, qwen2/3, gemma, phi3), 2 otherwise; OPT's project_in/out
  when word_embed_proj_dim != hidden_size (OPT-350m);
- attention's score (QK^T) and value (PV) matmuls over the full query x key square, the way
  torch.utils.flop_counter counts SDPA (a causal flash kernel skips about half of it, so for
  long sequences on such kernels this term is up to 2x what really runs);
- the head (LM head, or a critic's value head) only at the positions whose outputs are
  computed: transformers' logits_to_keep (utils/model/forward.py lm_logits), or the answer
  positions of packed rows (utils/model/packed_forward.py).
Not counted: norms, activations, softmax, rotary embeddings, embedding lookups (no matmuls),
LoRA adapters (rank r: 2r(in + out) per adapted matrix and token, small beside the base).

Training = forward + backward. The backward of a weight matmul costs 2 forwards (input grad and
weight grad), 1 for a frozen weight (`frozen`: LoRA's base, whose weight grads are skipped).
Attention's backward costs 2.5 forwards under SDPA/flash kernels (they recompute the scores,
as flop_counter counts them) and 2 under eager attention. Gradient checkpointing recomputes
the layers' forward once more, less what it need not (Shape.recomputed).

Generation with a KV cache: a prefill of the prompt (logits at its last position only, as HF
`generate` asks), then one step per further token: projections, MLP and head for that token
and attention over the context so far (padded prompt included).

Families are read from the HF config (FAMILIES); for any other family `shape` counts the
model's nn.Linear/Conv1D layers when given the model, else raises: never a silent guess.

This replaces the DeepSpeed-Chat paper's convention (after Megatron-LM): 24 B s l h^2
(1 + s/(6h) + V/(16 l h)) per forward, which assumes multi-head attention, a non-gated 4h MLP
and logits at every position. For SmolLM2-135M (GQA 9/3 heads, SwiGLU 1536 = 8h/3, which
costs what a 4h MLP does) it counts the layers' matmuls 1.125x, a 512-token forward 1.04x
with all logits and 1.26x with logits for the last 33 positions; the ~1.65x quoted in issue 21
appears only if attention is left out, as FlopCounterMode on CPU does by default (it has no
formula for CPU SDPA): 1.66x at 1024 tokens, 1 logit (tests/test_flops.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

from torch import nn

GATED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")


def _four_h(config) -> int:
    return 4 * config.hidden_size


# model_type: (matmuls of hidden x width in one layer's MLP, that width from the config)
FAMILIES = {
    **{family: (3, lambda c: c.intermediate_size) for family in GATED},
    "gpt_neox": (2, lambda c: c.intermediate_size),
    "phi": (2, lambda c: c.intermediate_size),
    "opt": (2, lambda c: c.ffn_dim),
    "gpt2": (2, lambda c: c.n_inner or _four_h(c)),
    "bloom": (2, _four_h),
    "falcon": (2, lambda c: getattr(c, "ffn_hidden_size", None) or _four_h(c)),
}
EAGER_ONLY = ("bloom",)  # ALiBi through baddbmm: no SDPA path
SDPA_BACKWARD = 2.5  # dQ, dK, dV, dP and the recomputed scores: 5 matmuls for the forward's 2
EAGER_BACKWARD = 2.0


@dataclass(frozen=True)
class Shape:
    """What a decoder multiplies per token."""
    layers: int
    attention_width: int  # heads x head_dim: the width of the score and value matmuls
    weights: int          # weight elements a token meets below the head (all layers, OPT's projections)
    head_in: int
    head_out: int         # the vocabulary, or 1 for a value head
    # of `weights`, those gradient checkpointing recomputes: the layers' (not OPT's projections),
    # but for each layer's MLP output projection, whose output no backward needs (torch's
    # non-reentrant checkpoint stops once the saved tensors are back) unless a norm after it
    # does (post-LN OPT) or dropout follows it (Step 3 turns dropout off)
    recomputed: int
    sdpa: bool = True     # attention's backward recomputes the scores

    def value_head(self) -> "Shape":
        """The same backbone under a scalar head (reward model, critic)."""
        return replace(self, head_out=1)


class Parts(NamedTuple):
    """FLOPs of one forward, by the rule its backward follows."""
    weights: float
    attention: float
    head: float


def shape(config, model: nn.Module | None = None) -> Shape:
    """The decoder's Shape from its HF config; for a family not in FAMILIES, from `model`'s
    linear layers (ValueError without one)."""
    if config.model_type in FAMILIES:
        return _config_shape(config)
    if model is None:
        raise ValueError(f"no FLOP count for model_type {config.model_type!r} from its config alone "
                         f"(known: {', '.join(sorted(FAMILIES))}); pass the model to count its linear layers")
    return module_shape(model, config)


def _attention(config) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if config.model_type == "falcon":  # the modeling code's own rule
        kv = config.num_kv_heads if config.new_decoder_architecture else 1 if config.multi_query else heads
    else:
        kv = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv, head_dim


def _config_shape(config) -> Shape:
    h, family = config.hidden_size, config.model_type
    heads, kv, head_dim = _attention(config)
    matmuls, width = FAMILIES[family]
    mlp_out = h * width(config)
    layer = 2 * h * heads * head_dim + 2 * h * kv * head_dim + matmuls * mlp_out
    head_in = getattr(config, "word_embed_proj_dim", None) or h  # OPT projects to it and back
    projections = 2 * h * head_in if head_in != h else 0
    layers = config.num_hidden_layers
    post_norm = getattr(config, "do_layer_norm_before", True) is False
    recomputed = layers * (layer if post_norm else layer - mlp_out)
    return Shape(layers, heads * head_dim, layers * layer + projections, head_in, config.vocab_size, recomputed,
                 _uses_sdpa(config))


def _uses_sdpa(config) -> bool:
    return config.model_type not in EAGER_ONLY and getattr(config, "_attn_implementation", None) != "eager"


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear layer: nn.Linear or transformers' Conv1D (GPT-2)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return module.nx, module.nf
    return None


def _head(model: nn.Module) -> nn.Module:
    """The output head: the LM head, or a value head named `score`."""
    scores = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "score"]
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = scores or ([lm_head] if lm_head is not None else [])
    if len(heads) != 1 or _in_out(heads[0]) is None:
        raise ValueError(f"cannot tell the output head of {type(model).__name__} to count its FLOPs")
    return heads[0]


def module_shape(model: nn.Module, config) -> Shape:
    """Shape from the model's linear layers (shapes, not weights: ZeRO-3 leaves those empty);
    attention's width and depth still come from the config's generic fields. Checkpointing is
    taken to recompute every layer (up to one matmul per layer too many)."""
    head = _head(model)
    linears = filter(None, (_in_out(m) for m in model.modules() if m is not head))
    weights = sum(i * o for i, o in linears)
    heads, _, head_dim = _attention(config)
    head_in, head_out = _in_out(head)
    return Shape(config.num_hidden_layers, heads * head_dim, weights, head_in, head_out, weights, _uses_sdpa(config))


def attention_flops(s: Shape, queries: int, context: float) -> float:
    """Score and value matmuls of `queries` query tokens, each over `context` keys."""
    return 4.0 * s.layers * s.attention_width * queries * context


def attention_ratio(s: Shape) -> float:
    """Attention's FLOPs for one query over one key, per FLOP of one token's weight matmuls: a
    token over W keys costs (1 + W x this) times its weights (packing's bin width choice)."""
    return attention_flops(s, 1, 1) / (2.0 * s.weights)


def forward_parts(s: Shape, batch: int, seq_len: int, logits: int | None = None,
                  head_tokens: int | None = None) -> Parts:
    """One forward over batch x seq_len tokens; the head on the last `logits` positions of each
    row (all when None), or on `head_tokens` positions in all (packed rows: utils/model/packing.py
    picks them row by row)."""
    kept = seq_len if logits is None else min(logits, seq_len)
    head_tokens = batch * kept if head_tokens is None else head_tokens
    return Parts(2.0 * batch * seq_len * s.weights, attention_flops(s, batch * seq_len, seq_len),
                 2.0 * head_tokens * s.head_in * s.head_out)


def forward_flops(s: Shape, batch: int, seq_len: int, logits: int | None = None,
                  head_tokens: int | None = None) -> float:
    return sum(forward_parts(s, batch, seq_len, logits, head_tokens))


def training_flops(s: Shape, batch: int, seq_len: int, logits: int | None = None, checkpointing: bool = False,
                   frozen: bool = False, head_tokens: int | None = None) -> float:
    """Forward and backward; `frozen`: the weights get no gradient (a LoRA base), only their
    input gradients are computed."""
    f = forward_parts(s, batch, seq_len, logits, head_tokens)
    weight_backward = 1.0 if frozen else 2.0
    attention_backward = SDPA_BACKWARD if s.sdpa else EAGER_BACKWARD
    total = (1 + weight_backward) * (f.weights + f.head) + (1 + attention_backward) * f.attention
    if checkpointing:
        total += f.weights * s.recomputed / s.weights + f.attention
    return total


def generation_flops(s: Shape, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Prefill of the (padded) prompt, which gives the first token, then new_tokens - 1 decode
    steps, step t attending over prompt_len + t keys."""
    if new_tokens <= 0:
        return 0.0
    steps = new_tokens - 1
    keys = steps * prompt_len + steps * (steps + 1) / 2  # summed over the steps
    decode = 2.0 * batch * steps * (s.weights + s.head_in * s.head_out) + attention_flops(s, batch, keys)
    return forward_flops(s, batch, prompt_len, logits=1) + decode
