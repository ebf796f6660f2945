"""update_ema on whole (non-ZeRO-3) parameters: plain models and LoRA folded into the average."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from utils.ema import update_ema
from utils.model import apply_lora, load_causal_lm, load_tokenizer, resolve_model_path


def tiny():
    path = resolve_model_path("tiny-llama")
    return load_causal_lm(path, load_tokenizer(path))


def test_ema_moves_trained_parameters_by_one_minus_decay():
    actor, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    update_ema(actor, ema, decay=0.75)
    for name, param in ema.named_parameters():
        want = 0.75 * before[name] + 0.25 * dict(actor.named_parameters())[name]
        torch.testing.assert_close(param, want)


def test_frozen_parameters_are_skipped():
    actor, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    actor.weight.requires_grad_(False)
    before = ema.weight.clone()
    update_ema(actor, ema, decay=0.5)
    torch.testing.assert_close(ema.weight, before)


@pytest.mark.parametrize("lora_alpha", [0, 1])  # alpha = rank (scale 1), DeepSpeed-Chat's 1 / rank
def test_lora_is_folded_into_the_average(lora_alpha):
    base = tiny()
    ema = copy.deepcopy(base)
    actor = apply_lora(base, lora_dim=4, lora_alpha=lora_alpha, only_optimize_lora=True)
    assert layer_scaling(actor) == (0.25 if lora_alpha == 1 else 1.0)
    for name, param in actor.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # peft starts B at 0: make the delta non-zero
    q_key = "model.layers.0.self_attn.q_proj.weight"
    layer = actor.base_model.model.model.layers[0].self_attn.q_proj
    fused = layer.base_layer.weight + layer_scaling(actor) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    start = dict(ema.named_parameters())[q_key].detach().clone()
    update_ema(actor, ema, decay=0.9)
    torch.testing.assert_close(dict(ema.named_parameters())[q_key], 0.9 * start + 0.1 * fused.detach())
    # an un-wrapped frozen weight (the embeddings) is untouched
    torch.testing.assert_close(ema.model.embed_tokens.weight, actor.base_model.model.model.embed_tokens.weight)


def layer_scaling(actor) -> float:
    return actor.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
