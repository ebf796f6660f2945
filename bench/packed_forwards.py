"""Step 3's scoring and training forwards over packed rows (--pack_sequences) against padded ones.

A ragged rollout as Step 3 holds it (prompts left-padded, answers right-padded; real text cut
from the bundled dialogues): the scoring forward (no gradients, one model) and a training pass
(forward and backward of the answers' log-probs, in micro-batches), each padded and packed.
Prints the tokens each reads, utils.flops' count, the seconds (the fastest of --repeats) and
the largest log-prob gap between the two.

    python -m bench.packed_forwards                            # smollm2-135m, 32 rows, fp32
    python -m bench.packed_forwards --model tiny-llama --dtypes fp32 bf16
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
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--prompt_len", type=int, nargs=2, default=[20, 64], metavar=("MIN", "MAX"))
    p.add_argument("--answer_len", type=int, nargs=2, default=[5, 32], metavar=("MIN", "MAX"))
    p.add_argument("--micro_batch", type=int, default=32, help="rows per training forward")
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows here")
    return p


def ragged_rollout(tokenizer, args) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(seq, attention_mask, prompt width): windows of the bundled dialogues' tokens."""
    from utils.data.bundled import tokenizer_training_text
    text = " ".join(t for t, _ in zip(tokenizer_training_text(), range(400)))
    stream = torch.tensor(tokenizer(text)["input_ids"])
    g = torch.Generator().manual_seed(args.seed)

    def draw(bounds):
        return torch.randint(bounds[0], bounds[1] + 1, (args.rows,), generator=g)

    prompts, answers = draw(args.prompt_len), draw(args.answer_len)
    p, a = int(prompts.max()), int(answers.max())
    seq = torch.full((args.rows, p + a), tokenizer.pad_token_id)
    mask = torch.zeros_like(seq)
    for i, (n, m) in enumerate(zip(prompts.tolist(), answers.tolist())):
        start = int(torch.randint(0, len(stream) - n - m, (1,), generator=g))
        seq[i, p - n:p + m] = stream[start:start + n + m]
        mask[i, p - n:p + m] = 1
    return seq, mask, p


def fastest(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def phases(model, seq, mask, p: int, pack: bool, args) -> dict:
    """Seconds of the scoring forward and of one training pass over the rows."""
    from training.step3_rlhf_finetuning.scoring import answer_log_probs

    def score():
        model.eval()
        with torch.no_grad():
            return answer_log_probs(model, seq, mask, p, 1.0, pack=pack)

    def train():
        model.train()
        for rows in torch.arange(len(seq)).split(args.micro_batch):
            log_probs = answer_log_probs(model, seq[rows], mask[rows], p, 1.0, with_entropy=True, pack=pack)[0]
            (log_probs * mask[rows, p:]).sum().backward()
        model.zero_grad(set_to_none=True)

    score()  # the first packed call checks the model against a padded forward: not timed
    return {"scoring_s": fastest(score, args.repeats), "training_s": fastest(train, args.repeats),
            "log_probs": score()}


def work(model, seq, mask, p: int, pack: bool, micro_batch: int) -> dict:
    """Tokens the scoring forward reads, and utils.flops' count of it and of the training pass."""
    from utils import flops
    s = flops.shape(model.config, model)
    tokens, score, _ = _counts(model, s, seq, mask, p, pack)
    train = sum(_counts(model, s, seq[rows], mask[rows], p, pack)[2]
                for rows in torch.arange(len(seq)).split(micro_batch))
    return {"tokens": tokens, "scoring_tflop": score / 1e12, "training_tflop": train / 1e12}


def _counts(model, s, seq, mask, p: int, pack: bool) -> tuple[int, float, float]:
    """(tokens, forward FLOPs, training FLOPs) of one forward over the rows."""
    from utils import flops
    from utils.model.packed_forward import pack_for
    if pack:
        packed = pack_for(model, seq, mask, p)
        rows, width = packed.input_ids.shape
        head = {"head_tokens": packed.target.numel()}
    else:
        (rows, width), head = seq.shape, {"logits": seq.size(1) - p}
    return rows * width, flops.forward_flops(s, rows, width, **head), flops.training_flops(s, rows, width, **head)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from utils.model import load_causal_lm, load_tokenizer, resolve_model_path
    from utils.model.packed_forward import decision
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path, padding_side="left")
    seq, mask, p = ragged_rollout(tokenizer, args)
    answers = mask[:, p:].bool()
    rows = []
    for dtype in args.dtypes:
        model = load_causal_lm(path, tokenizer).to(DTYPES[dtype])
        runs = {pack: phases(model, seq, mask, p, pack, args) for pack in (False, True)}
        gap = (runs[True].pop("log_probs") - runs[False].pop("log_probs"))[answers].abs().max().item()
        for pack in (False, True):
            rows.append({"dtype": dtype, "packed": pack and bool(decision(model)), **runs[pack],
                         **work(model, seq, mask, p, pack and bool(decision(model)), args.micro_batch),
                         "max_abs_log_prob_gap": gap})
    report_table(f"{args.model}: {args.rows} rows, prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, answers "
                 f"{args.answer_len[0]}-{args.answer_len[1]}: {int(mask.sum())} real of {mask.numel()} padded positions; "
                 f"training micro-batches of {args.micro_batch}; {torch.get_num_threads()} threads", {
                     "dtype": lambda r: r["dtype"], "forwards": lambda r: "packed" if r["packed"] else "padded",
                     "tokens read": lambda r: str(r["tokens"]), "scoring TFLOP": lambda r: f"{r['scoring_tflop']:.3f}",
                     "scoring s": lambda r: f"{r['scoring_s']:.2f}", "training TFLOP": lambda r: f"{r['training_tflop']:.3f}",
                     "training s": lambda r: f"{r['training_s']:.2f}",
                     "max log-prob gap": lambda r: f"{r['max_abs_log_prob_gap']:.2e}"}, rows, args)

if __name__ == "__main__":
    main()
