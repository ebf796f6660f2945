"""The memory benchmark (bench/memory.py): its per-component accounting counts each tensor
storage once (ZeRO's flat buffers and the hybrid engine's inference copy alias the actor's
weights) and never more than the process holds; the shapes' configs are the real models'
sizes; one end-to-end case on a tiny model gives a finished row."""
from __future__ import annotations

import argparse

import pytest
import torch

from bench import memory


def test_an_aliased_storage_counts_once_in_the_first_component():
    ledger = memory.Ledger()
    flat = torch.zeros(1000)
    ledger.add("actor_weights", flat[:500])  # a view: its whole storage is held
    ledger.add("actor_weights", flat[500:])
    ledger.add("inference_copy", flat.view(10, 100))
    ledger.add("actor_grads", torch.zeros(10, dtype=torch.bfloat16))
    assert ledger.bytes["actor_weights"] == 4000
    assert ledger.bytes["inference_copy"] == 0
    assert ledger.bytes["actor_grads"] == 20


def test_a_buffer_reserved_but_never_written_is_not_resident():
    """ZeRO-3 reserves its whole gradient bucket (--reduce_bucket_size elements); RSS counts only
    the pages written, and so does the ledger (its full size is kept as `allocated`)."""
    ledger = memory.Ledger()
    # 400 MB of address space: above utils.allocator.MMAP_THRESHOLD, so fresh pages even where a
    # training run in this process had glibc keep freed blocks
    bucket = torch.empty(100_000_000)
    bucket[:1000] = 1.0
    ledger.add("actor_grads", bucket)
    assert ledger.allocated["actor_grads"] == 400_000_000
    assert ledger.bytes["actor_grads"] < 1_000_000
    written = torch.randn(1_000_000)
    ledger.add("actor_optimizer", written)
    assert ledger.bytes["actor_optimizer"] == 4_000_000


def test_optimizer_walk_finds_the_state_and_the_gradient_buffers():
    """A torch optimizer's state is found through its parameter-keyed dict; a held .grad and an
    attribute named for gradients count as gradients, the rest as optimizer state."""
    model = torch.nn.Linear(10, 10, bias=False)
    model(torch.ones(2, 10)).sum().backward()
    opt = torch.optim.AdamW(model.parameters())
    opt.step()

    class Engine:
        module, optimizer = model, opt

    ledger = memory.Ledger()
    memory.count_trained(ledger, Engine(), "actor")
    assert ledger.bytes["actor_weights"] == 400 and ledger.bytes["actor_grads"] == 400
    assert ledger.bytes["actor_optimizer"] >= 800  # exp_avg + exp_avg_sq (+ the step count)
    paths = [path for path, _ in memory.reachable_tensors({"averaged_gradients": [torch.ones(3)]})]
    assert paths == [".averaged_gradients.0"]


@pytest.mark.parametrize("name, millions", [("opt-125m", 125), ("smollm2-135m-shape", 135), ("opt-350m", 331),
                                            ("smollm2-360m", 362), ("tinyllama-1.1b", 1100), ("opt-1.3b", 1316),
                                            ("smollm2-1.7b", 1711)])
def test_shapes_have_the_real_models_sizes(name, millions):
    """Counted on the meta device (nothing allocated): within 1% of the published sizes."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from utils.model.tiny import tokenizer_path
    config = memory.shape_config(name, PreTrainedTokenizerFast.from_pretrained(tokenizer_path()))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert memory.parameter_count(model) / 1e6 == pytest.approx(millions, rel=0.01)


def test_shapes_are_in_ascending_size():
    """--find_largest stops at the first that does not fit: the walk must go up in size."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from utils.model.tiny import tokenizer_path
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_path())
    sizes = []
    for name in memory.SHAPES:
        with torch.device("meta"):
            sizes.append(memory.parameter_count(AutoModelForCausalLM.from_config(memory.shape_config(name, tokenizer))))
    assert sizes == sorted(sizes)


def test_one_case_end_to_end_gives_a_finished_row_whose_parts_fit_in_its_peak(tmp_path):
    args = memory.build_parser().parse_args(["--actor", "tiny-llama", "--batch", "2", "--prompt_len", "16",
                                             "--answer_len", "8", "--num_examples", "40",
                                             "--workdir", str(tmp_path)])
    (case,) = memory.cases(args)
    row = memory.run_case(case, args)
    assert row["finished"], row.get("output_tail")
    assert row["status"] == "finished" and len(row["peak_rss_gb"]) == 1
    parts = row["parts_gb"]
    assert set(parts) == {*memory.COMPONENTS, "other"}
    assert parts["other"] > 0  # the counted parts fit in the process's peak
    for snap in row["ranks"][0]["snapshots"].values():  # each count fits in what was resident then
        assert sum(snap["bytes"].values()) <= snap["rss_kib"] * 1024
    # fp32 full fine-tuning, ZeRO-2 asked, stage 0 run (one process): 4-byte weights and
    # gradients, Adam's two moments and no fp32 master copy (ZeRO-2 kept one: 12 bytes)
    per_param = row["bytes_per_actor_param"]
    assert per_param["actor_weights"] == pytest.approx(4.0, abs=0.01)
    assert per_param["actor_grads"] == pytest.approx(4.0, abs=0.05)
    assert per_param["actor_optimizer"] == pytest.approx(8.0, abs=0.05)
    assert per_param["inference_copy"] < 0.01  # shares the actor's storage under ZeRO 0-2
    assert per_param["ema"] == 0
    memory.report([row], argparse.Namespace(json=str(tmp_path / "rows.json")), "title")
    assert (tmp_path / "rows.json").is_file()


def test_a_rank_killed_by_the_kernel_reads_as_did_not_fit():
    """One process: exit -9. Under the deepspeed launcher, which exits with its first failed
    rank's code (sys.exit(-9) is 247) or logs it: the log line."""
    from subprocess import CompletedProcess
    assert memory.killed(CompletedProcess([], -9, "", ""))
    assert memory.killed(CompletedProcess([], 247, "", ""))
    assert memory.killed(CompletedProcess([], 1, "", "[launch.py] ... exits with return code = -9"))
    assert not memory.killed(CompletedProcess([], 1, "", "Traceback ... ValueError"))
