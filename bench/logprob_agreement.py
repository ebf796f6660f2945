"""How far the rollout's log-probs from the generation pass are from a training-side forward.

Step 3 keeps each sampled token's log-prob from generating (inference.generation.SampledLogProbs)
as PPO's old policy, instead of a second actor forward (--recompute_rollout_logprobs). This
measures the gap the choice introduces: sample answers with HF generate, with and without the KV
cache, recording log-probs; score the same sequences with one forward (Step 3's scoring forward,
training.step3_rlhf_finetuning.scoring.answer_log_probs); compare per answer token, in fp32 and
bf16. A PPO ratio p_new / p_old starts at exp(gap) instead of 1: the "outside clip" column is the
share of tokens whose first-step ratio would already sit outside PPO's [0.8, 1.2].

    python -m bench.logprob_agreement                       # smollm2-135m, 32 prompts x 32 tokens
    python -m bench.logprob_agreement --model tiny-llama --prompts 8
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.child import report_table

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=32, help="bundled task prompts, one answer each")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows here")
    return p


def prompts(tokenizer, n: int):
    from utils.data import bundled
    from utils.data.raw_datasets import human_prompt
    texts = [human_prompt(ex["prompt"]) for ex in bundled.generate_examples(n, seed=1)]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def sample(model, tokenizer, ids, mask, args, use_cache: bool, seed: int):
    """(sequences at full width, recorded log-probs, answer mask, seconds)."""
    from inference.generation import SampledLogProbs, generation_config, pad_to_width
    from utils.rl_math import answer_mask
    config = generation_config(max_new_tokens=args.new_tokens, do_sample=True, temperature=args.temperature,
                               top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    config.use_cache = use_cache
    recorder = SampledLogProbs(args.temperature)
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=[recorder])
    seconds = time.perf_counter() - start
    kept = recorder.result(out, ids.shape[1], args.new_tokens)
    seq = pad_to_width(out, ids.shape[1] + args.new_tokens, tokenizer.pad_token_id)
    return seq, kept, answer_mask(seq[:, ids.shape[1]:], tokenizer.eos_token_id, tokenizer.pad_token_id), seconds


def agreement(model, tokenizer, ids, mask, args, use_cache: bool) -> dict:
    from training.step3_rlhf_finetuning.scoring import answer_log_probs
    seq, kept, answers, seconds = sample(model, tokenizer, ids, mask, args, use_cache, args.seed)
    with torch.no_grad():
        scored = answer_log_probs(model, seq, torch.cat([mask, answers.long()], 1), ids.shape[1], args.temperature)
    gap = (kept - scored)[answers]
    return {"tokens": int(answers.sum()), "mean_abs_gap": gap.abs().mean().item(), "max_abs_gap": gap.abs().max().item(),
            "mean_gap": gap.mean().item(), "outside_clip": (gap.exp() - 1).abs().gt(0.2).float().mean().item(),
            "generate_s": seconds}


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from utils.model import load_causal_lm, load_tokenizer, resolve_model_path
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path, padding_side="left")
    ids, mask = prompts(tokenizer, args.prompts)
    rows = []
    for dtype in args.dtypes:
        model = load_causal_lm(path, tokenizer).to(DTYPES[dtype]).eval()
        for use_cache in (True, False):
            rows.append({"dtype": dtype, "kv_cache": use_cache, **agreement(model, tokenizer, ids, mask, args, use_cache)})
    report_table(f"{args.model}, {args.prompts} prompts x up to {args.new_tokens} tokens, T {args.temperature}, "
                 f"{torch.get_num_threads()} threads: generation-pass log-probs minus one scoring forward's", {
                     "dtype": lambda r: r["dtype"], "KV cache": lambda r: "yes" if r["kv_cache"] else "no",
                     "answer tokens": lambda r: str(r["tokens"]), "mean abs gap": lambda r: f"{r['mean_abs_gap']:.2e}",
                     "max abs gap": lambda r: f"{r['max_abs_gap']:.2e}", "mean gap": lambda r: f"{r['mean_gap']:+.2e}",
                     "ratio outside [0.8, 1.2]": lambda r: f"{r['outside_clip']:.2%}"}, rows, args)

if __name__ == "__main__":
    main()
