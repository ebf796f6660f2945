"""DeepSpeed config builder, user overrides, atomic directory writes, the shared flag parser."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT
from utils.cli import free_port
from utils.dist import on_cuda
from utils.strategy.ds_config import effective_zero_stage, eval_ds_config, load_user_ds_config, train_ds_config
from utils.strategy.export import own_storage
from utils.fs import atomic_directory_write, check_output_dir
from utils.strategy.optim import create_adam_state, optimizer_param_groups
from utils.config import ConfigError, parse_config, parse_data_split



def test_train_config_stages_offload_and_user_override():
    cfg = train_ds_config(micro_batch=4, grad_accum=2, zero_stage=3, offload=True, dtype="fp32",
                             user_config=load_user_ds_config(str(ROOT / "configs/ds_override_example.json")))
    assert cfg["train_batch_size"] == 8 and cfg["gradient_accumulation_steps"] == 2
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == 200000000  # user value wins, siblings kept
    assert cfg["gradient_clipping"] == 0.5 and "bf16" not in cfg and "fp16" not in cfg
    assert train_ds_config(micro_batch=1, dtype="bf16")["bf16"] == {"enabled": True}


def test_one_process_runs_zero_1_and_2_as_stage_0_unless_offload_or_the_user_says():
    assert [effective_zero_stage(s, False, 1) for s in range(4)] == [0, 0, 0, 3]
    assert [effective_zero_stage(s, False, 2) for s in range(4)] == [0, 1, 2, 3]
    assert [effective_zero_stage(s, True, 1) for s in (1, 2, 3)] == [1, 2, 3]
    assert train_ds_config(micro_batch=1, zero_stage=2)["zero_optimization"]["stage"] == 0
    forced = train_ds_config(micro_batch=1, zero_stage=2, user_config={"zero_optimization": {"stage": 2}})
    assert forced["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_step3_at_stage_0_equals_zero_2_on_one_process(tmp_path, dtype):
    """The reason one process may run ZeRO-2 as stage 0 (without the all-reduce over itself):
    the same rounds, the same weights."""
    from safetensors.torch import load_file
    from tests.helpers import assert_ok, logged_rows, run_module
    from utils.model import resolve_model_path
    forced = tmp_path / "zero2.json"
    forced.write_text('{"zero_optimization": {"stage": 2}}')
    flags = ["--actor_model_name_or_path", "tiny-llama", "--critic_model_name_or_path", "tiny-llama",
             "--num_examples", "64", "--per_device_generation_batch_size", "4",
             "--per_device_training_batch_size", "2", "--max_prompt_seq_len", "32", "--max_answer_seq_len", "8",
             "--actor_learning_rate", "1e-3", "--critic_learning_rate", "1e-3", "--dtype", dtype,
             "--max_rounds", "3", "--gradient_accumulation_steps", "2", "--disable_tqdm", "--log_interval", "1", "--actor_zero_stage", "2",
             "--critic_zero_stage", "2"]
    outs = {name: tmp_path / name for name in ("auto", "forced")}
    runs = {name: run_module("training.step3_rlhf_finetuning.main", [*flags, "--output_dir", out,
                             *(["--deepspeed_config", forced] if name == "forced" else [])])
            for name, out in outs.items()}
    for proc in runs.values():
        assert_ok(proc)
    assert "running it as stage 0" in runs["auto"].stdout and "running it as" not in runs["forced"].stdout
    rows = {name: [r for r in logged_rows(out / "logs" / "metrics.jsonl") if "train/actor_loss" in r]
            for name, out in outs.items()}
    assert len(rows["auto"]) == 3
    # bf16: the first two rounds agree exactly, then rounding in the two optimizers' code paths
    # shows (fp32 accumulation at stage 0); what must hold is that both moved the same way
    rel, near, share = (1e-4, 1e-6, 1e-4) if dtype == "fp32" else (2e-2, 5e-3, 0.1)
    for auto, zero2 in zip(rows["auto"], rows["forced"]):
        for key in ("train/reward", "train/actor_loss", "train/critic_loss", "train/kl"):
            assert auto[key] == pytest.approx(zero2[key], rel=rel, abs=near), key
    start = load_file(Path(resolve_model_path("tiny-llama")) / "model.safetensors")
    auto, zero2 = (load_file(out / "actor" / "model.safetensors") for out in outs.values())
    apart = sum((auto[k].float() - zero2[k].float()).norm() ** 2 for k in auto) ** 0.5
    moved = sum((zero2[k].float() - start[k].float()).norm() ** 2 for k in auto) ** 0.5
    assert moved > 0 and apart <= share * moved, (apart, moved)


def test_eval_config_partitions_only_under_zero3():
    assert eval_ds_config(micro_batch=2, zero_stage=2)["zero_optimization"]["stage"] == 0
    cfg = eval_ds_config(micro_batch=2, zero_stage=3, offload=True)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("kwargs,message", [
    ({"zero_stage": 0, "offload": True}, "--offload needs ZeRO"),
    ({"dtype": "fp16"}, "fp16 needs a CUDA device"),
    ({"zero_stage": 5}, "--zero_stage 5"),
])
def test_impossible_combinations_are_refused(kwargs, message):
    if kwargs.get("dtype") == "fp16" and on_cuda():
        pytest.skip("fp16 is valid on CUDA")
    with pytest.raises(ConfigError, match=message):
        train_ds_config(micro_batch=1, **kwargs)


def test_user_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_user_ds_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_user_ds_config(str(bad))


def test_atomic_write_keeps_old_contents_when_writer_fails(tmp_path):
    out = tmp_path / "model"
    atomic_directory_write(out, lambda d: (d / "weights").write_text("v1"))
    (out / "logs").mkdir()
    (out / "logs" / "metrics.jsonl").write_text("{}\n")

    def crash(d):
        (d / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_directory_write(out, crash)
    assert (out / "weights").read_text() == "v1"
    atomic_directory_write(out, lambda d: (d / "weights").write_text("v2"), keep=("logs",))
    assert (out / "weights").read_text() == "v2"
    assert (out / "logs" / "metrics.jsonl").read_text() == "{}\n"  # the run's logs survive
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp folders left


def test_check_output_dir(tmp_path):
    check_output_dir(str(tmp_path / "new"), overwrite=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="--overwrite_output_dir"):
        check_output_dir(str(tmp_path / "full"), overwrite=False)
    check_output_dir(str(tmp_path / "full"), overwrite=True)


def test_param_groups_split_decay_norms_and_lora():
    import torch
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 4), "norm": torch.nn.LayerNorm(4)})
    model.lora_A = torch.nn.Parameter(torch.zeros(2, 4))
    groups = optimizer_param_groups(model, weight_decay=0.1, lora_lr=5e-4)
    by_decay = {(g["weight_decay"], g.get("lr")): len(g["params"]) for g in groups}
    assert by_decay == {(0.1, None): 1, (0.0, None): 3, (0.0, 5e-4): 1}



@pytest.mark.parametrize("options", [{"fused": True}, {"foreach": True}, {"foreach": False, "amsgrad": True}])
@pytest.mark.parametrize("adam", [torch.optim.AdamW, torch.optim.Adam])
def test_adam_state_created_before_the_first_step_is_what_that_step_would_create(adam, options):
    """create_adam_state makes the first step's state itself (same keys, dtypes, devices, zeros),
    so the steps after it are bitwise those of a lazily created state; state already there (a
    resumed run's) is left as it is, and other optimizers stay lazy."""
    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
        groups = optimizer_param_groups(model, weight_decay=0.1, lora_lr=0.0)
        return model, adam(groups, lr=1e-2, betas=(0.9, 0.95), **options)

    (early, early_opt), (lazy, lazy_opt) = model_and_optimizer(), model_and_optimizer()
    n_params = sum(p.numel() for p in early.parameters())
    assert create_adam_state(early_opt) == (3 if options.get("amsgrad") else 2) * 4 * n_params
    for step in range(3):
        for model, optimizer in ((early, early_opt), (lazy, lazy_opt)):
            torch.manual_seed(step)
            model(torch.randn(4, 6)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(early.parameters(), lazy.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(early.parameters(), lazy.parameters()):
        mine, torchs = early_opt.state[p], lazy_opt.state[q]
        assert mine.keys() == torchs.keys()
        for key in mine:
            assert (mine[key].dtype, mine[key].device) == (torchs[key].dtype, torchs[key].device), key
            assert torch.equal(mine[key], torchs[key]), key
    steps_taken = next(iter(early_opt.state.values()))["step"].item()
    assert create_adam_state(early_opt) == 0 and next(iter(early_opt.state.values()))["step"].item() == steps_taken
    sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert create_adam_state(sgd) == 0 and not sgd.state


def test_shared_parser_dashes_types_and_split():
    from training.step1_supervised_finetuning.main import SFTConfig
    cfg = parse_config(SFTConfig, ["--data-path", "a", "b", "--zero-stage=3", "--no-add-eot-token",
                                   "--learning_rate", "3e-4"])
    assert cfg.data_path == ["a", "b"] and cfg.zero_stage == 3 and cfg.add_eot_token is False
    assert cfg.learning_rate == 3e-4 and cfg.output_dir == "output/step1_sft"
    assert parse_data_split("2,4,4") == [0.2, 0.4, 0.4]
    for bad in ("2,4", "a,b,c", "-1,1,1", "0,0,0"):
        with pytest.raises(ConfigError, match="--data_split"):
            parse_data_split(bad)



SHM_PROBE = """
import os, torch, torch.distributed as dist
from pathlib import Path
from utils.strategy import DeepSpeedStrategy
strategy = DeepSpeedStrategy()
strategy.setup_distributed()
mine = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                           f"{os.environ['MASTER_PORT']}_{dist.get_rank()}")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print("RESULT", mine.exists(), t.item(), flush=True)
strategy.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_cpu_shm_buffer_does_not_outlive_the_run(nproc):
    """DeepSpeed's CPU all-reduce buffer (66 MB of /dev/shm per process) used to stay behind
    after every run; init_distributed removes its name once all ranks have mapped it. (The
    2-process tensor-parallel tests use DeepSpeed's shm all-reduce after that.)"""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc)}
    procs = [subprocess.Popen([sys.executable, "-c", SHM_PROBE], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(nproc)]
    outs = [p.communicate(timeout=300) for p in procs]
    from tests.helpers import describe
    assert all(p.returncode == 0 for p in procs), "\n".join(describe(p, *o) for p, o in zip(procs, outs))
    results = [line.split()[1:] for out, _ in outs for line in out.splitlines() if line.startswith("RESULT")]
    assert results == [["False", str(float(sum(range(1, nproc + 1))))]] * nproc
    leftover = Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{env['MASTER_PORT']}_*")
    assert not list(leftover)


def test_own_storage_copies_only_views_of_larger_storage():
    """ZeRO hands back parameters as views of flat buffers; safetensors refuses a view that
    does not cover its storage, so those (and only those) are copied."""
    from safetensors.torch import save

    flat = torch.arange(10.0)
    view = flat[2:6].view(2, 2)
    whole = torch.ones(3)
    assert own_storage(whole).data_ptr() == whole.data_ptr()  # not copied
    copied = own_storage(view)
    assert copied.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
    assert torch.equal(copied, view)
    save({"a": copied, "b": own_storage(flat[6:])})  # would raise for the views themselves
