"""Runs the hybrid engine on real DeepSpeed engines and writes what it saw as JSON.

tests/test_hybrid_engine.py starts this in a subprocess (DeepSpeed patches torch process-wide,
so engines must not live in the pytest process) and asserts on the JSON:

    python -m tests.hybrid_engine_check single --out DIR
    deepspeed --num_gpus 2 --master_port P --module tests.hybrid_engine_check multi --out DIR

Every reference is plain unsharded HF `generate` on the same weights, padded to the fixed
width, computed with torch's own F.linear (the hybrid engine generates with it too).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from inference.generation import pad_to_width
from inference.hybrid_engine import HybridEngine
from utils import dist
from utils.strategy import DeepSpeedStrategy
from utils.strategy.ds_config import train_ds_config
from utils.strategy.export import gathered_state_dict
from utils.strategy.optim import build_optimizer
from utils.model import (apply_lora, load_causal_lm, load_tokenizer, merge_lora_state_dict,
                         resolve_model_path)

NEW = 12
TEXTS = ["What is 2 + 3? Answer with the number only.",
         "Sort the list 4, 1, 3 in ascending order.",
         "Reverse the word cat.",
         "Repeat the word yes three times, separated by commas. Then say done."]


def prompts(tokenizer, texts, device):
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def plain_model(name: str, tokenizer, state: dict | None = None, dtype=torch.float32):
    model = load_causal_lm(resolve_model_path(name), tokenizer, dtype=dtype)
    if state is not None:
        model.load_state_dict(state, strict=False)
        model.tie_weights()
    return model.eval()


@torch.no_grad()
def reference(model, ids, mask, tokenizer, eos=None, new=NEW) -> list:
    with DeepSpeedStrategy.torch_linear():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id if eos is None else eos)
    return pad_to_width(out, ids.shape[1] + new, tokenizer.pad_token_id).tolist()


def with_lora(model, seed: int = 7):
    """LoRA with seeded random A and B: peft starts B at zero (fusing would be a no-op) and
    draws A from the global RNG (ranks could differ, and DeepSpeed keeps rank 0's)."""
    model = apply_lora(model, 4, lora_alpha=1)  # scale 1/4, not 1: the fused copy must read it from the model
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            param.data.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model


def merged_state(peft_model) -> dict:
    return merge_lora_state_dict(peft_model.state_dict(), *_lora_args(peft_model))


def build_engine(model, zero_stage: int, dtype: str = "fp32"):
    import deepspeed
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.0, lora_lr=1e-2, offload=False)
    config = train_ds_config(micro_batch=4, zero_stage=zero_stage, dtype=dtype)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def train_steps(engine, ids, mask, steps: int = 1) -> list[float]:
    losses = []
    for _ in range(steps):
        labels = ids.masked_fill(mask == 0, -100)
        loss = engine(input_ids=ids, attention_mask=mask, labels=labels).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def hybrid_tokens(hybrid, ids, mask, **kwargs) -> list:
    kwargs.setdefault("do_sample", False)
    return hybrid.generate(ids, mask, max_new_tokens=kwargs.pop("new", NEW), **kwargs).tolist()


def logprob_gap(hybrid, engine, ids, mask, temperature: float = 1.3, seed: int = 11, **sampling) -> float:
    """Largest |generation-pass log-prob - training-side forward's| over the sampled answer tokens:
    the rollout's kept log-probs against what Step 3's scoring forward on the engine computes."""
    from training.step3_rlhf_finetuning.scoring import answer_log_probs
    from utils.rl_math import answer_mask
    seq, kept = hybrid.generate(ids, mask, max_new_tokens=NEW, do_sample=True, temperature=temperature,
                                generator=torch.Generator().manual_seed(seed), with_log_probs=True, **sampling)
    answer = answer_mask(seq[:, ids.shape[1]:], hybrid.eos_token_id, hybrid.pad_token_id)
    was_training = engine.module.training
    engine.eval()
    with torch.no_grad():
        scored = answer_log_probs(engine, seq, torch.cat([mask, answer.long()], 1), ids.shape[1], temperature)
    engine.train(was_training)
    return ((kept - scored).abs() * answer).max().item()


class Counter:
    """Counts ZeRO-3 gathers (GatheredParameters entries) and trained-module forwards."""

    def __init__(self, engine):
        import deepspeed
        self.gathers = 0
        self.forwards = 0
        original = deepspeed.zero.GatheredParameters
        counter = self

        class Counting(original):
            def __enter__(self):
                counter.gathers += 1
                return super().__enter__()

        deepspeed.zero.GatheredParameters = Counting
        engine.module.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))


