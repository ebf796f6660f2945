"""Answers of a baseline and fine-tuned models to the same prompts, side by side; on the bundled
task also each answer's ground-truth score (utils.data.bundled.score) and each model's mean.

    python -m inference.prompt_eval --model_name_or_path_baseline output/step1_sft \\
        --model_name_or_path_finetune output/step3_rlhf/actor output/step3_rlhf/actor_ema
    python -m inference.prompt_eval ... --prompts "What is 2 plus 3? Answer with the number only."

Without --prompts / --prompt_file it takes --num_prompts held-out prompts of the bundled task
(the task's fixed test split, which no step trains on, whatever its --seed). Decoding is greedy.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from utils.config import ConfigError


@dataclass
class ModelAnswers:
    name: str
    answers: list[str]
    scores: list[float] | None  # ground truth, when every prompt is a bundled task prompt

    @property
    def mean_score(self) -> float | None:
        return sum(self.scores) / len(self.scores) if self.scores else None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path_baseline", required=True, help="model folder or built-in name")
    parser.add_argument("--model_name_or_path_finetune", nargs="+", required=True,
                        help="one or more fine-tuned models to compare with the baseline")
    parser.add_argument("--prompts", nargs="*", default=[], help="questions to ask (plain text)")
    parser.add_argument("--prompt_file", default="", help="a .txt file (one question per line) or .jsonl "
                        "with a 'prompt' field")
    parser.add_argument("--num_prompts", type=int, default=20, help="held-out bundled prompts to use")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--prompt_format", default="auto", choices=("auto", "template", "human_assistant"),
                        help="as chat.py: Human/Assistant turns for models trained here, else the "
                        "tokenizer's chat template when it has one")
    parser.add_argument("--output_json", default="", help="also write every answer and score here")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise ConfigError("--num_prompts, --batch_size and --max_new_tokens must be at least 1")
    return args


def load_questions(args: argparse.Namespace) -> list[str]:
    if args.prompts or args.prompt_file:
        questions = list(args.prompts) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    else:
        from utils.data import bundled, load_raw_dataset
        held_out = load_raw_dataset("bundled", seed=0).eval[:args.num_prompts]  # fixed split
        questions = [bundled.question_of(row["prompt"]) for row in held_out]
    questions = [q.strip() for q in questions if q.strip()]
    if not questions:
        raise ConfigError("no prompts to evaluate")
    return questions


def read_prompt_file(path: str) -> list[str]:
    from utils.data.sources import read_jsonl

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--prompt_file {path} does not exist")
    if file.suffix != ".jsonl":
        return file.read_text(encoding="utf-8").splitlines()
    rows = read_jsonl(file)
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(f"{path} record {i}: expected a JSON object with a 'prompt' field")
    return [row["prompt"] for row in rows]


def generate_answers(path: str, questions: list[str], max_new_tokens: int = 32, batch_size: int = 8,
                     prompt_format: str = "auto") -> list[str]:
    """Greedy answers of one model, in batches of left-padded prompts built as chat.py builds them."""
    import torch

    from inference.chat import ChatSession, GenerationSettings, default_prompt_format, load_for_generation
    from utils.data.collators import pad_sequences

    model, tokenizer = load_for_generation(path)
    session = ChatSession(model, tokenizer, GenerationSettings(max_new_tokens=max_new_tokens),
                          prompt_format=default_prompt_format(path, prompt_format))
    answers = []
    for start in range(0, len(questions), batch_size):
        rows = [torch.tensor(session.prompt_ids(q)) for q in questions[start:start + batch_size]]
        ids, mask = pad_sequences(rows, tokenizer.pad_token_id, left=True)
        width = ids.shape[1]
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        answers += [session.cut_answer(tokenizer.decode(row[width:], skip_special_tokens=True))
                    for row in out]
    return answers


def evaluate(paths: list[str], questions: list[str], **generation) -> list[ModelAnswers]:
    from utils.data import bundled

    gradable = all(bundled.is_task_prompt(q) for q in questions)
    results = []
    for path in paths:
        answers = generate_answers(path, questions, **generation)
        scores = bundled.score_batch(questions, answers) if gradable else None
        results.append(ModelAnswers(path, answers, scores))
    return results


def report(questions: list[str], results: list[ModelAnswers], quiet: bool = False) -> str:
    lines = []
    if not quiet:
        for i, question in enumerate(questions):
            lines.append(f"==> prompt {i + 1}: {question}")
            for r in results:
                score = f" [score {r.scores[i]:.1f}]" if r.scores else ""
                lines.append(f"    {r.name}: {r.answers[i]!r}{score}")
    if results[0].scores:
        lines.append(f"==> mean ground-truth score on {len(questions)} prompts:")
        lines += [f"    {r.mean_score:.3f}  {r.name}" for r in results]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    questions = load_questions(args)
    paths = [args.model_name_or_path_baseline, *args.model_name_or_path_finetune]
    results = evaluate(paths, questions, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       prompt_format=args.prompt_format)
    print(report(questions, results, args.quiet), flush=True)
    if args.output_json:
        rows = {"prompts": questions,
                "models": [{"name": r.name, "answers": r.answers, "scores": r.scores,
                            "mean_score": r.mean_score} for r in results]}
        from utils.fs import atomic_write_text
        atomic_write_text(args.output_json, json.dumps(rows, indent=2))


if __name__ == "__main__":
    from utils.cli import run_entry
    run_entry(main)
