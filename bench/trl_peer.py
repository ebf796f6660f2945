"""The peer side of the Step 3 benchmark: TRL's PPO trainer (`trl.experimental.ppo`, trl 1.12) on
the same models, prompts, batch size, answer length and number of PPO iterations as our run.

Run by `bench.step3_throughput` in a subprocess, with the python of an environment that has trl
(`bench.peer_env`). The prompts come from the benchmark's prompt file through our own data layer,
so both toolkits see the same token ids; all prompts have one length and eos is disabled on both
sides, so every iteration generates exactly batch x answer_len tokens and runs one optimizer step
per model (TRL steps policy and value head in one optimizer, ours each model in its own); the
answers, tokens and optimizer steps are counted as they happen and reported as "work" per round.
Timing: per iteration from TRL's own step-end callback; generation by timing TRL's
`batch_generation` (a wrapper that only measures). The first iteration is left out, as for ours.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

from bench.child import report_result
from bench.flop_count import CountedRound


def prompt_ids(args, tokenizer) -> list[list[int]]:
    """Step 3's prompts of the benchmark's prompt file, tokenized by our data layer."""
    from utils.data import create_prompt_dataset
    train, _ = create_prompt_dataset([args.data], "0,0,1", args.cache, 3, args.seed, tokenizer,
                                     args.prompt_len, max_prompt_seq_len=args.prompt_len)
    ids = [list(map(int, train[i]["prompt_input_ids"])) for i in range(len(train))]
    if len({len(row) for row in ids}) != 1:
        raise SystemExit("benchmark prompt file: prompts of different token lengths")
    return ids


def run(args) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from utils.model import load_tokenizer, resolve_dtype, resolve_model_path

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(args.dtype, device)
    actor, critic = resolve_model_path(args.actor), resolve_model_path(args.critic)
    tokenizer = load_tokenizer(actor, padding_side="left")
    ids = prompt_ids(args, tokenizer)
    need = args.batch * args.rounds
    data = datasets.Dataset.from_dict({"input_ids": (ids * (need // len(ids) + 1))[:need]})

    policy = AutoModelForCausalLM.from_pretrained(actor, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(actor, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(critic, dtype=dtype, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(critic, dtype=dtype, num_labels=1)
    for model in (value, reward):
        model.config.pad_token_id = tokenizer.pad_token_id

    marks, gen = [], {"s": 0.0, "tokens": 0, "answers": 0, "first_s": 0.0}
    counted = CountedRound(args.count_round)

    class Marks(TrainerCallback):
        def on_train_begin(self, *_, **__):
            marks.append(time.perf_counter())
            counted.train_begin()

        def on_step_end(self, *_, **__):
            counted.step_end()
            marks.append(time.perf_counter())
            if len(marks) == 2:  # the warm-up iteration's generation is left out
                gen["first_s"], gen["first_tokens"] = gen["s"], gen["tokens"]

    timed_generation = trl_ppo.batch_generation

    def measured(model, queries, *rest, **kw):
        start = time.perf_counter()
        out = timed_generation(model, queries, *rest, **kw)
        gen["s"] += time.perf_counter() - start
        gen["tokens"] += (out[0].size(1) - queries.size(1)) * queries.size(0)
        gen["answers"] += queries.size(0)
        return out
    trl_ppo.batch_generation = measured

    with tempfile.TemporaryDirectory(prefix="trl-ppo-") as out_dir:
        config = PPOConfig(
            output_dir=out_dir, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            num_mini_batches=1, num_ppo_epochs=1, total_episodes=need, response_length=args.answer_len,
            local_rollout_forward_batch_size=args.batch, stop_token=None, missing_eos_penalty=None,
            temperature=1.0, kl_coef=0.1, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95,
            learning_rate=9.65e-6, lr_scheduler_type="cosine", warmup_steps=0, seed=args.seed,
            report_to="none", save_strategy="no", logging_steps=1, num_sample_generations=0,
            use_cpu=device == "cpu", dataloader_num_workers=0, disable_tqdm=True)
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref,
                             reward_model=reward, train_dataset=data, value_model=value, callbacks=[Marks()])
        steps = count_calls(trainer.optimizer, "step")  # one optimizer for policy and value head
        trainer.train()

    rounds = [b - a for a, b in zip(marks, marks[1:])]
    timed = rounds[1:] or rounds
    gen_s = (gen["s"] - gen["first_s"]) if len(rounds) > 1 else gen["s"]
    gen_tokens = (gen["tokens"] - gen["first_tokens"]) if len(rounds) > 1 else gen["tokens"]
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"samples_per_s": args.batch * len(timed) / sum(timed),
            "generation_tokens_per_s": gen_tokens / max(gen_s, 1e-9),
            "generation_s": gen_s / len(timed), "round_s": sum(timed) / len(timed),
            "work": {"answers": gen["answers"] / len(rounds), "generated_tokens": gen["tokens"] / len(rounds),
                     "optimizer_steps": steps["calls"] / len(rounds)},
            "rounds": len(rounds), "peak_memory_gb": peak, "counted_flops": counted.flops}


def count_calls(obj, method: str) -> dict:
    """Count calls of obj.method (a wrapper that only counts) in the returned dict's "calls"."""
    count, inner = {"calls": 0}, getattr(obj, method)

    def counted(*args, **kwargs):
        count["calls"] += 1
        return inner(*args, **kwargs)
    setattr(obj, method, counted)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--actor", required=True)
    parser.add_argument("--critic", required=True)
    parser.add_argument("--data", required=True, help="the benchmark's prompt file (JSON Lines)")
    parser.add_argument("--cache", required=True, help="tokenized-data cache folder")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--prompt_len", type=int, required=True)
    parser.add_argument("--answer_len", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--count_round", type=int, default=0, help="count this iteration's FLOPs (0: none)")
    report_result(run(parser.parse_args()))


if __name__ == "__main__":
    main()
