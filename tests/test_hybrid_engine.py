"""Hybrid engine: greedy output equals plain HF generate token for token (ZeRO 0/2/3, LoRA fused,
TP 1 and 2), updated weights show up, release_inference_cache, eos/pad, sampling, bad config.

Engines are built in subprocesses (tests/hybrid_engine_check.py; DeepSpeed patches torch
process-wide): one run covers the one-process scenarios, one two-process run covers tensor
parallelism and ZeRO-3 with ranks of different batches. The tests assert on what they report.
"""
from __future__ import annotations

import json
import types

import pytest
import torch

from tests.helpers import assert_ok, run_module
from utils.cli import free_port
from utils.config import ConfigError

CHECK = "tests.hybrid_engine_check"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("hybrid_single")
    assert_ok(run_module(CHECK, ["single", "--out", out]))
    return json.loads((out / "single.json").read_text())


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("hybrid_multi")
    launcher = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]
    assert_ok(run_module(CHECK, ["multi", "--out", out], launcher=launcher))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def answers(rows, prompt_len: int) -> list:
    return [row[prompt_len:] for row in rows]


# ---------------------------------------------------------------- one process

@pytest.mark.parametrize("stage", [0, 2, 3])
def test_greedy_matches_plain_generate_under_zero(single, stage):
    r = single[f"zero{stage}"]
    assert r["hybrid"] == r["ref"]
    width = r["prompt_len"] + 12
    assert all(len(row) == width for row in r["hybrid"])
    stats, eos = r["stats"], r["eos"]
    # new_tokens: each row's answer up to and including its first eos
    lengths = [row.index(eos) + 1 if eos in row else len(row) for row in answers(r["hybrid"], r["prompt_len"])]
    assert stats["new_tokens"] == sum(lengths) > 0, (stats, lengths)
    assert stats["tokens_per_s"] == pytest.approx(stats["new_tokens"] / stats["generate_s"])
    # the first call builds the inference copy (gather_s: time spent entering inference mode),
    # then generates; the two phases are disjoint parts of the call, timed around it
    assert stats["built"] and stats["gather_s"] > 0 and stats["generate_s"] > 0, stats
    assert stats["gather_s"] + stats["generate_s"] <= r["call_s"], (stats, r["call_s"])


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_inference_mode_is_entered_and_left_cleanly(single, stage):
    r = single[f"zero{stage}"]
    # ZeRO-3: 4 tiny-llama layers, 2 per chunk -> embeddings/norm/head + 2 layer chunks,
    # each gathered once per generate(); ZeRO 0-2 hold whole weights and gather nothing
    gathers = 3 if stage == 3 else 0
    assert r["stats"]["gathered_chunks"] == r["gathers"] == gathers
    assert r["gathers_after_step"] == gathers
    assert r["forwards"] == 0  # the ZeRO module itself never ran: no per-token gathers
    assert not r["copy_has_hooks"]
    assert r["train_mode_after"] is True and r["eval_mode_kept"] is True
    assert r["linear_restored"]  # DeepSpeed's F.linear is back after generate()
    if stage < 3:
        assert r["shares_storage"]  # ZeRO 0-2: the copy aliases the trained weights, no copy
    assert r["stats"]["built"] and not r["stats_after_step"]["built"]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_updated_weights_show_up_and_training_continues(single, stage):
    r = single[f"zero{stage}"]
    assert r["losses"][-1] < r["losses"][0]
    assert r["step_changed_output"]  # the steps moved greedy output: the check has teeth
    assert r["hybrid_after_step"] == r["ref_after_step"]
    after = r["losses_after_generate"]
    assert after[-1] < r["losses"][-1]  # optimizer steps after generate() still learn


def test_eos_stops_a_row_and_pads_the_rest(single):
    r = single["zero0"]
    p, eos, pad = r["prompt_len"], r["eos_token"], r["pad"]
    assert r["eos_free"] == r["ref"]
    row = r["eos_stopped"][0][p:]
    stop = row.index(eos)
    assert stop == r["eos_none"][0][p:].index(eos)  # stopped at the first eos it generated
    assert row[stop + 1:] == [pad] * (len(row) - stop - 1) and row[stop + 1:]
    assert all(len(x) == p + 12 for x in r["eos_stopped"])
    assert r["eos_stopped"] == r["eos_ref"]
    assert r["eos_new_tokens"] < 4 * 12  # counted up to each row's eos, not the padding


