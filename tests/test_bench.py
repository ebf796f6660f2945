"""The Step 3 benchmark's fixed work: prompt files whose prompts all come out exactly
--prompt_len tokens through our data layer, the same ids the TRL peers are given; both
algorithms' commands ask for the same answers and one optimizer step a round; every row is
compared with its own algorithm's peer, and a row that did other work stops the benchmark. The
quality benchmark's paired statistics and its refusals."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import error_line, run_module
from bench.peak import matmul_peak_flops
from bench import step3_throughput as throughput
from bench.step3_throughput import write_prompt_file
from bench.trl_peer import prompt_ids


def test_prompt_file_gives_prompts_of_exactly_prompt_len_tokens(tmp_path):
    from types import SimpleNamespace
    from utils.model import load_tokenizer, resolve_model_path

    data = tmp_path / "prompts.jsonl"
    write_prompt_file(data, "tiny-llama", prompt_len=40, count=24)
    args = SimpleNamespace(data=str(data), cache=str(tmp_path / "cache"), seed=1234, prompt_len=40)
    ids = prompt_ids(args, load_tokenizer(resolve_model_path("tiny-llama")))
    assert len(ids) >= 20 and {len(row) for row in ids} == {40}
    assert len({tuple(row) for row in ids}) == len(ids)  # distinct prompts


def test_grpo_peer_gets_the_prompt_texts_of_our_ids_and_each_rows_whole_last_question(tmp_path):
    """No prompt is cut by our data layer, so TRL tokenizes the very text to the very ids
    (step3_prompts refuses otherwise); the reward's column is the question the prompt ends with."""
    from bench.trl_grpo_peer import step3_prompts
    from utils.model import load_tokenizer, resolve_model_path

    data = tmp_path / "prompts.jsonl"
    write_prompt_file(data, "tiny-llama", prompt_len=40, count=12)
    m = {"data_path": str(data), "data_split": "0,0,1", "max_prompt_seq_len": 40, "num_examples": 0,
         "prompts_per_round": 4, "rounds": 3}
    texts, ids, columns = step3_prompts(m, 5, str(tmp_path / "cache"), load_tokenizer(resolve_model_path("tiny-llama")))
    assert len(ids) == 12 and {len(row) for row in ids} == {40}
    assert all(text.endswith(f" {c['question']} Assistant:") for text, c in zip(texts, columns))


def test_question_reward_checks_the_answer_against_the_question_column():
    question = "Which is smaller, 75 or 63? Reply with just the number."
    joined = f" Human: Answer with the word only. {question} Assistant:"
    assert throughput.question_reward([joined] * 3, ["63", "75", "It is 63"], [question] * 3) == [1.0, 0.0, 0.5]


def bench_args(*extra: str):
    return throughput.build_parser().parse_args(["--batch", "3", "--samples_per_prompt", "4", "--prompt_len", "40",
                                                 "--answer_len", "16", "--rounds", "5", *extra])


@pytest.mark.parametrize("name", [*throughput.PPO, *throughput.GRPO])
def test_our_commands_ask_for_the_rounds_answers_in_one_optimizer_step(tmp_path, name):
    """Parsed by Step 3's own parser: the row's answers a round, each exactly --answer_len tokens,
    in one optimizer step; GRPO with the KL weight and lr TRL gets."""
    from bench.grpo_vs_trl import ours_command
    from training.step3_rlhf_finetuning.config import Step3Config
    from training.step3_rlhf_finetuning.data import optimizer_steps_per_round
    from utils.config import parse_config

    args = bench_args("--kl_ctl", "0.07", "--learning_rate", "2e-5", "--dtype", "fp32")
    data = tmp_path / "prompts.jsonl"
    grpo = name in throughput.GRPO
    argv = (ours_command(throughput.grpo_args(name, args, data, tmp_path), 1, tmp_path / "out") if grpo
            else throughput.ppo_command(name, args, data, tmp_path, tmp_path / "out"))
    cfg = parse_config(Step3Config, argv)
    cfg.validate()
    assert cfg.answers_per_rank == throughput.expected_work(name, args)["answers"] == (12 if grpo else 3)
    assert cfg.generation.ignore_eos and cfg.generation.max_answer_seq_len == 16
    assert optimizer_steps_per_round(cfg) == 1 and cfg.max_rounds == 5
    assert cfg.hybrid.enable_hybrid_engine == ("hybrid" in name)
    assert cfg.actor.zero_stage == (3 if "zero3" in name else 2)
    if grpo:
        assert cfg.ppo.advantage == "grpo" and cfg.ppo.kl_in_loss and cfg.ppo.kl_ctl == 0.07
        assert cfg.actor.learning_rate == 2e-5 and cfg.reward_fn == [throughput.REWARD_FN]


