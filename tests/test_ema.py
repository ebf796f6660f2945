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


def test_an_fp32_average_of_a_bf16_actor_moves_where_a_bf16_one_stands_still():
    """(1 - 0.992) x (actor - ema) is below a bf16 weight's spacing: kept in bf16, almost no
    entry of the average ever changes; kept in fp32 (as the EMA engine is) it follows the
    fp32 definition."""
    torch.manual_seed(0)
    actor = nn.Linear(64, 64).bfloat16()
    start = actor.weight.detach().clone()
    in_bf16, in_fp32 = copy.deepcopy(actor), copy.deepcopy(actor).float()
    by_hand = start.float()
    for _ in range(200):
        with torch.no_grad():
            actor.weight.add_(1e-3 * torch.randn_like(actor.weight))
        update_ema(actor, in_bf16, decay=0.992)
        update_ema(actor, in_fp32, decay=0.992)
        by_hand = 0.992 * by_hand + 0.008 * actor.weight.detach().float()
    frozen = (in_bf16.weight == start).float().mean().item()
    assert frozen > 0.5  # the defect: most bf16 entries never moved
    assert (in_fp32.weight == start.float()).float().mean().item() < 0.01
    torch.testing.assert_close(in_fp32.weight.detach(), by_hand, atol=1e-6, rtol=1e-5)


def test_the_ema_is_placed_like_the_actors_parameters():
    """With --offload under ZeRO-3 the actor's parameter partitions live in CPU memory: the
    EMA's do too (and never otherwise), so an update never mixes devices."""
    from utils.ema import ema_placement
    assert ema_placement(3, offload=True) == (3, True)
    assert ema_placement(3, offload=False) == (3, False)
    for stage in (0, 1, 2):  # offload there moves optimizer state only: parameters stay put
        assert ema_placement(stage, offload=True) == (stage, False)


def layer_scaling(actor) -> float:
    return actor.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]


def test_the_adapter_ema_averages_the_trainable_parameters_alone():
    """LoRA with --only_optimize_lora: one fp32 average per adapter factor, none of the base;
    swapped into the model and back exactly; a checkpoint of other parameters is refused."""
    from utils.ema import TrainableEMA
    torch.manual_seed(0)
    actor = apply_lora(tiny(), lora_dim=4, only_optimize_lora=True)
    ema = TrainableEMA(actor)
    lora = {n: p for n, p in actor.named_parameters() if ".lora_" in n}
    assert set(ema.average) == set(lora) and ema.numel() == sum(p.numel() for p in lora.values())
    hand = {n: p.detach().clone() for n, p in lora.items()}
    for _ in range(3):
        with torch.no_grad():
            for p in lora.values():
                p.add_(0.1 * torch.randn_like(p))
        ema.update(0.8)
        hand = {n: 0.8 * hand[n] + 0.2 * lora[n].detach() for n in hand}
    for n in hand:
        torch.testing.assert_close(ema.average[n], hand[n], atol=1e-7, rtol=1e-6)
    own = {n: p.detach().clone() for n, p in lora.items()}
    with ema.swapped_in() as model:
        assert model is actor and all(torch.equal(lora[n], ema.average[n]) for n in lora)
    assert all(torch.equal(lora[n], own[n]) for n in lora)
    with pytest.raises(ValueError, match="names differ"):
        ema.load_state_dict({"model.embed_tokens.weight": torch.zeros(1)})