def test_sampling_is_reproducible_and_keeps_the_global_rng(single):
    r = single["zero0"]
    assert r["sample_same_seed"] and r["sample_other_seed_differs"]
    assert r["global_rng_untouched"] and r["sample_tokens_valid"]
    assert r["sample_top_k1"] == r["ref"]  # top-k 1 is greedy
    assert r["sample_top_p_small"] == r["ref"]  # so is a tiny nucleus


def test_release_inference_cache_frees_and_rebuilds(single):
    r = single["zero3"]["release"]
    assert r["freed_after_generate"] and r["built_each_time"]
    assert r["first"] == r["second"] == r["kept"]


@pytest.mark.parametrize("case", ["lora_llama_zero3", "lora_gpt2_zero2"])
def test_lora_is_fused_into_the_copy(single, case):
    r = single[case]
    assert r["ref"] != r["unfused_ref"]  # the adapters matter for these weights
    assert r["hybrid"] == r["ref"]
    assert r["copy_lora_modules"] == [] and r["trained_untouched"]
    assert r["hybrid_after_step"] == r["ref_after_step"]


@pytest.mark.parametrize("case,dtype", [("opt_zero3", "torch.float32"),
                                        ("llama_zero3_bf16", "torch.bfloat16")])
def test_other_family_and_bf16_under_zero3(single, case, dtype):
    assert single[case]["hybrid"] == single[case]["ref"]
    assert single[case]["copy_dtype"] == dtype


# ---------------------------------------------------------------- two processes

@pytest.mark.slow
@pytest.mark.parametrize("case", ["tp2_llama_zero3", "tp2_opt_lora_zero2", "dp_llama_zero3"])
def test_two_processes_match_plain_generate(multi, case):
    for rank, result in enumerate(multi):
        assert result["world"] == 2
        r = result[case]
        assert r["hybrid"] == r["ref"], f"rank {rank}"
        assert r["eos"]["hybrid"] == r["eos"]["ref"], f"rank {rank}"
        assert r["sample_top_k1"] == r["hybrid"] and r["sample_reproducible"]
        assert r["ref_after_step"] != r["ref"] and r["hybrid_after_step"] == r["ref_after_step"]
        assert not r["stats_after_step"]["built"]  # refreshed in place, not rebuilt
    # rank 0 holds 2 prompts, rank 1 holds 3 longer ones: each got its own rows back
    assert [len(m[case]["hybrid"]) for m in multi] == [2, 3]