def test_trl_grpo_is_asked_for_the_same_round():
    from bench.grpo_vs_trl import matched_settings, trl_config_kwargs

    args = bench_args("--kl_ctl", "0.07", "--learning_rate", "2e-5", "--dtype", "fp32")
    kw = trl_config_kwargs(matched_settings(throughput.grpo_args(throughput.TRL_GRPO, args, "p.jsonl", Path("w"))),
                           1, "out", use_cpu=True)
    answers = throughput.expected_work(throughput.TRL_GRPO, args)["answers"]
    assert kw["per_device_train_batch_size"] * kw["steps_per_generation"] == answers == 12  # one generation batch
    assert kw["steps_per_generation"] == kw["gradient_accumulation_steps"] and kw["max_steps"] == 5  # a step a round
    assert kw["num_generations"] == 4 and kw["generation_kwargs"] == {"min_new_tokens": 16}
    assert (kw["beta"], kw["learning_rate"], kw["bf16"]) == (0.07, 2e-5, False)


def work(answers, tokens, steps=1):
    return {"work": {"answers": answers, "generated_tokens": tokens, "optimizer_steps": steps}}


def test_each_row_is_compared_with_its_own_algorithms_peer_and_must_do_the_asked_work():
    args = bench_args()
    results = {"zero2+hybrid": {"samples_per_s": 6.0, **work(3, 48)},
               "trl ppo": {"samples_per_s": 2.0, **work(3, 48)},
               "grpo zero2+hybrid": {"samples_per_s": 12.0, **work(12, 192)},
               "trl grpo": {"samples_per_s": 10.0, **work(12, 192)},
               "zero3+hybrid": {"samples_per_s": 1.0, **work(3, 48)}}
    assert throughput.ratios(results) == {"zero2+hybrid": 3.0, "trl ppo": 1.0, "grpo zero2+hybrid": 1.2,
                                          "trl grpo": 1.0, "zero3+hybrid": 0.5}
    assert throughput.ratios({"grpo zero2+hybrid": results["grpo zero2+hybrid"]}) == {"grpo zero2+hybrid": None}
    throughput.check_work(results, args)
    for wrong in (work(12, 180), work(12, 192, steps=2), work(11, 176)):  # an eos, an extra step, a lost answer
        with pytest.raises(SystemExit, match="trl grpo did"):
            throughput.check_work({**results, "trl grpo": {"samples_per_s": 10.0, **wrong}}, args)


def test_our_rows_are_timed_from_round_end_to_round_end_and_need_the_same_work_each_round(tmp_path):
    import json

    logs = tmp_path / "logs"
    logs.mkdir()
    row = {"train/answers": 4, "train/generated_tokens": 32, "train/optimizer_steps": 1,
           **{f"train/{c}": 1.0 for c in throughput.LOGGED}}
    rows = [{"step": i + 1, "time": t, **row} for i, t in enumerate((100.0, 102.0, 106.0))]
    (logs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"step": 3, "eval/x": 1}]))
    r = throughput.ours_result("ours", tmp_path)
    assert r["round_s"] == 3.0 and r["samples_per_s"] == pytest.approx(4 / 3)  # rounds 2-3: 6 s, 8 answers
    assert r["work"] == {"answers": 4, "generated_tokens": 32, "optimizer_steps": 1}
    rows[2]["train/generated_tokens"] = 30
    (logs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="generated_tokens per round differ"):
        throughput.ours_result("ours", tmp_path)


def test_trl_grpo_row_leaves_out_the_first_round_and_counts_what_trl_scored():
    side = {"round_s": [9.0, 2.0, 4.0], "generation_s": [5.0, 1.0, 1.0], "optimizer_steps": 3, "peak_memory_gb": 1.0,
            "scored": [{"answers": 12, "tokens": 192}] * 3, "completion_length": [16.0] * 3}
    r = throughput.trl_grpo_result(side)
    assert r["samples_per_s"] == 4.0 and r["generation_tokens_per_s"] == 192.0
    assert r["work"] == {"answers": 12, "generated_tokens": 192, "optimizer_steps": 1.0}


def test_matmul_peak_is_positive_and_finite():
    peak = matmul_peak_flops("fp32", "cpu", size=256, repeats=2)
    assert 1e8 < peak < 1e15