# ---------------------------------------------------------------------- one process

def scenario_zero(stage: int, tokenizer, device) -> dict:
    """Plain model under ZeRO `stage`: parity, eos/pad, sampling, training continues."""
    ids, mask = prompts(tokenizer, TEXTS, device)
    ref = reference(plain_model("tiny-llama", tokenizer), ids, mask, tokenizer)
    engine = build_engine(plain_model("tiny-llama", tokenizer).train(), stage)
    counter = Counter(engine)
    linear_before = torch.nn.functional.linear
    hybrid = HybridEngine(engine, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, tp_gather_partition_size=2)
    start = time.perf_counter()
    first = hybrid_tokens(hybrid, ids, mask)
    call_s = time.perf_counter() - start  # the whole first generate(): its stats' phases lie inside
    out = {"ref": ref, "hybrid": first, "call_s": call_s, "prompt_len": ids.shape[1],
           "pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id,
           "stats": hybrid.last_stats, "gathers": counter.gathers, "forwards": counter.forwards,
           "train_mode_after": engine.module.training,
           "linear_restored": torch.nn.functional.linear is linear_before,
           "copy_has_hooks": any(m._forward_pre_hooks for m in hybrid.inference_model.modules())}
    copy_params = dict(hybrid.inference_model.named_parameters())
    out["shares_storage"] = all(copy_params[n].data_ptr() == p.data_ptr()
                                for n, p in engine.module.named_parameters()) if stage < 3 else None
    out.update(eos_case(hybrid, ids, mask, tokenizer))
    out.update(sampling_case(hybrid, ids, mask))
    out["logprob_gap"] = logprob_gap(hybrid, engine, ids, mask)
    out["logprob_gap_top_k"] = logprob_gap(hybrid, engine, ids, mask, top_k=5, top_p=0.9)
    engine.module.eval()
    hybrid_tokens(hybrid, ids, mask)
    out["eval_mode_kept"] = not engine.module.training
    engine.module.train()
    out["losses"] = train_steps(engine, ids, mask, steps=4)
    counter.gathers = 0
    out["hybrid_after_step"] = hybrid_tokens(hybrid, ids, mask)
    out["gathers_after_step"] = counter.gathers
    out["stats_after_step"] = hybrid.last_stats
    state = gathered_state_dict(engine)
    out["ref_after_step"] = reference(plain_model("tiny-llama", tokenizer, state), ids, mask, tokenizer)
    out["step_changed_output"] = ref != out["ref_after_step"]
    out["losses_after_generate"] = train_steps(engine, ids, mask, steps=2)
    if stage == 3:
        out["release"] = release_case(engine, hybrid, ids, mask, tokenizer)
    return out


