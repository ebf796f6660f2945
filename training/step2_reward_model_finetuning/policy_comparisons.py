"""Comparison data from the policy's own answers, the way InstructGPT collected it: K sampled
answers per prompt from the Step 1 model, ranked by a labeler, written as prompt/chosen/rejected
pairs that Step 2 reads like any local data file.

Here the labeler is the task family's checker (utils.data.bundled.score by default, or another
family of utils.data.tasks chosen by --data_path, e.g. bundled-constraints), the stand-in for the
human labelers of a real project. Why it matters: a reward model trained only on the bundled set's
synthetic rejected answers (off by one, rule broken) ranks the SFT model's *own* mistakes much
worse than the pairs it was trained on, and PPO then follows the reward model's noise. Pairs of
the policy's samples close part of that gap (docs/2026-11-24-reward-model-on-policy-answers.md).

    python -m training.step2_reward_model_finetuning.policy_comparisons \\
        --model_name_or_path output/step1_sft --output_file output/comparisons.jsonl
    python -m training.step2_reward_model_finetuning.main --model_name_or_path output/step2_reward \\
        --data_path output/comparisons.jsonl --data_split 0,1,0 ...   # a second reward-model round

Prompts are Step 2's share (--data_split, --seed) of the family's training split, so neither Step 3's
prompts nor the held-out test prompts are used. Sampling: temperature 1, as Step 3 samples.
"""
from __future__ import annotations

if not __package__:
    raise SystemExit("error: run from the repository root as "
                     "`python -m training.step2_reward_model_finetuning.policy_comparisons`")

import argparse
import itertools
import json
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="the policy to sample (a Step 1 output)")
    parser.add_argument("--output_file", required=True, help="jsonl of prompt/chosen/rejected pairs (new file)")
    parser.add_argument("--num_prompts", type=int, default=512)
    parser.add_argument("--samples_per_prompt", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--data_path", default="bundled", help="the task family whose prompts and checker "
                        "to use: bundled or bundled-constraints (utils.data.tasks)")
    parser.add_argument("--data_split", default="2,4,4", help="as the steps': prompts come from Step 2's share")
    parser.add_argument("--num_examples", type=int, default=3000, help="as the steps' --num_examples")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_file")
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or args.samples_per_prompt < 2 or args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--num_prompts, --batch_size, --max_new_tokens must be >= 1 and --samples_per_prompt >= 2")
    from utils.data.tasks import FAMILIES
    if args.data_path not in FAMILIES:
        parser.error(f"--data_path {args.data_path!r} has no checker; choose one of {', '.join(FAMILIES)}")
    if Path(args.output_file).exists() and not args.overwrite:
        parser.error(f"{args.output_file} exists; pass --overwrite to replace it")
    return args


def step2_prompts(data_split: str, num_examples: int, seed: int, count: int,
                  family: str = "bundled") -> list[str]:
    """The first `count` prompts of Step 2's share of the family's training split."""
    from utils.config import parse_data_split
    from utils.data.pipeline import gather_rows
    from utils.data.sources import BundledSource

    rows = gather_rows([BundledSource(family=family)], [], parse_data_split(data_split), 2, seed, num_examples)
    return [sample["prompt"] for _, sample in rows["train"][:count]]


def ranked_pairs(prompt: str, answers: list[str], label) -> list[dict]:
    """Every pair of distinct answers the labeler scores differently, better one as chosen."""
    scored = {a: label(prompt, a) for a in answers if a.strip()}
    return [{"prompt": prompt, "chosen": a if sa > sb else b, "rejected": b if sa > sb else a}
            for (a, sa), (b, sb) in itertools.combinations(scored.items(), 2) if sa != sb]


def sample_answers(model, tokenizer, prompts: list[str], k: int, max_new_tokens: int,
                   temperature: float) -> list[list[str]]:
    """k sampled answers per prompt (text after the prompt, up to the first eos)."""
    import torch

    from utils.data.collators import pad_sequences
    from utils.data.pipeline import encode
    from utils.rl_math import answer_mask

    ids, mask = pad_sequences([torch.tensor(p) for p in encode(tokenizer, prompts, True)],
                              tokenizer.pad_token_id, left=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                             top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, num_return_sequences=k,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    answers = out[:, ids.size(1):]
    keep = answer_mask(answers, tokenizer.eos_token_id, tokenizer.pad_token_id)
    texts = [tokenizer.decode(row[m], skip_special_tokens=True) for row, m in zip(answers, keep)]
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    from utils.config import ConfigError
    from utils.data.tasks import family
    from utils.fs import atomic_write_text
    from utils.model import load_causal_lm, load_tokenizer, resolve_model_path

    try:
        path = resolve_model_path(args.model_name_or_path)
        tokenizer = load_tokenizer(path)
        model = load_causal_lm(path, tokenizer).eval()
        prompts = step2_prompts(args.data_split, args.num_examples, args.seed, args.num_prompts,
                                args.data_path)
        label = family(args.data_path).score
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    torch.manual_seed(args.seed)
    pairs, answered, right = [], 0, 0.0
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="sampling", unit="batch"):
        batch = prompts[start:start + args.batch_size]
        for prompt, answers in zip(batch, sample_answers(model, tokenizer, batch, args.samples_per_prompt,
                                                         args.max_new_tokens, args.temperature)):
            pairs += ranked_pairs(prompt, answers, label)
            answered += len(answers)
            right += sum(label(prompt, a) for a in answers)
    if not pairs:
        raise SystemExit("error: the labeler scored every sample of each prompt alike: no pairs to write")
    atomic_write_text(args.output_file, "".join(json.dumps(p) + "\n" for p in pairs))
    print(f"{len(pairs)} pairs from {len(prompts)} prompts x {args.samples_per_prompt} samples "
          f"(mean checker score of the samples {right / answered:.3f}) -> {args.output_file}")


if __name__ == "__main__":
    main()