@pytest.mark.slow
def test_tensor_parallel_really_shards(multi):
    for result in multi:
        tp = result["tp2_llama_zero3"]["sharded"]["model.layers.0.self_attn.q_proj.weight"]
        dp = result["dp_llama_zero3"]["sharded"]["model.layers.0.self_attn.q_proj.weight"]
        assert tp == [dp[0] // 2, dp[1]]
        opt = result["tp2_opt_lora_zero2"]["sharded"]
        # tiny-opt: hidden 128, FFN 512 -> fc1 split by rows (column-parallel), fc2 by columns
        assert opt["model.decoder.layers.0.fc1.weight"] == [256, 128]
        assert opt["model.decoder.layers.0.fc2.weight"] == [128, 256]


@pytest.mark.slow
def test_ranks_generating_different_lengths_do_not_hang(multi):
    # ZeRO-3, TP 1: rank 0 generates 2 tokens while rank 1 generates 12, then both go on to
    # the next collective (a training step, the next generate's gathers) without hanging
    widths = []
    for result in multi:
        r = result["dp_llama_zero3"]["uneven"]
        assert r["hybrid"] == r["ref"]
        widths.append(len(r["hybrid"][0]) - len(result["dp_llama_zero3"]["hybrid"][0]) + 12)
    assert widths == [2, 12]
    # and rank 0's eos row (the eos was taken from its first answer) stopped and was padded
    answer = multi[0]["dp_llama_zero3"]["eos"]["hybrid"][0][-12:]
    assert answer[3:] == [multi[0]["pad"]] * 9 and multi[0]["pad"] not in answer[:3]


# ---------------------------------------------------------------- configuration errors

def stub_engine(family: str, stage: int = 0):
    """The config checks run before any gather: a stub engine around a tiny model is enough."""
    from utils.model import load_causal_lm, load_tokenizer, resolve_model_path
    path = resolve_model_path(f"tiny-{family}")
    model = load_causal_lm(path, load_tokenizer(path))
    return types.SimpleNamespace(module=model, device=torch.device("cpu"),
                                 zero_optimization_stage=lambda: stage)


@pytest.mark.parametrize("family", ["gpt2", "bloom"])
def test_tensor_parallel_refused_family_is_a_clear_error(family):
    from inference.hybrid_engine import HybridEngine
    with pytest.raises(ConfigError, match=f"{family} family.*--inference_tp_size 1"):
        HybridEngine(stub_engine(family), pad_token_id=1, eos_token_id=0, inference_tp_size=2)


def test_tp_size_must_divide_the_world(monkeypatch):
    from inference.hybrid_engine import HybridEngine
    import inference.hybrid_engine
    monkeypatch.setattr(inference.hybrid_engine, "world_size", lambda: 3)
    with pytest.raises(ConfigError, match="must divide the number of processes \\(3\\)"):
        HybridEngine(stub_engine("llama"), pad_token_id=1, eos_token_id=0, inference_tp_size=2)
    with pytest.raises(ConfigError, match="at least 1"):
        HybridEngine(stub_engine("llama"), pad_token_id=1, eos_token_id=0, inference_tp_size=0)
    with pytest.raises(ConfigError, match="tp_gather_partition_size"):
        HybridEngine(stub_engine("llama"), pad_token_id=1, eos_token_id=0, tp_gather_partition_size=0)


def test_zero0_in_process_generates_like_plain_without_deepspeed():
    """Without DeepSpeed state at all (a stub engine) the copy, fill and generate still work,
    and a merged-in-place LoRA model is refused."""
    from inference.hybrid_engine import HybridEngine
    from utils.model import apply_lora, load_tokenizer, resolve_model_path
    engine = stub_engine("llama")
    tok = load_tokenizer(resolve_model_path("tiny-llama"), padding_side="left")
    batch = tok(["Reverse the word cat.", "What is 2 + 3?"], return_tensors="pt", padding=True)
    hybrid = HybridEngine(engine, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    out = hybrid.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, do_sample=False)
    ref = engine.module.eval().generate(**batch, do_sample=False, max_new_tokens=6,
                                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert out[:, :ref.shape[1]].tolist() == ref.tolist() and out.shape[1] == batch["input_ids"].shape[1] + 6
    with pytest.raises(ValueError, match="prompt_len"):
        hybrid.generate(batch["input_ids"], batch["attention_mask"][:, 1:], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        hybrid.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=2, temperature=0.0)
    peft_model = apply_lora(engine.module, 4)
    peft_model.merge_adapter()
    with pytest.raises(ValueError, match="merged in place"):
        HybridEngine(types.SimpleNamespace(module=peft_model, zero_optimization_stage=lambda: 0),
                     pad_token_id=1, eos_token_id=0)


# ---------------------------------------------------------------- rollout log-probs

FP32_GAP = 1e-4  # fp32: generating with a KV cache and scoring in one forward differ by rounding
BF16_GAP = 0.1   # bf16 rounds each matmul to 8 bits of mantissa: the two paths drift apart


@pytest.mark.parametrize("case,key,bound", [
    ("zero0", "logprob_gap", FP32_GAP), ("zero2", "logprob_gap", FP32_GAP), ("zero3", "logprob_gap", FP32_GAP),
    ("zero3", "logprob_gap_top_k", FP32_GAP), ("lora_llama_zero3", "logprob_gap", FP32_GAP),
    ("lora_gpt2_zero2", "logprob_gap", FP32_GAP), ("opt_zero3", "logprob_gap", FP32_GAP),
    ("llama_zero3_bf16", "logprob_gap", BF16_GAP)])
def test_generation_log_probs_match_the_scoring_forward(single, case, key, bound):
    """The log-probs kept from the generation pass (Step 3's old policy unless
    --recompute_rollout_logprobs) equal the scoring forward's on the engine: KV cache vs one
    pass, fused LoRA vs adapters, the inference copy vs ZeRO shards; with top-k/top-p they are
    still the tempered softmax's, untruncated, as the training loss scores them."""
    gap = single[case][key]
    assert 0 <= gap < bound, (case, gap)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tp2_llama_zero3", "tp2_opt_lora_zero2", "dp_llama_zero3"])
def test_generation_log_probs_match_under_tensor_parallelism(multi, case):
    """Each rank keeps its own rows' log-probs from the group's tensor-parallel generate."""
    for rank in multi:
        assert 0 <= rank[case]["logprob_gap"] < FP32_GAP, (case, rank[case]["logprob_gap"])
