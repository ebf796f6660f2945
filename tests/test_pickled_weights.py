"""Weights saved as pickles (`pytorch_model.bin`): plain HF folders, sharded ones, hub snapshots and
DeepSpeed-Chat step outputs load with their weights unchanged; the pickles are read as tensors
only (torch.load weights_only=True), so one holding any other object is refused before it runs.

Every fixture is built here from the built-in tiny models: DeepSpeed-Chat's outputs the way its
save_hf_format writes them (torch.save of the model's state dict, the model's config.json), its
reward model as its RewardModel holds it (an AutoModel backbone under `rwtransformer.` and a
bias-free scalar head `v_head`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import run_module, save_malicious_weights
from utils.config import ConfigError

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def _base(name: str) -> Path:
    from utils.model import resolve_model_path
    return Path(resolve_model_path(name))


def _state(name: str) -> dict:
    from safetensors.torch import load_file
    return load_file(_base(name) / "model.safetensors")


def hf_bin_folder(folder: Path, name: str = "tiny-opt", shards: int = 1) -> Path:
    """A copy of built-in `name` with its weights as pytorch_model.bin (or an index and shards)."""
    folder.mkdir(parents=True)
    for file in COPIED:
        if (_base(name) / file).is_file():
            shutil.copy(_base(name) / file, folder)
    state = _state(name)
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    keys, weight_map = sorted(state), {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def dschat_actor(folder: Path, name: str = "tiny-opt", zero3: bool = False) -> Path:
    """A DeepSpeed-Chat Step 1 (or Step 3 actor) output: the causal LM's state dict as
    pytorch_model.bin, its config as the training left it, the tokenizer. Under ZeRO-3 its saver
    walks named_parameters(), so buffers and the tied LM head are not in the file."""
    from transformers import AutoModelForCausalLM

    from utils.model import load_tokenizer
    folder.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(_base(name))
    tokenizer = load_tokenizer(name)
    model.config.end_token_id = tokenizer.eos_token_id  # what its create_hf_model sets
    model.config.pad_token_id = model.config.eos_token_id
    state = ({k: p.detach() for k, p in model.named_parameters()} if zero3 else model.state_dict())
    torch.save(state, folder / "pytorch_model.bin")
    model.config.to_json_file(folder / "config.json")
    tokenizer.save_pretrained(folder)
    return folder


def dschat_reward(folder: Path, name: str = "tiny-opt", architectures=None, seed: int = 0):
    """A DeepSpeed-Chat Step 2 output (or Step 3 critic): its RewardModel's state dict, i.e. the
    AutoModel backbone as `rwtransformer.*` and a scalar head `v_head.weight`, with the base
    model's config. Returns the folder, the backbone and the head, to compute scores by hand."""
    from transformers import AutoModel

    from utils.model import load_tokenizer
    folder.mkdir(parents=True)
    backbone = AutoModel.from_pretrained(_base(name)).eval()
    torch.manual_seed(seed)
    width = getattr(backbone.config, "word_embed_proj_dim", None) or backbone.config.hidden_size
    v_head = nn.Linear(width, 1, bias=False)
    nn.init.normal_(v_head.weight, std=0.5)  # values of a visible size, not near zero
    state = {f"rwtransformer.{k}": v for k, v in backbone.state_dict().items()}
    state["v_head.weight"] = v_head.weight.detach()
    torch.save(state, folder / "pytorch_model.bin")
    backbone.config.architectures = architectures
    backbone.config.to_json_file(folder / "config.json")
    load_tokenizer(name).save_pretrained(folder)
    return folder, backbone, v_head


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["What is 2 + 3?", "Hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def _same_causal_lm(folder: Path, name: str) -> None:
    from utils.model import load_causal_lm, load_tokenizer
    tokenizer = load_tokenizer(name)
    expected = _logits(load_causal_lm(name, tokenizer).eval(), tokenizer)
    assert torch.equal(_logits(load_causal_lm(str(folder), tokenizer).eval(), tokenizer), expected)


# ---------------------------------------------------------------- what loads

@pytest.mark.parametrize("name,shards", [("tiny-opt", 1), ("tiny-llama", 1), ("tiny-llama", 3)],
                         ids=["opt", "llama", "llama-sharded"])
def test_hf_folder_with_only_pytorch_model_bin_loads_the_same_weights(tmp_path, name, shards):
    folder = hf_bin_folder(tmp_path / "bin", name, shards)
    digest = {f.name: f.read_bytes() for f in folder.glob("*.bin")}
    _same_causal_lm(folder, name)
    assert {f.name: f.read_bytes() for f in folder.glob("*.bin")} == digest  # read, never written


@pytest.mark.parametrize("name,zero3", [("tiny-opt", False), ("tiny-opt", True), ("tiny-llama", False)],
                         ids=["opt", "opt-zero3-save", "llama"])
def test_deepspeed_chat_step1_output_loads_as_the_actor(tmp_path, name, zero3):
    _same_causal_lm(dschat_actor(tmp_path / "step1", name, zero3), name)


def _upstream_end_scores(values: torch.Tensor, input_ids: torch.Tensor, pad_id: int,
                         num_padding_at_beginning: int = 0) -> torch.Tensor:
    """DeepSpeed-Chat's rule, written out: the value just before the first pad id found after
    `num_padding_at_beginning` of them, or at the last position when there is none."""
    scores = []
    for row_ids, row_values in zip(input_ids, values):
        pads = (row_ids == pad_id).nonzero().flatten()
        end = pads[num_padding_at_beginning].item() if len(pads) > num_padding_at_beginning else len(row_ids)
        scores.append(row_values[end - 1])
    return torch.stack(scores)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama", "tiny-gpt2", "tiny-gpt_neox"])
def test_deepspeed_chat_reward_model_scores_as_its_own_head_does(tmp_path, name):
    """rwtransformer.* lands on the backbone, v_head on the score head: the reward is the head
    applied to the backbone's last hidden state at the last real token (right padding), and
    the critic's per-token values are the head at every real token."""
    from utils.model import load_reward_model, load_tokenizer
    folder, backbone, v_head = dschat_reward(tmp_path / "step2", name, architectures=None)
    tokenizer = load_tokenizer(name)
    batch = tokenizer(["Human: What is 2 + 3? Assistant: 5", "Human: Hi Assistant: Hello there, friend"],
                      padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any() and not (ids[mask.bool()] == tokenizer.pad_token_id).any()
    with torch.no_grad():
        values = v_head(backbone(input_ids=ids, attention_mask=mask).last_hidden_state).squeeze(-1)
        model = load_reward_model(str(folder), tokenizer).eval()
        ours = model(ids, mask)
        score = model.score(ids, mask)
    assert torch.allclose(score, _upstream_end_scores(values, ids, tokenizer.pad_token_id), atol=1e-5)
    assert torch.allclose(ours[mask.bool()], values[mask.bool()], atol=1e-5)
    assert score.abs().min() > 1e-3  # a head that did not load (zeros, fresh init) would not match


def test_deepspeed_chat_reward_model_with_its_causal_lm_architectures(tmp_path):
    """Its config.json is the base model's, often still naming the causal LM class."""
    from utils.model import load_reward_model, load_tokenizer
    folder, _, v_head = dschat_reward(tmp_path / "step2", "tiny-opt", architectures=["OPTForCausalLM"])
    model = load_reward_model(str(folder), load_tokenizer("tiny-opt"))
    assert torch.equal(model.hf_model.score.weight, v_head.weight)


def test_deepspeed_chat_reward_model_is_refused_as_a_causal_lm(tmp_path):
    from utils.model import load_causal_lm, load_tokenizer
    folder, _, _ = dschat_reward(tmp_path / "step2", "tiny-opt")
    with pytest.raises(ConfigError, match="a reward model in DeepSpeed-Chat's layout") as err:
        load_causal_lm(str(folder), load_tokenizer("tiny-opt"))
    assert "\n" not in str(err.value)


def test_model_from_the_hub_cache_with_only_pytorch_model_bin(tmp_path, monkeypatch):
    """A hub id is read the same way: its pytorch_model.bin, fetched into the HF cache (here a
    cache prepared offline), is read by us as tensors only."""
    import huggingface_hub.constants

    from utils.model import load_causal_lm, load_tokenizer
    cache = tmp_path / "hub"
    for repo, make in (("good", lambda d: hf_bin_folder(d, "tiny-opt")),
                       ("evil", lambda d: save_malicious_weights(hf_bin_folder(d, "tiny-opt") / "pytorch_model.bin",
                                                                 tmp_path / "code-ran"))):
        root = cache / f"models--someone--{repo}"
        make(root / "snapshots" / "0123abcd")
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    _same_causal_lm("someone/good", "tiny-opt")
    with pytest.raises(ConfigError, match="holds Python objects other than tensors") as err:
        load_causal_lm("someone/evil", load_tokenizer("tiny-opt"))
    assert "someone/evil" in str(err.value) and not (tmp_path / "code-ran").exists()


# ---------------------------------------------------------------- what is refused, and what is never read

def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    from utils.model import load_causal_lm, load_reward_model, load_tokenizer
    marker = tmp_path / "code-ran"
    folder = hf_bin_folder(tmp_path / "evil", "tiny-llama", shards=2)
    shard = sorted(folder.glob("*.bin"))[1]
    save_malicious_weights(shard, marker, torch.load(shard, weights_only=True))
    for load in (load_causal_lm, load_reward_model):
        with pytest.raises(ConfigError) as err:
            load(str(folder), load_tokenizer("tiny-llama"))
        message = str(err.value)
        assert f"{shard.name} holds Python objects other than tensors (os.makedirs)" in message
        assert str(folder) in message and "\n" not in message
    assert not marker.exists()
    torch.load(shard, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.exists()


def test_a_truncated_pickle_is_one_error_line(tmp_path):
    from utils.model import load_reward_model, load_tokenizer
    folder = hf_bin_folder(tmp_path / "cut", "tiny-opt")
    weights = folder / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ConfigError, match="pytorch_model.bin is not a readable torch.save file") as err:
        load_reward_model(str(folder), load_tokenizer("tiny-opt"))
    assert "\n" not in str(err.value)


def test_other_pickles_in_the_folder_are_never_opened(tmp_path):
    """Only pytorch_model.bin (or the shards its index names) is read: training_args.bin,
    optimizer.pt and the like sit next to it unread."""
    folder = hf_bin_folder(tmp_path / "bin", "tiny-opt")
    for file in ("training_args.bin", "optimizer.pt", "rng_state.pth", "last.ckpt"):
        save_malicious_weights(folder / file, tmp_path / f"ran-{file}")
    _same_causal_lm(folder, "tiny-opt")
    assert not list(tmp_path.glob("ran-*"))


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    from utils.model import load_causal_lm, load_tokenizer
    folder = hf_bin_folder(tmp_path / "ckpt", "tiny-opt")
    torch.save({"model": _state("tiny-opt"), "epoch": 3}, folder / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pytorch_model.bin is not a state dict") as err:
        load_causal_lm(str(folder), load_tokenizer("tiny-opt"))
    assert "'model' is a dict" in str(err.value)


@pytest.mark.parametrize("file", ["model.pt", "model.pth", "last.ckpt", "model.bin"])
def test_weights_only_in_a_file_that_is_not_an_hf_weights_file_are_refused(tmp_path, file):
    from utils.model import load_causal_lm, load_tokenizer
    folder = hf_bin_folder(tmp_path / "other", "tiny-opt")
    (folder / "pytorch_model.bin").rename(folder / file)
    with pytest.raises(ConfigError, match=f"holds no model.safetensors or pytorch_model.bin, only {file}"):
        load_causal_lm(str(folder), load_tokenizer("tiny-opt"))


def test_safetensors_win_over_a_pickle_next_to_them(tmp_path):
    from utils.model import load_causal_lm, load_tokenizer
    folder = tmp_path / "both"
    shutil.copytree(_base("tiny-opt"), folder)
    save_malicious_weights(folder / "pytorch_model.bin", tmp_path / "code-ran")
    load_causal_lm(str(folder), load_tokenizer("tiny-opt"))
    assert not (tmp_path / "code-ran").exists()


# ---------------------------------------------------------------- Step 3 on DeepSpeed-Chat outputs

def test_step3_runs_on_deepspeed_chat_actor_and_reward_model_and_writes_safetensors(tmp_path):
    from tests.test_step3 import MODULE, QUICK, finished
    actor = dschat_actor(tmp_path / "step1", "tiny-llama")
    reward, _, _ = dschat_reward(tmp_path / "step2", "tiny-llama", architectures=["LlamaForCausalLM"])
    out = tmp_path / "step3"
    proc = run_module(MODULE, [*QUICK, "--actor_model_name_or_path", actor, "--critic_model_name_or_path", reward,
                               "--output_dir", out])
    finished(proc, out)  # actor/ and critic/ hold model.safetensors
    from safetensors.torch import load_file
    for folder in ("actor", "critic"):
        assert not [p.name for p in (out / folder).iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    critic_keys = set(load_file(out / "critic" / "model.safetensors"))
    assert "score.weight" in critic_keys and not [k for k in critic_keys if k.startswith(("rwtransformer.", "v_head"))]
    from utils.model import load_reward_model, load_tokenizer
    load_reward_model(str(out / "critic"), load_tokenizer(str(out / "actor")))  # the saved critic loads back
