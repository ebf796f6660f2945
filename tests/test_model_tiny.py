"""Built-in tiny models: build, shape, train step, generation, save/reload, caching, determinism.

tests/conftest.py points RLHFKIT_CACHE at a per-session folder, so each model is built once
per session and shared with the other test files; tests that need a fresh cache make one.
"""
import json
import multiprocessing
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from utils.config import ConfigError, cache_dir
from utils.data.bundled import tokenizer_training_text
from utils.model import (BUILTIN_MODELS, TINY_FAMILIES, load_causal_lm, load_tokenizer,
                         resolve_model_path, tokenizers_match)
from utils.model.cache import STAMP, build_once, read_stamp
from utils.model.loading import PROBE
from utils.model.tiny import EOT, PAD, TINY_VERSION, tokenizer_path


@pytest.fixture(scope="session")
def trained_tokenizer():
    return PreTrainedTokenizerFast.from_pretrained(tokenizer_path())


@pytest.fixture(scope="session")
def sample_texts():
    texts = list(tokenizer_training_text())
    return [t for t in texts[:: max(1, len(texts) // 20)] if t.strip()][:20]


def test_user_cache_untouched():
    assert cache_dir() != (os.path.expanduser("~/.cache/rlhfkit"))


def test_builtin_names():
    assert set(BUILTIN_MODELS) == {f"tiny-{f}" for f in TINY_FAMILIES} | {"smollm2-135m"}
    assert len(TINY_FAMILIES) == 9


def test_tokenizer(trained_tokenizer, sample_texts):
    tok = trained_tokenizer
    assert 1000 <= len(tok) <= 8192
    assert tok.eos_token == tok.bos_token == EOT and tok.pad_token == PAD
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.convert_tokens_to_ids([EOT, PAD]) == [0, 1]
    # byte-level: lossless on the task text and on anything else
    for text in sample_texts + [PROBE]:
        assert tok.decode(tok(text)["input_ids"]) == text
    # trained on the task: common text compresses well below one token per character
    chars = sum(len(t) for t in sample_texts)
    tokens = sum(len(tok(t)["input_ids"]) for t in sample_texts)
    assert tokens < chars / 2.5
    assert tok(EOT)["input_ids"] == [0]  # special token never split
    assert tok("2024")["input_ids"] == [tok.convert_tokens_to_ids(d) for d in "2024"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_family(family, trained_tokenizer, sample_texts, tmp_path):
    name = f"tiny-{family}"
    path = resolve_model_path(name)
    config = json.loads(open(os.path.join(path, "config.json")).read())
    assert config["model_type"] == family and "quantization_config" not in config
    assert os.path.exists(os.path.join(path, "model.safetensors"))

    # AutoTokenizer on the directory gives exactly the trained tokenizer's ids (whatever class)
    auto_tok = AutoTokenizer.from_pretrained(path)
    for text in sample_texts + [PROBE]:
        assert auto_tok(text)["input_ids"] == trained_tokenizer(text)["input_ids"]
    assert tokenizers_match(auto_tok, trained_tokenizer)

    tok = load_tokenizer(name)
    model = load_causal_lm(name, tok)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n_params < 10_000_000
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.config.max_position_embeddings >= 1024 if hasattr(
        model.config, "max_position_embeddings") else family == "bloom"
    assert model.config.num_hidden_layers == 4 and model.config.num_attention_heads % 2 == 0

    _check_train_step(model, tok, sample_texts)
    _check_greedy_generate(model, tok)
    _check_reload(model, tok, tmp_path, sample_texts[0])


def _check_train_step(model, tok, texts):
    model.train()
    batch = tok(texts[:2], return_tensors="pt", padding=True, truncation=True, max_length=64)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    # random init: loss near log(vocab)
    assert abs(loss.item() - torch.log(torch.tensor(float(len(tok)))).item()) < 1.5
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    assert sum(g.abs().sum().item() for g in grads.values()) > 0
    model.zero_grad()


def _check_greedy_generate(model, tok):
    model.eval()
    prompt = tok("The answer is", return_tensors="pt")["input_ids"]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert out.shape == (1, prompt.shape[1] + 6)
    # greedy with the KV cache == argmax of full forward passes without it
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = model(ids, use_cache=False).logits[:, -1]
            nxt[:, tok.eos_token_id] = -float("inf")  # as min_new_tokens does
            ids = torch.cat([ids, nxt.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def _check_reload(model, tok, out_dir, text):
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    tok2 = AutoTokenizer.from_pretrained(out_dir)
    model2 = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ids = tok(text, return_tensors="pt")["input_ids"][:, :32]
    assert torch.equal(tok2(text, return_tensors="pt")["input_ids"][:, :32], ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)


def test_cached_not_rebuilt():
    path = resolve_model_path("tiny-gpt2")
    tok_file = tokenizer_path() / "tokenizer.json"
    weights = os.path.join(path, "model.safetensors")
    before = (os.stat(tok_file).st_mtime_ns, os.stat(weights).st_mtime_ns)
    assert resolve_model_path("tiny-gpt2") == path
    assert load_tokenizer("tiny-gpt2") is not None
    assert (os.stat(tok_file).st_mtime_ns, os.stat(weights).st_mtime_ns) == before


def test_seeded_init_identical_across_builds(tmp_path, monkeypatch):
    built = []
    for run in ("a", "b"):
        monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / run))
        path = resolve_model_path("tiny-llama")
        assert path.startswith(str(tmp_path / run))
        built.append((load_file(os.path.join(path, "model.safetensors")),
                      open(os.path.join(path, "tokenizer.json")).read()))
    (w_a, tok_a), (w_b, tok_b) = built
    assert tok_a == tok_b
    assert w_a.keys() == w_b.keys()
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    # different families get different seeds, so the shared-shape embedding differs
    other = load_file(os.path.join(resolve_model_path("tiny-qwen2"), "model.safetensors"))
    key = "model.embed_tokens.weight"
    assert other[key].shape == w_a[key].shape and not torch.equal(other[key], w_a[key])


def test_stale_build_is_replaced(tmp_path):
    calls = []

    def build(version):
        def run(tmp):
            calls.append(version)
            (tmp / "data.txt").write_text(version)
        return run

    target = tmp_path / "thing"
    build_once(target, {"v": 1}, build("one"))
    build_once(target, {"v": 1}, build("again"))
    assert calls == ["one"]
    build_once(target, {"v": 2}, build("two"))
    assert calls == ["one", "two"] and (target / "data.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing", "thing.lock"]


def _race(target, counter, barrier):
    import time
    from pathlib import Path

    def build(tmp):
        with open(counter, "a") as f:
            f.write("x")
        time.sleep(0.3)
        (tmp / "done").write_text("ok")

    barrier.wait()
    build_once(Path(target), {"v": 1}, build)


def test_concurrent_builds_run_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    counter = tmp_path / "count"
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "m"), str(counter), barrier))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text() == "x"
    assert (tmp_path / "m" / "done").read_text() == "ok"


# Rank 1 of a 2-process group builds tiny-llama while rank 0 waits, as `deepspeed --num_gpus 2`
# ranks do when they load a built-in model after init_distributed on a cold cache.
RANK_BUILD = """
import torch.distributed as dist
dist.init_process_group("gloo")
from utils.model import load_causal_lm, load_tokenizer, resolve_model_path
if dist.get_rank() == 1:
    resolve_model_path("tiny-llama")
dist.barrier()
model = load_causal_lm("tiny-llama", load_tokenizer("tiny-llama"))
print("LOADED", type(model).__name__, flush=True)
dist.destroy_process_group()
"""


def _cache_with_tokenizer(root):
    """A fresh RLHFKIT_CACHE holding only the session's tiny tokenizer (training it again is slow)."""
    shutil.copytree(tokenizer_path(), root / "tokenizers" / "tiny-bpe")
    return root


@pytest.mark.slow
def test_a_rank_other_than_0_builds_a_complete_model(tmp_path):
    """transformers' save_pretrained writes no config or weights on a rank other than 0 once
    torch.distributed is up; a cold-cache build that rank 1 won left a stamped folder holding
    only the tokenizer, and every rank then failed to load the model (no model_type)."""
    from tests.helpers import ROOT, describe
    from utils.cli import free_port
    cache = _cache_with_tokenizer(tmp_path / "cache")
    env = {**os.environ, "RLHFKIT_CACHE": str(cache), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_BUILD], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(describe(p, *o) for p, o in zip(procs, outs))
    assert all("LOADED LlamaForCausalLM" in out for out, _ in outs)
    built = cache / "models" / "tiny-llama"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in built.iterdir()}
    plain = load_file(os.path.join(resolve_model_path("tiny-llama"), "model.safetensors"))
    mine = load_file(built / "model.safetensors")
    assert mine.keys() == plain.keys() and all(torch.equal(mine[k], plain[k]) for k in plain)