def eos_case(hybrid, ids, mask, tokenizer) -> dict:
    """Pick as eos a token greedy emits mid-answer in row 0: that row must stop there."""
    free = hybrid.generate(ids, mask, max_new_tokens=NEW, do_sample=False)
    hybrid.eos_token_id = None
    no_eos = hybrid.generate(ids, mask, max_new_tokens=NEW, do_sample=False)
    answer = no_eos[0, ids.shape[1]:].tolist()
    eos = answer[NEW // 3]
    hybrid.eos_token_id = [eos, tokenizer.eos_token_id]
    stopped = hybrid.generate(ids, mask, max_new_tokens=NEW, do_sample=False)
    stats = hybrid.last_stats
    hybrid.eos_token_id = tokenizer.eos_token_id
    return {"eos_free": free.tolist(), "eos_none": no_eos.tolist(), "eos_token": eos,
            "eos_stopped": stopped.tolist(), "eos_new_tokens": stats["new_tokens"],
            "eos_ref": reference(plain_model("tiny-llama", tokenizer, _state_of(hybrid)), ids, mask,
                                 tokenizer, eos=[eos, tokenizer.eos_token_id])}


def _state_of(hybrid) -> dict:
    return {k: v.clone() for k, v in hybrid.inference_model.state_dict().items()}


def sampling_case(hybrid, ids, mask) -> dict:
    def sample(seed, **kw):
        return hybrid_tokens(hybrid, ids, mask, do_sample=True,
                             generator=torch.Generator().manual_seed(seed), **kw)
    rng_before = torch.get_rng_state()
    first, again, other = sample(1, temperature=1.5), sample(1, temperature=1.5), sample(2, temperature=1.5)
    return {"sample_same_seed": first == again, "sample_other_seed_differs": first != other,
            "global_rng_untouched": torch.equal(rng_before, torch.get_rng_state()),
            "sample_top_k1": sample(3, top_k=1), "sample_top_p_small": sample(4, top_p=1e-6),
            "sample_tokens_valid": all(0 <= t < hybrid.inference_model.config.vocab_size
                                       for row in first for t in row)}


def release_case(engine, hybrid, ids, mask, tokenizer) -> dict:
    released = HybridEngine(engine, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, release_inference_cache=True)
    first = hybrid_tokens(released, ids, mask)
    after_first = released.inference_model is None
    second = hybrid_tokens(released, ids, mask)
    return {"kept": hybrid_tokens(hybrid, ids, mask), "first": first, "second": second,
            "freed_after_generate": after_first and released.inference_model is None,
            "built_each_time": released.last_stats["built"]}


def scenario_lora(name: str, stage: int, tokenizer, device) -> dict:
    """LoRA: the copy holds fused weights and no LoRA layers; the trained weights are untouched."""
    ids, mask = prompts(tokenizer, TEXTS, device)
    peft_model = with_lora(plain_model(name, tokenizer).train())
    ref = reference(plain_model(name, tokenizer, merged_state(peft_model)), ids, mask, tokenizer)
    unfused = reference(plain_model(name, tokenizer), ids, mask, tokenizer)
    engine = build_engine(peft_model, stage)
    before = {k: v.clone() for k, v in gathered_state_dict(engine).items()}
    hybrid = HybridEngine(engine, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    out = {"ref": ref, "unfused_ref": unfused, "hybrid": hybrid_tokens(hybrid, ids, mask)}
    out["logprob_gap"] = logprob_gap(hybrid, engine, ids, mask)
    after = gathered_state_dict(engine)
    out["trained_untouched"] = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    out["copy_lora_modules"] = [n for n, _ in hybrid.inference_model.named_modules() if "lora" in n]
    out["copy_class"] = type(hybrid.inference_model).__name__
    train_steps(engine, ids, mask, steps=2)
    out["hybrid_after_step"] = hybrid_tokens(hybrid, ids, mask)
    out["ref_after_step"] = reference(plain_model(name, tokenizer, merged_state_from(engine)), ids, mask, tokenizer)
    return out


def _lora_args(peft_model) -> tuple:
    from utils.model import lora_fan_in_fan_out, lora_scaling
    return lora_scaling(peft_model), lora_fan_in_fan_out(peft_model)


def merged_state_from(engine) -> dict:
    return merge_lora_state_dict(gathered_state_dict(engine), *_lora_args(engine.module))


def run_single(out_dir: Path) -> None:
    # tiny models gain nothing from a second thread, and a busy 2-core machine makes two
    # threads stall each other (measured: a tiny-llama generate ran 60x slower under load)
    torch.set_num_threads(1)
    device = DeepSpeedStrategy().setup_distributed()
    tokenizer = load_tokenizer(resolve_model_path("tiny-llama"))
    results = {}
    for stage in (0, 2, 3):
        results[f"zero{stage}"] = scenario_zero(stage, tokenizer, device)
    results["lora_llama_zero3"] = scenario_lora("tiny-llama", 3, tokenizer, device)
    results["lora_gpt2_zero2"] = scenario_lora("tiny-gpt2", 2, tokenizer, device)
    results["opt_zero3"] = scenario_lora_free("tiny-opt", 3, tokenizer, device)
    results["llama_zero3_bf16"] = scenario_lora_free("tiny-llama", 3, tokenizer, device, "bf16")
    (out_dir / "single.json").write_text(json.dumps(results))


def scenario_lora_free(name: str, stage: int, tokenizer, device, dtype: str = "fp32") -> dict:
    """bf16: the copy must take the engine's dtype and keep its fp32 rotary buffers; the
    reference is the checkpoint loaded in bf16, as DeepSpeed's bf16 engine holds it."""
    ids, mask = prompts(tokenizer, TEXTS, device)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ref = reference(plain_model(name, tokenizer, dtype=torch_dtype), ids, mask, tokenizer)
    engine = build_engine(plain_model(name, tokenizer).train(), stage, dtype)
    hybrid = HybridEngine(engine, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return {"ref": ref, "hybrid": hybrid_tokens(hybrid, ids, mask),
            "copy_dtype": str(next(hybrid.inference_model.parameters()).dtype),
            "logprob_gap": logprob_gap(hybrid, engine, ids, mask)}


# ---------------------------------------------------------------------- two processes

def scenario_multi(name: str, stage: int, tp: int, lora: bool, tokenizer, device) -> dict:
    """Ranks hold prompts of different lengths and counts; every rank must call generate()."""
    rank = dist.rank()
    texts = TEXTS[rank:] if rank % 2 else TEXTS[:2]  # rank 1: 3 longer prompts, rank 0: 2
    ids, mask = prompts(tokenizer, texts, device)
    model = plain_model(name, tokenizer).train()
    if lora:
        model = with_lora(model)
    ref_model = plain_model(name, tokenizer, merged_state(model) if lora else None)
    ref = reference(ref_model, ids, mask, tokenizer)
    engine = build_engine(model, stage)
    hybrid = HybridEngine(engine, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, inference_tp_size=tp)
    out = {"ref": ref, "hybrid": hybrid_tokens(hybrid, ids, mask), "stats": hybrid.last_stats,
           "sharded": _sharded_shapes(hybrid)}
    # an eos from rank 0's first answer (one setting for all ranks, as a TP group needs):
    # the other rank's rows mostly never hit it, so with TP 1 the ranks stop at different steps
    eos = _broadcast_state([out["hybrid"][0][ids.shape[1] + 2], tokenizer.eos_token_id])
    hybrid.eos_token_id = eos
    out["eos"] = {"hybrid": hybrid_tokens(hybrid, ids, mask), "ref": reference(ref_model, ids, mask, tokenizer, eos=eos)}
    hybrid.eos_token_id = tokenizer.eos_token_id
    if tp == 1:  # no collective while generating: ranks may run different lengths, then meet
        out["uneven"] = {"hybrid": hybrid_tokens(hybrid, ids, mask, new=2 + 10 * rank),
                         "ref": reference(ref_model, ids, mask, tokenizer, new=2 + 10 * rank)}
    out["sample_top_k1"] = hybrid_tokens(hybrid, ids, mask, do_sample=True, top_k=1,
                                         generator=torch.Generator().manual_seed(5))
    samples = [hybrid_tokens(hybrid, ids, mask, do_sample=True, temperature=1.3,
                             generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    out["sample_reproducible"] = samples[0] == samples[1]
    out["logprob_gap"] = logprob_gap(hybrid, engine, ids, mask)
    train_steps(engine, *prompts(tokenizer, TEXTS[:2], device), steps=2)
    out["hybrid_after_step"] = hybrid_tokens(hybrid, ids, mask)
    out["stats_after_step"] = hybrid.last_stats
    state = gathered_state_dict(engine)  # rank 0 only
    if state is not None and lora:
        state = merge_lora_state_dict(state, *_lora_args(engine.module))
    state = _broadcast_state(state)
    out["ref_after_step"] = reference(plain_model(name, tokenizer, state), ids, mask, tokenizer)
    return out


def _sharded_shapes(hybrid) -> dict:
    return {n: list(p.shape) for n, p in hybrid.inference_model.named_parameters() if "layers.0." in n}


def _broadcast_state(state):
    """gathered_state_dict fills rank 0 only; everyone needs it for its reference."""
    box = [state]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def run_multi(out_dir: Path) -> None:
    torch.set_num_threads(1)  # two ranks on a 2-core machine: one thread each
    device = DeepSpeedStrategy().setup_distributed()
    tokenizer = load_tokenizer(resolve_model_path("tiny-llama"))
    results = {"world": dist.world_size(), "pad": tokenizer.pad_token_id,
               "tp2_llama_zero3": scenario_multi("tiny-llama", 3, 2, False, tokenizer, device),
               "tp2_opt_lora_zero2": scenario_multi("tiny-opt", 2, 2, True, tokenizer, device),
               "dp_llama_zero3": scenario_multi("tiny-llama", 3, 1, False, tokenizer, device)}
    (out_dir / f"rank{dist.rank()}.json").write_text(json.dumps(results))
    DeepSpeedStrategy.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("mode", choices=["single", "multi"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)  # the deepspeed launcher adds it
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_single(out) if args.mode == "single" else run_multi(out)


if __name__ == "__main__":
    main()
