"""The Step 3 benchmark's fixed work: prompt files whose prompts all come out exactly
--prompt_len tokens through our data layer, the same ids the TRL peer is given."""
from __future__ import annotations

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