def test_a_build_missing_a_required_file_is_not_cached(tmp_path):
    target = tmp_path / "m"
    with pytest.raises(RuntimeError, match="wrote no config.json"):
        build_once(target, {"v": 1}, lambda tmp: (tmp / "tokenizer.json").write_text("{}"),
                   required=("config.json", "tokenizer.json"))
    assert not target.exists()
    build_once(target, {"v": 1}, lambda tmp: (tmp / "config.json").write_text("{}"), required=("config.json",))
    assert (target / "config.json").is_file()


def test_a_stamped_model_folder_without_its_config_and_weights_is_rebuilt(tmp_path, monkeypatch):
    """A cache left by the rank-1 build above (stamp and tokenizer, no config or weights) is
    rebuilt on the next use instead of failing every run."""
    cache = _cache_with_tokenizer(tmp_path / "cache")
    monkeypatch.setenv("RLHFKIT_CACHE", str(cache))
    broken = cache / "models" / "tiny-llama"
    broken.mkdir(parents=True)
    shutil.copy(tokenizer_path() / "tokenizer.json", broken)
    shutil.copy(tokenizer_path() / "tokenizer_config.json", broken)
    (broken / STAMP).write_text(json.dumps({"kind": "tiny-llama", "version": TINY_VERSION,
                                            "tokenizer": read_stamp(tokenizer_path())}))
    assert resolve_model_path("tiny-llama") == str(broken)
    assert (broken / "config.json").is_file() and (broken / "model.safetensors").is_file()
    assert type(load_causal_lm("tiny-llama", load_tokenizer("tiny-llama"))).__name__ == "LlamaForCausalLM"


