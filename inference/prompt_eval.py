"""Answers of a baseline and fine-tuned models to the same prompts, side by side; on a task
family's prompts also each answer's ground-truth score (its checker) and each model's mean.

    python -m inference.prompt_eval --model_name_or_path_baseline output/step1_sft \\
        --model_name_or_path_finetune output/step3_rlhf/actor output/step3_rlhf/actor_ema
    python -m inference.prompt_eval ... --prompts "What is 2 plus 3? Answer with the number only."
    python -m inference.prompt_eval ... --best_of 8 --reward_model output/step2_reward

Without --prompts / --prompt_file it takes --num_prompts held-out prompts of --task (the family's
fixed test split, which no step trains on, whatever its --seed). Decoding is greedy; --best_of N
also samples N answers per prompt (--temperature, --top_p, --seed), ranks them with the reward
(--reward_model and/or --reward_fn, weighed by --reward_weights: the functions in order, then the
reward model, as in Step 3) and keeps the highest (inference/best_of_n.py). Reported per model then:
greedy score, sampled pass@1 (mean over the N samples), best-of-N (the kept answer's score) and
oracle best-of-N (the best of the N by ground truth: pass@N for a 0/1 score). If best-of-N
under a reward does not beat greedy, Step 3 on that reward will not either.
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from utils.config import ConfigError


@dataclass
class ModelAnswers:
    name: str
    answers: list[str]
    scores: list[float] | None  # ground truth, when every prompt is a task prompt of the family
    best_of: list | None = None  # one inference.best_of_n.Choice per prompt with --best_of

    @property
    def mean_score(self) -> float | None:
        return sum(self.scores) / len(self.scores) if self.scores else None

    def mean_of(self, attribute: str) -> float | None:
        """Mean over prompts of a Choice property (best_score, oracle_score, sampled_score)."""
        if not self.best_of or self.best_of[0].scores is None:
            return None
        return statistics.fmean(getattr(c, attribute) for c in self.best_of)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path_baseline", required=True, help="model folder or built-in name")
    parser.add_argument("--model_name_or_path_finetune", nargs="+", required=True,
                        help="one or more fine-tuned models to compare with the baseline")
    parser.add_argument("--prompts", nargs="*", default=[], help="questions to ask (plain text)")
    parser.add_argument("--prompt_file", default="", help="a .txt file (one question per line) or .jsonl "
                        "with a 'prompt' field (its other fields go to --reward_fn functions as columns)")
    parser.add_argument("--task", default="bundled", help="task family (utils.data.tasks: bundled, "
                        "bundled-constraints) whose held-out prompts are asked and whose checker grades")
    parser.add_argument("--num_prompts", type=int, default=20, help="held-out prompts of --task to use")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8, help="rows per generate call (with "
                        "--best_of, batch_size // N prompts, at least one, each with its N rows)")
    parser.add_argument("--prompt_format", default="auto", choices=("auto", "template", "human_assistant"),
                        help="as chat.py: Human/Assistant turns for models trained here, else the "
                        "tokenizer's chat template when it has one")
    best = parser.add_argument_group("best-of-N (off without --best_of)")
    best.add_argument("--best_of", type=int, default=None, help="answers sampled per prompt; the reward keeps one")
    best.add_argument("--temperature", type=float, default=1.0)
    best.add_argument("--top_p", type=float, default=1.0)
    best.add_argument("--seed", type=int, default=1234, help="sampling seed (each model gets the same stream)")
    best.add_argument("--reward_model", default="", help="a Step 2 reward model (same tokenizer as the models)")
    best.add_argument("--reward_fn", action="append", default=[], metavar="SPEC",
                      help="FILE.py:NAME or package.module:NAME (utils/rewards.py); repeatable")
    best.add_argument("--reward_weights", type=float, nargs="+", default=[],
                      help="one per reward: each --reward_fn in order, then the reward model (as Step 3; default all 1)")
    parser.add_argument("--output_json", default="", help="also write every answer and score here")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise ConfigError("--num_prompts, --batch_size and --max_new_tokens must be at least 1")
    if args.best_of is None and (args.reward_model or args.reward_fn or args.reward_weights):
        raise ConfigError("--reward_model, --reward_fn and --reward_weights rank --best_of samples: "
                          "give --best_of N")
    return args


def best_of_setup(args: argparse.Namespace):
    """(Sampling, Reward) for --best_of, checked before any model loads; (None, None) without it."""
    if args.best_of is None:
        return None, None
    from inference.best_of_n import Reward, Sampling
    from utils.rewards import load_reward_functions

    sampling = Sampling(n=args.best_of, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    reward = Reward(model_path=args.reward_model, functions=load_reward_functions(args.reward_fn),
                    weights=args.reward_weights)
    return sampling, reward


def load_questions(args: argparse.Namespace, family=None) -> tuple[list[str], list[dict]]:
    """(questions, each one's other columns): from --prompts / --prompt_file, else the family's
    held-out prompts (their checkers parse the prompt: no columns)."""
    if args.prompts or args.prompt_file:
        rows = [{"prompt": p} for p in args.prompts] + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    else:
        family = family or task_family(args.task)
        rows = [{"prompt": q} for q in family.held_out(args.num_prompts)]  # the fixed split
    rows = [row for row in rows if row["prompt"].strip()]
    if not rows:
        raise ConfigError("no prompts to evaluate")
    return [row["prompt"].strip() for row in rows], [{k: v for k, v in row.items() if k != "prompt"} for row in rows]


def task_family(name: str):
    from utils.data import tasks
    return tasks.family(name)


def read_prompt_file(path: str) -> list[dict]:
    """Rows with a 'prompt' (a .txt file: one per line, no other columns)."""
    from utils.data.sources import read_jsonl

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--prompt_file {path} does not exist")
    if file.suffix != ".jsonl":
        return [{"prompt": line} for line in file.read_text(encoding="utf-8").splitlines()]
    rows = read_jsonl(file)
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(f"{path} record {i}: expected a JSON object with a 'prompt' field")
    return rows


def load_session(path: str, max_new_tokens: int = 32, prompt_format: str = "auto"):
    """(model, tokenizer, ChatSession building prompts as chat.py does)."""
    from inference.chat import ChatSession, GenerationSettings, default_prompt_format, load_for_generation

    model, tokenizer = load_for_generation(path)
    session = ChatSession(model, tokenizer, GenerationSettings(max_new_tokens=max_new_tokens),
                          prompt_format=default_prompt_format(path, prompt_format))
    return model, tokenizer, session


def generate_answers(path: str, questions: list[str], max_new_tokens: int = 32, batch_size: int = 8,
                     prompt_format: str = "auto") -> list[str]:
    """Greedy answers of one model."""
    model, tokenizer, session = load_session(path, max_new_tokens, prompt_format)
    return greedy_answers(model, tokenizer, session, questions, max_new_tokens, batch_size)


def greedy_answers(model, tokenizer, session, questions: list[str], max_new_tokens: int,
                   batch_size: int) -> list[str]:
    """Greedy answers in batches of left-padded prompts built as chat.py builds them."""
    import torch

    from utils.data.collators import pad_sequences

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


def check_tokenizers(paths: list[str], reward) -> None:
    """Refuse a reward model whose tokenizer differs from any model's before generating anything."""
    if reward is not None and reward.model_path:
        from utils.model import load_tokenizer
        for path in paths:
            reward.check_tokenizer(load_tokenizer(path), path)


def evaluate(paths: list[str], questions: list[str], max_new_tokens: int = 32, batch_size: int = 8,
             prompt_format: str = "auto", family=None, columns: list[dict] | None = None,
             sampling=None, reward=None) -> list[ModelAnswers]:
    """Each model's greedy answers (and best-of-N choices with `sampling` and `reward`), graded
    by the family's checker (default: the bundled task) when every prompt is one of its prompts."""
    family = family or task_family("bundled")
    gradable = all(family.is_task_prompt(q) for q in questions)
    check_tokenizers(paths, reward)
    results = []
    for path in paths:
        model, tokenizer, session = load_session(path, max_new_tokens, prompt_format)
        answers = greedy_answers(model, tokenizer, session, questions, max_new_tokens, batch_size)
        scores = family.score_batch(questions, answers) if gradable else None
        choices = None
        if sampling is not None:
            choices = graded_choices(model, tokenizer, session, questions, columns, sampling, reward, family)
        results.append(ModelAnswers(path, answers, scores, choices))
        del model
    return results


def best_of_for(path: str, questions: list[str], sampling, reward, family, columns: list[dict] | None = None,
                prompt_format: str = "auto") -> list:
    """Best-of-N choices of one model alone (no greedy pass), graded when the prompts are the
    family's (bench.quality's rows for the SFT model)."""
    check_tokenizers([path], reward)
    model, tokenizer, session = load_session(path, sampling.max_new_tokens, prompt_format)
    return graded_choices(model, tokenizer, session, questions, columns, sampling, reward, family)


def graded_choices(model, tokenizer, session, questions, columns, sampling, reward, family) -> list:
    from inference.best_of_n import best_of_n, grade

    choices = best_of_n(model, tokenizer, session, questions, columns or [{} for _ in questions], sampling, reward)
    if all(family.is_task_prompt(q) for q in questions):
        grade(choices, questions, family)
    return choices


def report(questions: list[str], results: list[ModelAnswers], quiet: bool = False) -> str:
    lines = []
    if not quiet:
        for i, question in enumerate(questions):
            lines.append(f"==> prompt {i + 1}: {question}")
            for r in results:
                score = f" [score {r.scores[i]:.1f}]" if r.scores else ""
                lines.append(f"    {r.name}: {r.answers[i]!r}{score}")
                if r.best_of:
                    lines.append("      " + best_line(r.best_of[i]))
    if results[0].scores:
        lines.append(f"==> mean ground-truth score on {len(questions)} prompts:")
        if results[0].best_of:
            n = len(results[0].best_of[0].answers)
            heads = ("greedy", "sampled", f"best-of-{n}", f"oracle-of-{n}")
            lines.append("    " + "".join(f"{h:<12}" for h in heads) + "model")
            lines += ["    " + "".join(f"{v:<12.3f}" for v in (r.mean_score, r.mean_of("sampled_score"),
                                                            r.mean_of("best_score"), r.mean_of("oracle_score")))
                      + r.name for r in results]
        else:
            lines += [f"    {r.mean_score:.3f}  {r.name}" for r in results]
    return "\n".join(lines)


def best_line(choice) -> str:
    n = len(choice.answers)
    score = f", score {choice.best_score:.1f}; oracle {choice.oracle_score:.1f}" if choice.scores else ""
    return (f"best of {n}: {choice.answers[choice.best]!r} [answer {choice.best + 1}, "
            f"reward {choice.rewards[choice.best]:.3f}{score}]")


def model_record(r: ModelAnswers) -> dict:
    """Everything output_json keeps about one model (per prompt, in prompt order)."""
    record = {"name": r.name, "answers": r.answers, "scores": r.scores, "mean_score": r.mean_score}
    if r.best_of:
        record["best_of_n"] = {
            "sampled_score": r.mean_of("sampled_score"), "best_of_n_score": r.mean_of("best_score"),
            "oracle_score": r.mean_of("oracle_score"),
            "per_prompt": [{"answers": c.answers, "rewards": c.rewards, "reward_parts": c.parts,
                            "best": c.best, "scores": c.scores} for c in r.best_of]}
    return record


def main(argv=None) -> None:
    args = parse_args(argv)
    family = task_family(args.task)
    sampling, reward = best_of_setup(args)
    questions, columns = load_questions(args, family)
    paths = [args.model_name_or_path_baseline, *args.model_name_or_path_finetune]
    results = evaluate(paths, questions, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       prompt_format=args.prompt_format, family=family, columns=columns,
                       sampling=sampling, reward=reward)
    print(report(questions, results, args.quiet), flush=True)
    if args.output_json:
        rows = {"prompts": questions, "task": args.task, "models": [model_record(r) for r in results]}
        if sampling is not None:
            rows["best_of_n"] = {"n": sampling.n, "temperature": sampling.temperature, "top_p": sampling.top_p,
                                 "seed": sampling.seed, "reward": reward.describe(), "weights": reward.weight_of}
        from utils.fs import atomic_write_text
        atomic_write_text(args.output_json, json.dumps(rows, indent=2))


if __name__ == "__main__":
    from utils.cli import run_entry
    run_entry(main)
