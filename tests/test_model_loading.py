"""load_tokenizer / load_causal_lm options, dropout, dtypes, tokenizer comparison, errors."""
import json
import shutil

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from utils.config import ConfigError
from utils.model import (load_causal_lm, load_tokenizer, resolve_dtype, resolve_model_path,
                         set_dropout, tokenizers_match)


def test_tokenizer_padding_and_pad_fallback(tmp_path):
    tok = load_tokenizer("tiny-opt", padding_side="left")
    assert tok.padding_side == "left" and tok.pad_token == "<|pad|>"
    batch = tok(["a", "a b c d"], padding=True)["input_ids"]
    assert batch[0][0] == tok.pad_token_id and batch[1][0] != tok.pad_token_id

    # a tokenizer saved without a pad token gets eos as pad
    src = tmp_path / "nopad"
    shutil.copytree(resolve_model_path("tiny-opt"), src)
    cfg_path = src / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token")
    cfg_path.write_text(json.dumps(cfg))
    assert AutoTokenizer.from_pretrained(src).pad_token is None
    tok = load_tokenizer(str(src))
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.padding_side == "right"
    with pytest.raises(ConfigError, match="padding_side"):
        load_tokenizer("tiny-opt", padding_side="middle")


def test_model_ids_follow_tokenizer_and_resize():
    tok = load_tokenizer("tiny-llama")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|bot|>", "<|x|>"]})
    model = load_causal_lm("tiny-llama", tok, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.config.pad_token_id == tok.pad_token_id == 1
    assert model.config.eos_token_id == tok.eos_token_id == 0
    assert model.generation_config.pad_token_id == 1
    rows = model.get_input_embeddings().num_embeddings
    assert rows % 8 == 0 and len(tok) <= rows < len(tok) + 8
    assert model.get_output_embeddings().weight.shape[0] == rows
    out = model(torch.tensor([[tok.convert_tokens_to_ids("<|bot|>"), 5]])).logits
    assert out.shape == (1, 2, rows)


def _dropout_state(model):
    cfg = {k: v for k, v in vars(model.config).items()
           if ("dropout" in k or k.endswith("pdrop")) and isinstance(v, float)}
    modules = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    return cfg, modules


@pytest.mark.parametrize("family,keys", [
    ("gpt2", {"resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"}),
    ("opt", {"dropout", "attention_dropout"}),
    ("gpt_neo", {"resid_dropout", "embed_dropout", "attention_dropout", "classifier_dropout"}),
    ("llama", {"attention_dropout"}),
    ("bloom", {"hidden_dropout", "attention_dropout"}),
])
def test_dropout_setter(family, keys):
    tok = load_tokenizer(f"tiny-{family}")
    model = load_causal_lm(f"tiny-{family}", tok, dropout=0.37)
    cfg, modules = _dropout_state(model)
    assert keys <= cfg.keys() and set(cfg.values()) == {0.37}
    assert all(p == 0.37 for p in modules)
    assert model.config.layerdrop == 0.0 if family == "opt" else True  # not a dropout prob

    # the setting reaches the forward pass: train-mode outputs vary at 0.37, not at 0.0
    ids = torch.tensor([tok("some text for the dropout check")["input_ids"]])
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(ids).logits, model(ids).logits)
    set_dropout(model, 0.0)
    assert set(_dropout_state(model)[0].values()) <= {0.0}
    assert torch.equal(model(ids).logits, model(ids).logits)
    with pytest.raises(ConfigError, match="dropout"):
        set_dropout(model, 1.5)


def test_llama_attention_dropout_reaches_attention_modules():
    # Llama keeps a float copy of the probability in each attention module
    tok = load_tokenizer("tiny-llama")
    model = load_causal_lm("tiny-llama", tok, dropout=0.2)
    attn = model.model.layers[0].self_attn
    assert attn.attention_dropout == 0.2


def test_gradient_checkpointing_matches_plain_gradients():
    tok = load_tokenizer("tiny-gpt_neox")
    plain = load_causal_lm("tiny-gpt_neox", tok)
    ckpt = load_causal_lm("tiny-gpt_neox", tok, gradient_checkpointing=True)
    assert ckpt.is_activation_checkpointing and ckpt.config.use_cache is False
    ids = torch.tensor([tok("gradient checkpointing recomputes activations")["input_ids"]])
    grads = []
    for model in (plain, ckpt):
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append(model.gpt_neox.layers[0].attention.query_key_value.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_resolve_dtype():
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert resolve_dtype("fp32", "cpu") is torch.float32
    assert resolve_dtype("fp16", "cuda:0") is torch.float16
    assert resolve_dtype("fp16", torch.device("cuda", 1)) is torch.float16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(ConfigError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", "cpu")


def test_tokenizers_match():
    opt, gpt2, qwen2 = (load_tokenizer(f"tiny-{f}") for f in ("opt", "gpt2", "qwen2"))
    assert type(qwen2).__name__ != type(opt).__name__  # different class, same tokenizer
    assert tokenizers_match(opt, gpt2) and tokenizers_match(opt, qwen2)
    other = load_tokenizer("tiny-opt")
    other.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    assert not tokenizers_match(opt, other)
    swapped = load_tokenizer("tiny-opt")
    swapped.pad_token = swapped.eos_token
    assert not tokenizers_match(opt, swapped)


def test_missing_path_errors(tmp_path):
    missing = str(tmp_path / "nowhere" / "model")
    with pytest.raises(ConfigError, match=r"^model not found: .*nowhere/model \(not a local"):
        load_tokenizer(missing)
    tok = load_tokenizer("tiny-opt")
    with pytest.raises(ConfigError, match="model not found"):
        load_causal_lm(missing, tok)
    with pytest.raises(ConfigError, match="tiny-foo.*gpt_neox"):
        load_causal_lm("tiny-foo", tok)


def test_auto_dtype_follows_the_measured_bf16_speedup(tmp_path, monkeypatch):
    """auto on CPU: bf16 iff its matmuls measured >= 1.5x fp32's; measured once, then read
    back (every rank of a run gets the same answer)."""
    from utils.model import dtype_probe, resolve_dtype, resolve_dtype_name
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    timed = []
    monkeypatch.setattr(dtype_probe, "measure_bf16_speedup", lambda: timed.append(1) or 4.0)
    assert resolve_dtype_name("auto", "cpu") == "bf16" and resolve_dtype("auto", "cpu") == torch.bfloat16
    assert len(timed) == 1  # the second call read the cached ratio
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "slow"))
    monkeypatch.setattr(dtype_probe, "measure_bf16_speedup", lambda: 0.3)
    assert resolve_dtype_name("auto", "cpu") == "fp32" and resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype_name("fp32", "cpu") == "fp32"


def test_bf16_speedup_measurement_is_a_real_ratio():
    from utils.model.dtype_probe import measure_bf16_speedup
    assert 0.01 < measure_bf16_speedup(size=256, repeats=1) < 1000