def test_sized_tiny_names():
    """tiny-<family>-h<N>: hidden N, MLP 4N, 2 layers (sizes either side of ZeRO-3's
    persistence threshold); other sizes are refused by name."""
    from transformers import AutoConfig

    from utils.model.tiny import parse_tiny_name
    assert parse_tiny_name("tiny-gpt_neox-h64") == ("gpt_neox", 64)
    assert parse_tiny_name("tiny-llama") == ("llama", 128)
    assert parse_tiny_name("tiny-llama-h65") is None and parse_tiny_name("tiny-llama-h4096") is None
    config = AutoConfig.from_pretrained(resolve_model_path("tiny-qwen2-h64"))
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 256, 2)
    with pytest.raises(ConfigError, match="unknown built-in model tiny-llama-h65"):
        resolve_model_path("tiny-llama-h65")


def test_resolve_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown built-in model tiny-foo: .*opt, llama"):
        resolve_model_path("tiny-foo")
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ConfigError, match=r"model not found: .*no_such_model .*tiny-llama"):
        resolve_model_path(missing)
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    # something that may be a hub id passes through; loading it offline fails clearly
    assert resolve_model_path("facebook/opt-1.3b") == "facebook/opt-1.3b"
    with pytest.raises(ConfigError, match=r"^model not found: facebook/opt-1\.3b \(not a local"):
        load_tokenizer("facebook/opt-1.3b")
    with pytest.raises(ConfigError, match="cannot load"):
        load_tokenizer(str(tmp_path))  # a directory without a model
