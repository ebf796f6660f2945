"""The Step 3 benchmark's fixed work: prompt files whose prompts all come out exactly
--prompt_len tokens through our data layer, the same ids the TRL peer is given; the quality
benchmark's paired statistics and its refusals."""
from __future__ import annotations

import pytest

from tests.helpers import error_line, run_module
from bench.peak import matmul_peak_flops
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


def test_matmul_peak_is_positive_and_finite():
    peak = matmul_peak_flops("fp32", "cpu", size=256, repeats=2)
    assert 1e8 < peak < 1e15


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
