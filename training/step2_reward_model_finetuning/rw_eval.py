"""Score prompt/response pairs with a trained reward model, to check it by hand.

    python -m training.step2_reward_model_finetuning.rw_eval --model_name_or_path output/step2_reward \
        --prompt "What is 2 + 3?" --response "5" --response "The answer is 5."
    python -m training.step2_reward_model_finetuning.rw_eval --model_name_or_path output/step2_reward \
        --file pairs.jsonl          # rows with prompt and response, or prompt, chosen and rejected

Prompts are wrapped in the training format (" Human: ... Assistant:") unless they already are.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from utils.config import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--prompt", help="one prompt to score responses to")
    parser.add_argument("--response", action="append", default=[], help="a response (repeatable)")
    parser.add_argument("--file", help="json/jsonl rows: prompt + response, or prompt + chosen + rejected")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--no_eot", action="store_true",
                        help="do not append end-of-text (for models trained with --no-add_eot_token)")
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)
    if bool(args.file) == bool(args.prompt):
        raise ConfigError("give either --prompt with one or more --response, or --file")
    if args.prompt and not args.response:
        raise ConfigError("--prompt needs at least one --response")
    return args


def read_rows(path: str) -> list[dict]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--file not found: {path}")
    text = file.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if file.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l.strip()]
    except json.JSONDecodeError as err:
        raise ConfigError(f"--file {path} is not valid JSON lines: {err}") from None
    if not rows:
        raise ConfigError(f"--file {path} is empty")
    for i, row in enumerate(rows):
        if "prompt" not in row or not ({"response"} <= row.keys() or {"chosen", "rejected"} <= row.keys()):
            raise ConfigError(f"--file {path}: row {i} needs prompt and response, or prompt, chosen "
                              f"and rejected (it has {sorted(row)})")
    return rows


def score_texts(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int,
                add_eot: bool = True) -> list[float]:
    import torch

    from utils.data.raw_datasets import as_answer, as_prompt
    # As in training: prompt and answer encoded apart, end-of-text appended (the reward is read there).
    eos = [tokenizer.eos_token_id] if add_eot and tokenizer.eos_token_id is not None else []
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer(as_prompt(p))["input_ids"]
               + tokenizer(as_answer(r.strip()), add_special_tokens=False)["input_ids"] + eos
               for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        with torch.no_grad():
            out += model.score(input_ids, mask).float().tolist()
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    from utils.model import load_reward_model, load_tokenizer

    tokenizer = load_tokenizer(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    model = load_reward_model(args.model_name_or_path, tokenizer,
                              trust_remote_code=args.trust_remote_code).eval()
    if args.prompt:
        scores = score_texts(model, tokenizer, [args.prompt] * len(args.response), args.response, args.batch_size,
                             not args.no_eot)
        print(f"prompt: {args.prompt}")
        for response, score in zip(args.response, scores):
            print(f"  {score:+.4f}  {response}")
        return
    rows = read_rows(args.file)
    if "response" in rows[0]:
        scores = score_texts(model, tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                             args.batch_size, not args.no_eot)
        for row, score in zip(rows, scores):
            print(json.dumps({**row, "score": round(score, 4)}, ensure_ascii=False))
        return
    prompts = [r["prompt"] for r in rows]
    chosen = score_texts(model, tokenizer, prompts, [r["chosen"] for r in rows], args.batch_size, not args.no_eot)
    rejected = score_texts(model, tokenizer, prompts, [r["rejected"] for r in rows], args.batch_size, not args.no_eot)
    for row, c, r in zip(rows, chosen, rejected):
        print(json.dumps({**row, "chosen_score": round(c, 4), "rejected_score": round(r, 4)}, ensure_ascii=False))
    wins = sum(c > r for c, r in zip(chosen, rejected))
    print(f"pair accuracy {wins / len(rows):.3f} ({wins}/{len(rows)}), mean margin "
          f"{sum(c - r for c, r in zip(chosen, rejected)) / len(rows):+.4f}")


if __name__ == "__main__":
    from utils.cli import run_entry
    run_entry(main)
