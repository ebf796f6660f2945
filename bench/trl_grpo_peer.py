"""The peer side of bench.grpo_vs_trl: TRL 1.16's GRPOTrainer on the matched settings.

Run with the python of an environment that has trl 1.16 (bench.peer_env) from the repository
root, so our own data layer and reward loader are importable. Given the settings
bench.grpo_vs_trl.matched_settings built (as JSON), it
  - takes Step 3's prompts from our data layer (create_prompt_dataset phase 3) and puts their
    texts into TRL's data set in the order our sampler draws them (shuffle_dataset=False), after
    checking that TRL's tokenization of every text gives exactly our ids;
  - wraps the reward function so it gets the keyword arguments utils/rewards.py gives it (the
    prompts, completions and data columns; not TRL's completion_ids, trainer_state, log_extra,
    log_metric), only those it names unless it takes **kwargs;
  - makes the tokenizer's eos the only stop token (TRL adds the model's generation_config eos
    ids; ours stops at the tokenizer's);
  - trains with GRPOConfig(**bench.grpo_vs_trl.trl_config_kwargs(...)) and saves the final
    policy and tokenizer as an HF folder (<output_dir>/policy);
  - writes <output_dir>/peer_result.json: the policy folder, per-round seconds (one optimizer
    step a round, timed from TRL's step-end callback), the rollouts' mean reward and KL per round,
    and the work as measured (bench.step3_throughput checks it): each generate call's seconds
    (a wrapper that only times), each reward call's answers and completion tokens, optimizer
    steps, peak memory.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.flop_count import CountedRound
from bench.grpo_vs_trl import trl_config_kwargs


def step3_prompts(m: dict, seed: int, data_output_path: str,
                  tokenizer) -> tuple[list[str], list[list[int]], list[dict]]:
    """(texts, ids, columns) of Step 3's prompts, in the order of our Step 3's rounds."""
    from torch.utils.data import DistributedSampler

    from utils.config import parse_data_split
    from utils.data import create_prompt_dataset
    from utils.data.pipeline import gather_rows
    from utils.data.sources import resolve_source

    train, _ = create_prompt_dataset([m["data_path"]], m["data_split"], data_output_path, 3, seed, tokenizer,
                                     m["max_prompt_seq_len"], num_examples=m["num_examples"],
                                     max_prompt_seq_len=m["max_prompt_seq_len"])
    rows = gather_rows([resolve_source(m["data_path"])], [], parse_data_split(m["data_split"]), 3, seed,
                       m["num_examples"])["train"]
    if len(rows) != len(train):
        raise SystemExit(f"{len(rows)} raw rows but {len(train)} tokenized Step 3 prompts")
    # our Step 3's order: DistributedSampler(shuffle, seed) on one process, epoch after epoch,
    # whole generation batches only (drop_last)
    per_round, order, epoch = m["prompts_per_round"], [], 0
    usable = len(train) // per_round * per_round
    while len(order) < m["rounds"] * per_round:
        sampler = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        order += list(sampler)[:usable]
        epoch += 1
    order = order[:m["rounds"] * per_round]
    texts = [rows[i][1]["prompt"] for i in order]
    ids = [list(map(int, train[i]["prompt_input_ids"])) for i in order]
    columns = [train[i].get("columns", {}) for i in order]  # the row columns our Step 3's batches carry
    theirs = tokenizer(text=texts)["input_ids"]  # what GRPOTrainer._tokenize_prompts does with text prompts
    for text, mine, trl_ids in zip(texts, ids, theirs):
        if list(trl_ids) != mine:
            raise SystemExit(f"TRL's tokenization of {text[-80:]!r} differs from our Step 3's ids "
                             f"({len(trl_ids)} vs {len(mine)} tokens): a prompt cut by --max_prompt_seq_len? "
                             "The two sides would not see the same prompts.")
    return texts, ids, columns


TRL_EXTRAS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")  # not ours


def trl_reward(spec: str, seen: list | None = None):
    """The user's function, called as utils/rewards.py calls it: prompts, completions and the
    data set's columns (not TRL's extras), only those it names unless it takes **kwargs. Each
    call appends to `seen` the answers it scores and their tokens (the work TRL did)."""
    from utils.rewards import load_reward_functions
    rf = load_reward_functions([spec])[0]

    def reward(prompts, completions, **kwargs):
        if seen is not None:
            seen.append({"answers": len(completions), "tokens": sum(map(len, kwargs["completion_ids"]))})
        given = {"prompts": prompts, "completions": completions,
                 **{k: v for k, v in kwargs.items() if k not in TRL_EXTRAS}}
        if rf.accepts is not None:
            given = {k: v for k, v in given.items() if k in rf.accepts}
        return rf.fn(**given)
    reward.__name__ = rf.name
    return reward


def timed(generate, seconds: list):
    """`generate` that appends its wall seconds to `seconds` (it only measures)."""
    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return out
    return wrapped


def run(args) -> dict:
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from training.step3_rlhf_finetuning.metrics import peak_memory_gb
    from utils.model import load_tokenizer, resolve_model_path

    m = json.loads(args.settings)
    torch.manual_seed(args.seed)
    use_cpu = not torch.cuda.is_available()
    path = resolve_model_path(m["model"])
    tokenizer = load_tokenizer(path, padding_side="left")
    texts, _, columns = step3_prompts(m, args.seed, args.data_output_path, tokenizer)
    data = datasets.Dataset.from_list([{"prompt": t, **c} for t, c in zip(texts, columns)])
    dtype = torch.bfloat16 if m["dtype"] == "bf16" else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    # stop at the tokenizer's eos only, as ours (TRL adds generation_config's eos ids)
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    policy.generation_config.pad_token_id = tokenizer.pad_token_id

    marks, log_rows, checked = [], [], {}  # step-end times; TRL's per-step logs; its checkpointing
    scored, generation_s = [], []  # per reward call: answers and tokens; per generate call: seconds
    policy.generate = timed(policy.generate, generation_s)
    counted = CountedRound(args.count_round)

    class Marks(TrainerCallback):
        def on_train_begin(self, *_, model=None, **__):
            marks.append(time.perf_counter())
            checked["gradient_checkpointing"] = bool(model.is_gradient_checkpointing)  # set on in train()
            counted.train_begin()

        def on_step_end(self, *_, **__):
            counted.step_end()
            marks.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "reward" in logs:
                log_rows.append(dict(logs))

    out = Path(args.output_dir)
    config = GRPOConfig(**trl_config_kwargs(m, args.seed, str(out / "trainer"), use_cpu))
    trainer = GRPOTrainer(model=policy, reward_funcs=trl_reward(m["reward_fn"], scored), args=config,
                          train_dataset=data, processing_class=tokenizer, callbacks=[Marks()])
    setup = {"eos_token_ids": sorted(set(trainer.eos_token_ids)), "reference_model": trainer.ref_model is not None}
    if setup != {"eos_token_ids": [tokenizer.eos_token_id], "reference_model": m["kl_ctl"] > 0}:
        raise SystemExit(f"TRL's trainer stops at {setup['eos_token_ids']} (ours: {tokenizer.eos_token_id}) and has "
                         f"{'a' if setup['reference_model'] else 'no'} reference model with beta {m['kl_ctl']}")
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    if checked["gradient_checkpointing"] != m["gradient_checkpointing"]:
        raise SystemExit(f"TRL trained with gradient checkpointing {checked['gradient_checkpointing']}")
    if trainer.state.global_step != m["rounds"]:
        raise SystemExit(f"TRL made {trainer.state.global_step} optimizer steps, not {m['rounds']}")
    trainer.save_model(str(out / "policy"))
    tokenizer.save_pretrained(str(out / "policy"))
    (out / "policy" / "trl_config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    return {"model": str(out / "policy"), "trl_version": trl.__version__, "train_s": train_s, **setup, **checked,
            "round_s": [b - a for a, b in zip(marks, marks[1:])], "generation_s": generation_s,
            "scored": scored, "optimizer_steps": trainer.state.global_step, "peak_memory_gb": peak_memory_gb(),
            "counted_flops": counted.flops,
            "reward": [r["reward"] for r in log_rows], "kl": [r.get("kl") for r in log_rows],
            "completion_length": [r.get("completions/mean_length") for r in log_rows]}


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--settings", required=True, help="bench.grpo_vs_trl.matched_settings as JSON")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--data_output_path", required=True, help="tokenized-data cache folder (ours)")
    parser.add_argument("--count_round", type=int, default=0, help="count this round's FLOPs (0: none)")
    args = parser.parse_args()
    result = run(args)
    Path(args.output_dir, "peer_result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
