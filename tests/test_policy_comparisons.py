"""Step 2's comparison data from the policy's own samples, ranked by a labeler."""
from __future__ import annotations

import json

import pytest

from training.step2_reward_model_finetuning import policy_comparisons as pc
from utils.data import bundled


def test_ranked_pairs_keep_every_differently_scored_pair_better_first():
    scores = {" 5": 1.0, " five": 0.5, " 6": 0.0, " 7": 0.0, " ": 1.0}
    pairs = pc.ranked_pairs("p", [" 5", " five", " 6", " 7", " 6", " "], lambda _, a: scores[a])
    got = {(p["chosen"], p["rejected"]) for p in pairs}
    # duplicates and blank answers dropped; equal scores (6 vs 7) make no pair
    assert got == {(" 5", " five"), (" 5", " 6"), (" 5", " 7"), (" five", " 6"), (" five", " 7")}
    assert all(p["prompt"] == "p" for p in pairs)


def test_prompts_are_step2s_share_only():
    """Neither Step 3's prompts nor the held-out test prompts are sampled for the reward model."""
    from utils.config import parse_data_split
    from utils.data.pipeline import gather_rows
    from utils.data.sources import BundledSource
    prompts = pc.step2_prompts("2,4,4", 600, 1234, 10_000)
    rows = gather_rows([BundledSource()], [], parse_data_split("2,4,4"), 3, 1234, 600)
    step3 = {s["prompt"] for _, s in rows["train"] + rows["eval"]}
    held_out = {s["prompt"] for s in BundledSource().load(1234).eval}
    assert prompts and not set(prompts) & step3 and not set(prompts) & held_out
    assert all(bundled.is_task_prompt(p) for p in prompts)


def test_samples_of_a_model_become_pairs_in_a_step2_readable_file(tmp_path, monkeypatch):
    # a random tiny model gets every task wrong: label by answer length so pairs exist
    monkeypatch.setattr(bundled, "score", lambda prompt, answer: float(len(answer) % 3))
    out = tmp_path / "pairs.jsonl"
    pc.main(["--model_name_or_path", "tiny-llama", "--output_file", str(out), "--num_prompts", "4",
             "--samples_per_prompt", "3", "--max_new_tokens", "6", "--num_examples", "200"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(len(r["chosen"]) % 3 > len(r["rejected"]) % 3 for r in rows)
    from utils.data import load_raw_dataset
    raw = load_raw_dataset(str(out))  # Step 2 reads it like any local pair file
    assert raw.has_rejected and len(raw.train) + len(raw.eval) == len(rows)


def test_existing_output_and_bad_sizes_are_refused(tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    out.write_text("keep\n")
    for argv in (["--output_file", str(out)], ["--output_file", str(tmp_path / "x"), "--samples_per_prompt", "1"]):
        with pytest.raises(SystemExit) as err:
            pc.parse_args(["--model_name_or_path", "tiny-llama", *argv])
        assert err.value.code == 2
    assert out.read_text() == "keep\n"
