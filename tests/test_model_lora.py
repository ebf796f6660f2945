"""LoRA through peft: targets, freezing, scaling, and the pure state-dict merge used for export."""
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from utils.config import ConfigError
from utils.model import (TINY_FAMILIES, apply_lora, load_causal_lm, load_tokenizer,
                         lora_fan_in_fan_out, lora_scaling, lora_target_modules,
                         merge_lora_state_dict)


def _model(family):
    return load_causal_lm(f"tiny-{family}", load_tokenizer(f"tiny-{family}"))


def _randomize_lora_b(model):
    # peft initializes B to zero (merge would be a no-op); make the delta real
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_default_targets_are_block_projections(family):
    model = _model(family)
    targets = lora_target_modules(model)
    assert targets and all(".lm_head" not in t and not t.startswith("lm_head") for t in targets)
    layers = model.config.num_hidden_layers
    assert len(targets) % layers == 0 and len(targets) // layers >= 4  # attention + MLP
    # every Linear/Conv1D except the LM head is a target
    head = model.get_output_embeddings()
    linear = [n for n, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head]
    assert sorted(linear) == sorted(targets)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_equals_peft_merge_and_unload(family):
    base_keys = set(_model(family).state_dict())
    peft_model = apply_lora(_model(family), lora_dim=4, lora_alpha=8)
    _randomize_lora_b(peft_model)
    assert lora_scaling(peft_model) == 2.0
    assert lora_fan_in_fan_out(peft_model) == (family == "gpt2")
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    assert any(".base_layer.weight" in k for k in state) and any(".lora_A." in k for k in state)

    merged = merge_lora_state_dict(state, lora_scaling(peft_model),
                                   fan_in_fan_out=lora_fan_in_fan_out(peft_model))
    inferred = merge_lora_state_dict(state, lora_scaling(peft_model))  # orientation from shapes
    reference = peft_model.merge_and_unload().state_dict()
    assert set(merged) == set(inferred) == set(reference) == base_keys
    for key in reference:
        assert torch.allclose(merged[key], reference[key], atol=1e-6), key
        assert torch.equal(inferred[key], merged[key]), key
    # the merge changed the targeted weights, and did not touch its input
    base_of = {k: "base_model.model." + k.removesuffix(".weight") + ".base_layer.weight"
               for k in merged}
    deltas = [k for k, b in base_of.items() if b in state and not torch.equal(merged[k], state[b])]
    assert len(deltas) == len(lora_target_modules(_model(family)))


def test_merged_state_dict_loads_into_base_model_and_matches_outputs():
    tok = load_tokenizer("tiny-gpt2")
    peft_model = apply_lora(load_causal_lm("tiny-gpt2", tok), lora_dim=8)
    _randomize_lora_b(peft_model)
    ids = torch.tensor([tok("merged weights give the same logits")["input_ids"]])
    with torch.no_grad():
        expected = peft_model(ids).logits
    merged = merge_lora_state_dict(peft_model.state_dict(), lora_scaling(peft_model))
    plain = load_causal_lm("tiny-gpt2", tok)
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, expected, atol=1e-5)


def test_merge_is_pure_and_checks_orientation():
    weight = torch.randn(6, 6)
    lora_a, lora_b = torch.randn(2, 6), torch.randn(6, 2)
    state = {"base_model.model.layer.0.proj.base_layer.weight": weight,
             "base_model.model.layer.0.proj.base_layer.bias": torch.zeros(6),
             "base_model.model.layer.0.proj.lora_A.default.weight": lora_a,
             "base_model.model.layer.0.proj.lora_B.default.weight": lora_b,
             "base_model.model.head.weight": torch.ones(3, 6)}
    before = {k: v.clone() for k, v in state.items()}
    merged = merge_lora_state_dict(state, 0.5, fan_in_fan_out=False)
    assert set(merged) == {"layer.0.proj.weight", "layer.0.proj.bias", "head.weight"}
    assert torch.allclose(merged["layer.0.proj.weight"], weight + 0.5 * lora_b @ lora_a)
    transposed = merge_lora_state_dict(state, 0.5, fan_in_fan_out=True)
    assert torch.allclose(transposed["layer.0.proj.weight"], weight + 0.5 * (lora_b @ lora_a).T)
    assert all(torch.equal(state[k], before[k]) for k in state)
    # square weights alone cannot show the orientation; a non-square one can
    with pytest.raises(ValueError, match="cannot tell"):
        merge_lora_state_dict(state, 0.5)
    conv = {"base_model.model.c.base_layer.weight": torch.zeros(6, 9),  # Conv1D: (in, out)
            "base_model.model.c.lora_A.default.weight": torch.randn(2, 6),
            "base_model.model.c.lora_B.default.weight": torch.randn(9, 2)}
    both = merge_lora_state_dict({**state, **conv}, 0.5)
    assert torch.allclose(both["layer.0.proj.weight"], transposed["layer.0.proj.weight"])
    assert both["c.weight"].shape == (6, 9)
    bad = dict(state, **{"base_model.model.layer.0.proj.lora_B.default.weight": torch.randn(4, 2)})
    with pytest.raises(ValueError, match="does not fit"):
        merge_lora_state_dict(bad, 1.0, fan_in_fan_out=False)
    # nothing to merge: prefixes dropped, values untouched
    plain = merge_lora_state_dict({"base_model.model.w": torch.ones(2)}, 1.0)
    assert list(plain) == ["w"] and torch.equal(plain["w"], torch.ones(2))


@pytest.mark.parametrize("only_lora", [True, False])
def test_only_optimize_lora_freezes_base(only_lora):
    peft_model = apply_lora(_model("opt"), lora_dim=4, only_optimize_lora=only_lora)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    lora = {n for n, _ in peft_model.named_parameters() if ".lora_" in n}
    assert lora and lora <= trainable
    if only_lora:
        assert trainable == lora
    else:
        assert trainable == {n for n, _ in peft_model.named_parameters()}
    # a step moves only what is trainable
    ids = torch.arange(2, 20).unsqueeze(0)
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable and any(".base_layer." in n for n in with_grad) != only_lora


def test_lora_module_name_filter_and_errors():
    model = _model("llama")
    mlp = lora_target_modules(model, "mlp")
    assert mlp and all(".mlp." in t for t in mlp)
    assert len(mlp) == 3 * model.config.num_hidden_layers  # gate, up, down
    peft_model = apply_lora(model, lora_dim=2, lora_module_name="self_attn", lora_alpha=1)
    assert lora_scaling(peft_model) == 0.5
    wrapped = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert wrapped and all("self_attn" in n for n in wrapped)
    with pytest.raises(ConfigError, match="matches no"):
        apply_lora(_model("llama"), lora_dim=2, lora_module_name="no_such_layer")
    with pytest.raises(ConfigError, match="lora_dim"):
        apply_lora(_model("llama"), lora_dim=0)


def test_lora_with_gradient_checkpointing_trains():
    tok = load_tokenizer("tiny-llama")
    model = load_causal_lm("tiny-llama", tok, gradient_checkpointing=True)
    peft_model = apply_lora(model, lora_dim=4, only_optimize_lora=True)
    _randomize_lora_b(peft_model)
    peft_model.train()
    ids = torch.tensor([tok("checkpointed lora")["input_ids"]])
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if ".lora_A." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