def test_flop_counter_counts_matmuls_and_the_cpus_flash_attention_forward_and_backward():
    """bench.flop_count's counter: a linear layer's 2·in·out a row forward and twice that
    backward, and sdpa attention (the CPU flash kernel, with grouped kv heads) by torch's formula
    for the other attention kernels, forward and backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
    from bench.flop_count import counter
    rows, n_in, n_out = 5, 6, 7
    layer, x = torch.nn.Linear(n_in, n_out), torch.randn(rows, n_in, requires_grad=True)
    with counter() as flops:
        layer(x).sum().backward()
    assert flops.get_total_flops() == 3 * 2 * rows * n_in * n_out
    q = torch.randn(2, 4, 9, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 8, requires_grad=True) for _ in range(2))
    with counter() as flops:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        forward = flops.get_total_flops()
        out.sum().backward()
    assert forward == sdpa_flop_count(q.shape, k.shape, v.shape) > 0
    with FlopCounterMode(display=False) as plain:  # torch's own table: the CPU kernel is missing
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert plain.get_total_flops() == 0
    assert flops.get_total_flops() - forward == sdpa_backward_flop_count(out.shape, q.shape, k.shape, v.shape)


def test_counted_round_and_call_count_only_the_round_asked_for(tmp_path):
    """The peers' CountedRound counts from the end of step round-1 (or the train's begin) to the
    end of step `round`; count_call counts the call-th call; nothing else is counted."""
    import torch
    from bench.flop_count import CountedRound, count_call

    def matmul(n):  # 2 n^3 FLOPs
        torch.ones(n, n) @ torch.ones(n, n)

    for asked, want in ((1, 2 * 3 ** 3), (2, 2 * 4 ** 3), (3, 2 * 5 ** 3), (0, None)):
        counted = CountedRound(asked)
        counted.train_begin()
        for n in (3, 4, 5):
            matmul(n)
            counted.step_end()
        matmul(6)
        assert counted.flops == want, asked
    box = SimpleNamespace(work=matmul)
    count_call(box, "work", 2, tmp_path / "flops.json")
    for n in (3, 4, 5):
        box.work(n)
    assert json.loads((tmp_path / "flops.json").read_text()) == {"flops": 2 * 4 ** 3}


@pytest.mark.parametrize("args", [[], ["out.json", "0", "-m", "m"], ["out.json", "two", "-m", "m"],
                                  ["out.json", "2", "m"]])
def test_flop_count_refuses_a_bad_command_line_in_one_line(args):
    assert error_line(run_module("bench.flop_count", args)) == \
        "error: usage: python -m bench.flop_count OUT ROUND -m MODULE [ARGS...] (ROUND: 1 or more)"


@pytest.mark.slow
def test_step3s_own_flop_count_equals_what_its_round_ran(tmp_path):
    """utils.flops' count of a Step 3 round (PhaseFlops, logged as flops_per_sample) against
    torch's counter over that whole round as it ran (bench.flop_count: hybrid-engine generation,
    scoring, both updates), on a PPO round of tiny-llama with packed forwards."""
    from tests.helpers import assert_ok, logged_rows
    out, counted = tmp_path / "out", tmp_path / "counted.json"
    data = tmp_path / "prompts.jsonl"
    write_prompt_file(data, "tiny-llama", 24, 40)
    flags = throughput.ppo_command("zero2+hybrid", SimpleNamespace(
        actor="tiny-llama", critic="tiny-llama", batch=4, prompt_len=24, answer_len=8, rounds=2, dtype="fp32",
        seed=3), data, tmp_path, out)
    assert_ok(run_module("bench.flop_count", [counted, 2, "-m", "training.step3_rlhf_finetuning.main", *flags]))
    round_2 = [r for r in logged_rows(out / "logs" / "metrics.jsonl") if "train/flops_per_sample" in r][1]
    assert json.loads(counted.read_text())["flops"] == pytest.approx(
        round_2["train/flops_per_sample"] * round_2["train/answers"], rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear with a tied head; Conv1D
def test_generation_floor_reads_each_weight_once_and_is_below_a_real_generate(family):
    import time

    import torch

    from bench.peak import _linears, generation_floor_s
    from utils.flops import shape
    from utils.model import load_tokenizer, resolve_model_path
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(f"tiny-{family}-h256")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    s = shape(model.config, model)
    assert sum(w.numel() for w in _linears(model)) == s.weights + s.head_in * s.head_out
    rows, prompt_len, new = 4, 16, 12
    floor = generation_floor_s(model, rows, prompt_len, new, matmul_peak_flops("fp32", "cpu", 512, 2))
    ids = torch.randint(5, load_tokenizer(path).vocab_size, (rows, prompt_len))
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), min_new_tokens=new, max_new_tokens=new,
                             do_sample=True)
        best = min(best, time.perf_counter() - start)
    assert out.shape[1] == prompt_len + new
    assert 0 < floor < best  # a floor: the real generation runs these matmuls and more


def test_table_prints_each_rows_generation_against_its_floor(capsys):
    args = bench_args()
    results = {"zero2+hybrid": {"samples_per_s": 6.0, "generation_s": 2.0, **work(3, 48)},
               "trl ppo": {"samples_per_s": 2.0, "generation_s": 4.0, **work(3, 48)}}
    throughput.print_table(results, [5e11, 1e12], args, {"zero2+hybrid": 0.5, "trl ppo": 0.5})
    lines = capsys.readouterr().out.splitlines()
    # the peak is the best of the samples taken between the rows
    assert "matmul peak 1.0000 TFLOP/s (best of 2 samples between the rows, lowest 0.5000)" in lines[1]
    head, ours, trl = lines[2:5]
    assert "gen floor s" in head and "gen %floor" in head
    # the cells after the name: ..., gen s, gen floor s, gen %floor, ...; the last: the ratio to TRL
    assert ours.split()[1:][8:11] == ["2", "0.5", "25"] and ours.endswith("3.00x")
    assert trl.split()[2:][8:11] == ["4", "0.5", "12.5"]


def test_paired_gain_averages_seeds_per_prompt_before_comparing_with_sft():
    from bench.quality import paired_gain, verdict
    sft = [0.0, 1.0, 0.0, 1.0]
    runs = [[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]]  # each seed fixes one different prompt
    g = paired_gain(runs, sft)
    assert g["gain"] == pytest.approx(0.25)
    assert g["gain_se"] == pytest.approx(0.5 * (1 / 3) ** 0.5 / 2)  # stdev of [.5, 0, .5, 0] over sqrt(4)
    close = {"min": 0.5, "max": 0.5, **g}  # no seed spread, but the gain is within 2 SE
    assert "NOT larger" in verdict("PPO actor", close)
    assert "larger than both" in verdict("PPO actor", {"min": 0.5, "max": 0.5, "gain": 0.3, "gain_se": 0.1})


def test_by_task_averages_each_tasks_prompts_and_each_columns_models():
    from bench.quality import by_task, table
    tasks = ["add", "sort", "add", "sort"]
    rows = by_task(tasks, {"SFT": [[0.0, 1.0, 1.0, 0.0]], "PPO actor": [[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]]})
    assert rows == {"add": {"n": 2, "SFT": 0.5, "PPO actor": 0.75}, "sort": {"n": 2, "SFT": 0.5, "PPO actor": 0.5}}
    text = table({"scores": {}, "groups": {}, "other": {}, "by_task": rows})
    assert "| task | prompts | SFT | PPO actor |" in text and "| add | 2 | 0.500 | 0.750 |" in text


def test_quality_bench_refuses_policy_pairs_with_the_checker_as_reward(tmp_path):
    proc = run_module("bench.quality", ["--reward", "checker", "--policy_pairs", 8, "--output_dir", tmp_path])
    assert proc.returncode != 0 and "cannot go with --reward checker" in error_line(proc)


def test_side_by_side_runs_split_the_threads_and_get_their_own_ports(tmp_path, monkeypatch):
    import os
    import sys
    from bench.quality import run_side_by_side

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    show = "import os; print(os.environ['OMP_NUM_THREADS'], os.environ['MASTER_PORT'])"
    logs = [tmp_path / f"run{i}.log" for i in range(3)]
    run_side_by_side([([sys.executable, "-c", show], log) for log in logs], jobs=2)
    seen = [log.read_text().split() for log in logs]
    assert [threads for threads, _ in seen] == ["2", "2", "2"]
    assert len({port for _, port in seen}) == 3
    failing = [([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad.log")]
    with pytest.raises(SystemExit, match="exit 3"):
        run_side_by_side(failing, jobs=2)


def test_quality_bench_refuses_jobs_below_one(tmp_path):
    proc = run_module("bench.quality", ["--jobs", 0, "--output_dir", tmp_path])
    assert proc.returncode == 2 and error_line(proc) == "error: --jobs must be at least 1, got 0"


def test_packed_forwards_bench_reads_fewer_tokens_for_the_same_log_probs(tmp_path, capsys):
    import json
    from bench.packed_forwards import main
    out = tmp_path / "packed.json"
    main(["--model", "tiny-llama", "--rows", "6", "--repeats", "1", "--json", str(out)])
    padded, packed = json.loads(out.read_text())["rows"]
    assert (padded["packed"], packed["packed"]) == (False, True)
    assert packed["tokens"] < padded["tokens"] and packed["training_tflop"] < padded["training_tflop"]
    assert packed["max_abs_log_prob_gap"] < 1e-4
    assert "| fp32 | packed |" in capsys.readouterr().out
