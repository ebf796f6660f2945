"""Step 3's memory per process: what fits on this machine, and where the bytes go.

Each case is the real Step 3 (`training.step3_rlhf_finetuning.main`, through `python -m` for one
process and the `deepspeed --num_gpus N` launcher for more, as the slow tests start it) run for
2 rounds plus its final save, in its own subprocess, on the CPU. Recorded per case:
  peak RSS  each rank's own VmHWM, printed by the rank after its save (Step 3's logged
            train/peak_memory_gb is each rank's ru_maxrss at a round's end *averaged* over the
            ranks, and is taken before the save, so it is not used here)
  finished  exit code 0, every rank reported, and the actor (and critic) folders saved
  wall      seconds of the whole subprocess (model loads, 2 rounds, save)
  parts     bytes per component, counted on the live engines in round 2 (the optimizer state
            exists after round 1's step): once just before the actor's first optimizer step and
            once just before the critic's, while their gradients are held; each component's larger
            count is kept. Bytes resident in RAM (mincore), as RSS counts them: a buffer reserved
            but never written is left out (its whole size is kept in the JSON as "allocated"). Tensor storages are counted once (by data_ptr), in COMPONENTS' order:
            ZeRO's flat buffers alias the parameters, and the hybrid engine's inference copy shares
            the actor's storage under ZeRO 0-2 (only LoRA's fused weights are its own), so a
            shared storage counts in the first component that holds it. optimizer = everything
            else the ZeRO/torch optimizer holds (fp32 master partitions, Adam moments). other =
            peak RSS - the parts: activations, the allocator's free pages, libraries, the save.
            GB = 2**30 bytes, as Step 3's peak_memory_gb. Printed for rank 0, every rank in the
            JSON; and each part per actor parameter (bytes / parameter, LoRA's adapters counted).

Models: random-initialised models of real families' shapes (SHAPES: hyper-parameters written
here, nothing downloaded), built once into <RLHFKIT_CACHE>/models/bench-<name> with bf16
weights (half the disk; a run loads them in its --dtype), each in its own subprocess. They share
the tiny tokenizer (utils/model/tiny.py) with each shape's real vocabulary size, larger than the
tokenizer's, so the embeddings keep the real shape. The critic and reward model are the critic
shape loaded as a reward model (its LM head dropped, a value head added), as in
bench.step3_throughput. Any other name the project resolves (tiny-llama, a folder) is used as is.

    python -m bench.memory --actor smollm2-135m-shape                      # one case
    python -m bench.memory --actor opt-1.3b --critic opt-350m --modes full lora --zero_stages 2 3 \\
        --processes 1 2 --ema off on --json memory.json
    python -m bench.memory --find_largest --zero_stages 3 --json largest.json   # largest that fits

`--find_largest` walks SHAPES by size, for full fine-tuning and for LoRA (--actor_lora_dim 8
--only_optimize_lora), and stops each walk at the first actor whose run does not finish (a rank
killed by the kernel: "did not fit"). Nothing caps the children's memory: the machine's own
limit decides, so run it on a machine nothing else is using.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.child import child_env, report_table

RESULTS = "BENCH_MEMORY_RESULTS"  # the folder where each rank of a case writes rank<N>.json

# ------------------------------------------------------------------ shapes

# name: (family, the real model's hyper-parameters), ascending by parameter count
SHAPES = {
    "opt-125m": ("opt", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                             word_embed_proj_dim=768, vocab_size=50272, max_position_embeddings=2048,
                             do_layer_norm_before=True)),
    "smollm2-135m-shape": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                         tie_word_embeddings=True)),
    "opt-350m": ("opt", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                             word_embed_proj_dim=512, vocab_size=50272, max_position_embeddings=2048,
                             do_layer_norm_before=False)),
    "smollm2-360m": ("llama", dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
                                   num_key_value_heads=5, intermediate_size=2560, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)),
    "tinyllama-1.1b": ("llama", dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                                     num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                                     max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                                     tie_word_embeddings=False)),
    "opt-1.3b": ("opt", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                             word_embed_proj_dim=2048, vocab_size=50272, max_position_embeddings=2048,
                             do_layer_norm_before=True)),
    "smollm2-1.7b": ("llama", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                                   num_key_value_heads=32, intermediate_size=8192, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=130000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)),
}
SHAPE_VERSION = 1  # bump when a shape or the build recipe changes: cached builds are redone


def shape_config(name: str, tokenizer):
    """The shape's config, with the tokenizer's special ids (the vocabulary stays the real one,
    which holds the tokenizer's ids)."""
    from transformers import AutoConfig
    family, kwargs = SHAPES[name]
    if kwargs["vocab_size"] < len(tokenizer):
        raise ValueError(f"{name}: vocab {kwargs['vocab_size']} is smaller than the tokenizer's {len(tokenizer)}")
    return AutoConfig.for_model(family, **kwargs, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_shape(name: str, out: Path) -> None:
    """Seeded random init in bf16, saved as a plain HF folder with the tiny tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    from utils.model.cache import save_model
    from utils.model.tiny import save_tokenizer, tokenizer_path
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_path())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SHAPE_VERSION)
        model = AutoModelForCausalLM.from_config(shape_config(name, tokenizer), torch_dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    save_model(model, out)
    save_tokenizer(tokenizer, out)


def shape_path(name: str) -> Path:
    """The shape's cached folder, built on first use (in this process)."""
    from utils.config import cache_dir
    from utils.model.cache import MODEL_FILES, build_once, read_stamp
    from utils.model.tiny import tokenizer_path
    stamp = {"kind": f"bench-{name}", "version": SHAPE_VERSION, "shape": SHAPES[name],
             "tokenizer": read_stamp(tokenizer_path())}
    return build_once(cache_dir() / "models" / f"bench-{name}", json.loads(json.dumps(stamp)),
                      lambda tmp: build_shape(name, tmp), required=MODEL_FILES)


def model_path(name: str) -> str:
    """A shape's folder, built first in a subprocess of its own (a 1.7B build holds several GB
    this process should not keep); any other name as given (Step 3 resolves it)."""
    if name not in SHAPES:
        return name
    proc = subprocess.run([sys.executable, "-m", "bench.memory", "--build", name], capture_output=True, text=True,
                          env=child_env("cpu"))
    if proc.returncode:
        raise SystemExit(f"building {name} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


# ------------------------------------------------------------------ accounting

COMPONENTS = ("actor_weights", "actor_grads", "actor_optimizer", "reference", "ema", "critic_weights",
              "critic_grads", "critic_optimizer", "reward", "inference_copy")
GRAD_WORDS = ("grad", "ipg")  # optimizer attributes that hold gradients (ZeRO's buckets, partitions)


PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(ptr: int, size: int) -> int:
    """How many of the `size` bytes at `ptr` are in RAM now (mincore(2)): a buffer allocated
    but never written (ZeRO-3 reserves its whole gradient bucket, --reduce_bucket_size elements)
    holds address space, not memory. `size` when the kernel cannot tell."""
    import ctypes

    import numpy as np
    start = ptr - ptr % PAGE
    pages = (ptr + size - start + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * PAGE), vec) != 0:
        return size
    resident = np.frombuffer(vec, dtype=np.uint8) & 1
    overlap = np.full(pages, PAGE, dtype=np.int64)  # each page's bytes of the buffer
    overlap[0] -= ptr - start
    overlap[-1] -= start + pages * PAGE - (ptr + size)
    return int((resident * overlap).sum())


class Ledger:
    """Bytes per component, each tensor storage counted once (the first component to add it):
    `bytes` resident in RAM (what RSS counts), `allocated` the storages' whole sizes."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes = dict.fromkeys(COMPONENTS, 0)
        self.allocated = dict.fromkeys(COMPONENTS, 0)

    def add(self, component: str, tensor) -> None:
        import torch
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" or tensor.is_meta:
            return
        storage = tensor.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or ptr in self.seen:
            return
        self.seen.add(ptr)
        self.bytes[component] += resident_bytes(ptr, size)
        self.allocated[component] += size


def module_tensors(module):
    """A module's parameters (ZeRO-3: also each one's partition, ds_tensor) and buffers."""
    for p in module.parameters():
        yield p.data
        if getattr(p, "ds_tensor", None) is not None:
            yield p.ds_tensor
    yield from module.buffers()


def module_grads(module):
    for p in module.parameters():
        if p.grad is not None:
            yield p.grad


def reachable_tensors(obj, path: str = "", seen: set | None = None, depth: int = 0):
    """(path, tensor) for every tensor an optimizer holds: through dicts, lists, tuples, torch
    optimizers and DeepSpeed's objects (not into nn.Modules: their parameters are the weights),
    each tensor's .grad included."""
    import torch
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
        if obj.grad is not None:
            yield path + ".grad", obj.grad
        return
    if isinstance(obj, torch.nn.Module):
        return
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple, set)):
        items = enumerate(obj)
    elif isinstance(obj, torch.optim.Optimizer):
        items = (("state", obj.state), ("param_groups", obj.param_groups))
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        items = vars(obj).items()
    else:
        return
    for key, value in list(items):
        name = key if isinstance(key, (str, int)) else type(key).__name__  # a state dict's keys are parameters
        yield from reachable_tensors(value, f"{path}.{name}", seen, depth + 1)


def count_trained(ledger: Ledger, engine, role: str) -> None:
    """A trained DeepSpeed engine: its weights, then gradients, then the rest of its optimizer."""
    for t in module_tensors(engine.module):
        ledger.add(f"{role}_weights", t)
    for g in module_grads(engine.module):
        ledger.add(f"{role}_grads", g)
    held = list(reachable_tensors(engine.optimizer))
    for path, t in held:  # gradients first: a grad bucket must not count as optimizer state
        if any(word in path.lower() for word in GRAD_WORDS):
            ledger.add(f"{role}_grads", t)
    for _, t in held:
        ledger.add(f"{role}_optimizer", t)


def component_bytes(engine, hybrid=None, allocated: bool = False) -> dict:
    """{component: resident bytes} (`allocated`: the storages' sizes) of a built
    DeepSpeedRLHFEngine (and the trainer's HybridEngine) on this process, each storage counted
    once in COMPONENTS' order."""
    ledger = Ledger()
    count_trained(ledger, engine.actor, "actor")
    frozen = {"reference": engine.ref, "ema": engine.actor_ema}
    for name, model in frozen.items():
        if model is not None:
            for t in module_tensors(model.module):
                ledger.add(name, t)
    if engine.critic is not None:
        count_trained(ledger, engine.critic, "critic")
    if engine.reward is not None:
        for t in module_tensors(engine.reward.module):
            ledger.add("reward", t)
    copy = hybrid.inference_model if hybrid is not None else None
    if copy is not None:
        for t in module_tensors(copy):
            ledger.add("inference_copy", t)
    return ledger.allocated if allocated else ledger.bytes


def parameter_count(module) -> int:
    """Whole parameters (ZeRO-3: each one's full size), each counted once."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += getattr(p, "ds_numel", None) or p.numel()
    return total


def rss_kib(field: str = "VmHWM") -> int:
    """This process's peak (VmHWM) or current (VmRSS) resident memory, KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ------------------------------------------------------------------ the child: Step 3 with two hooks

def child_main(argv: list[str]) -> None:
    """Step 3 with `argv`, the parts counted in round 2 before each trained model's first step;
    after the save, each rank writes its rank<N>.json into $BENCH_MEMORY_RESULTS."""
    from training.step3_rlhf_finetuning import loop
    from training.step3_rlhf_finetuning.main import main as step3_main
    from utils.strategy.deepspeed_strategy import DeepSpeedStrategy

    state = {"round": -1, "trainer": None, "snapshots": {}}
    one_round, backward_and_step = loop.one_round, DeepSpeedStrategy.backward_and_step

    def counted_round(each, batches, round_index):
        state["round"], state["trainer"] = round_index, each.trainer
        return one_round(each, batches, round_index)

    def counted_step(engine, loss, graph_output, boundary=True):
        trainer = state["trainer"]
        role = "actor" if trainer is not None and engine is trainer.actor else "critic"
        if state["round"] != 1 or not boundary or role in state["snapshots"]:
            return backward_and_step(engine, loss, graph_output, boundary)
        step = engine.step

        def snapshot_then_step(*a, **k):
            state["snapshots"][role] = {"bytes": component_bytes(trainer.rlhf_engine, trainer.hybrid),
                                        "allocated": component_bytes(trainer.rlhf_engine, trainer.hybrid, True),
                                        "rss_kib": rss_kib("VmRSS")}
            return step(*a, **k)

        engine.step = snapshot_then_step
        try:
            return backward_and_step(engine, loss, graph_output, boundary)
        finally:
            del engine.step

    loop.one_round, DeepSpeedStrategy.backward_and_step = counted_round, staticmethod(counted_step)
    step3_main(argv)
    snaps = state["snapshots"]
    parts = {c: max((s["bytes"][c] for s in snaps.values()), default=0) for c in COMPONENTS}
    engine = state["trainer"].rlhf_engine if state["trainer"] is not None else None
    rank = int(os.environ.get("RANK", 0))  # the process group is gone after Step 3's shutdown
    result = {"rank": rank, "peak_rss_kib": rss_kib(), "parts": parts, "snapshots": snaps,
              "actor_params": parameter_count(engine.actor.module) if engine else None}
    # a file per rank: the ranks' lines on the launcher's shared stdout can interleave
    (Path(os.environ[RESULTS]) / f"rank{rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------ the parent: cases

def case_name(case: dict) -> str:
    critic = "" if case["critic"] == case["actor"] else f" + critic {case['critic']}"
    return (f"{case['actor']}{critic}, {case['mode']}, ZeRO-{case['zero_stage']}"
            f"{', EMA' if case['ema'] else ''}, {case['dtype']}{', ' + case['extra'] if case.get('extra') else ''}")


def step3_args(case: dict, args, actor: str, critic: str, out: Path) -> list[str]:
    lora = ["--actor_lora_dim", "8", "--only_optimize_lora"] if case["mode"] == "lora" else []
    return ["--actor_model_name_or_path", actor, "--critic_model_name_or_path", critic,
            "--num_examples", str(args.num_examples), "--data_output_path", str(out.parent / "data"),
            "--per_device_generation_batch_size", str(args.batch), "--per_device_training_batch_size", str(args.batch),
            "--max_prompt_seq_len", str(args.prompt_len), "--max_answer_seq_len", str(args.answer_len),
            "--ignore_eos", "--num_warmup_steps", "0", "--max_rounds", "2", "--dtype", case["dtype"],
            "--actor_zero_stage", str(case["zero_stage"]), "--critic_zero_stage", str(case["zero_stage"]),
            *(["--enable_ema"] if case["ema"] else []), *lora, *shlex.split(args.step3_args or ""),
            "--disable_tqdm", "--output_dir", str(out)]


def launcher(processes: int) -> list[str]:
    """How the tests start Step 3: plain python for one process, the deepspeed launcher for more."""
    if processes == 1:
        return [sys.executable, "-m", "bench.memory", "--child"]
    from utils.cli import deepspeed_launcher, free_port
    return [deepspeed_launcher(), "--num_gpus", str(processes), "--master_port", str(free_port()), "--module", "bench.memory", "--child"]


def killed(proc: subprocess.CompletedProcess) -> bool:
    """A process (or, under the launcher, a rank) was killed by SIGKILL: the kernel's OOM killer."""
    text = proc.stdout + proc.stderr
    return proc.returncode in (-9, 137, 247) or bool(re.search(r"(return code|exit code|exits with)\D*-9\b", text))


def run_case(case: dict, args) -> dict:
    """One case in its own subprocess (2 rounds + save); its row."""
    actor, critic = model_path(case["actor"]), model_path(case["critic"])
    with tempfile.TemporaryDirectory(prefix="memory-bench-", dir=args.workdir) as tmp:
        out = Path(tmp) / "out"
        cmd = [*launcher(case["processes"]), *step3_args(case, args, actor, critic, out)]
        start = time.perf_counter()
        results = Path(tmp) / "results"
        results.mkdir()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**child_env("cpu"), RESULTS: str(results)})
        wall = time.perf_counter() - start
        saved = all((out / folder / "model.safetensors").is_file() for folder in ("actor", "critic"))
        ranks = sorted((json.loads(f.read_text()) for f in results.glob("rank*.json")), key=lambda r: r["rank"])
    finished = proc.returncode == 0 and saved and len(ranks) == case["processes"]
    row = {**case, "case": case_name(case), "finished": finished, "wall_s": wall, "returncode": proc.returncode,
           "status": "finished" if finished else "did not fit (killed)" if killed(proc) else "failed",
           "peak_rss_gb": [r["peak_rss_kib"] / 2**20 for r in ranks], "ranks": ranks}
    if ranks:
        first = ranks[0]
        row["actor_params"] = first["actor_params"]
        row["parts_gb"] = {c: b / 2**30 for c, b in first["parts"].items()}
        row["parts_gb"]["other"] = first["peak_rss_kib"] / 2**20 - sum(row["parts_gb"].values())
        if first["actor_params"]:
            row["bytes_per_actor_param"] = {c: gb * 2**30 / first["actor_params"] for c, gb in row["parts_gb"].items()}
    if not finished:
        row["output_tail"] = (proc.stdout[-1500:] + "\n" + proc.stderr[-2500:]).strip()
    return row


def cases(args) -> list[dict]:
    return [dict(actor=actor, critic=args.critic or actor, mode=mode, zero_stage=stage, processes=n,
                 ema=ema == "on", dtype=args.dtype, extra=args.step3_args or "")
            for actor, mode, stage, n, ema in itertools.product(args.actor, args.modes, args.zero_stages,
                                                                 args.processes, args.ema)]


def find_largest(args) -> tuple[list[dict], dict]:
    """For each mode: SHAPES in order until a run does not finish; {mode: largest finished actor}."""
    rows, largest = [], {}
    for mode in args.modes:
        largest[mode] = None
        for shape in SHAPES:
            case = dict(actor=shape, critic=args.critic or shape, mode=mode, zero_stage=args.zero_stages[0],
                        processes=args.processes[0], ema=args.ema[0] == "on", dtype=args.dtype)
            print(f"running {case_name(case)}, {case['processes']} process(es) ...", flush=True)
            rows.append(run_case(case, args))
            if not rows[-1]["finished"]:
                break
            largest[mode] = shape
    return rows, largest


def gb(value) -> str:
    return f"{value:.2f}" if value is not None else "-"


def parts_cells(key: str, fmt) -> dict:
    return {c.replace("_", " "): (lambda r, c=c: fmt(r[key][c]) if key in r else "-") for c in (*COMPONENTS, "other")}


def report(rows: list[dict], args, title: str) -> None:
    columns = {"case": lambda r: r["case"], "processes": lambda r: str(r["processes"]),
               "actor params (M)": lambda r: f"{r['actor_params'] / 1e6:.0f}" if r.get("actor_params") else "-",
               "peak RSS per process (GB)": lambda r: " / ".join(gb(x) for x in r["peak_rss_gb"]) or "-",
               "finished + saved": lambda r: "yes" if r["finished"] else f"no: {r['status']}",
               "wall (s)": lambda r: f"{r['wall_s']:.0f}", **parts_cells("parts_gb", gb)}
    report_table(title + " (parts in GB, rank 0)", columns, rows, args)
    print()
    per_param = {"case": lambda r: r["case"], "processes": lambda r: str(r["processes"]),
                 **parts_cells("bytes_per_actor_param", lambda x: f"{x:.2f}")}
    report_table("bytes per actor parameter, rank 0", per_param, rows, argparse.Namespace(json=None))
    for r in rows:
        if not r["finished"]:
            print(f"\n{r['case']}, {r['processes']} process(es): {r['status']} (exit {r['returncode']})\n"
                  f"{r.get('output_tail', '')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--actor", nargs="+", default=["smollm2-135m-shape"],
                        help=f"actor shapes ({', '.join(SHAPES)}) or any model name Step 3 takes")
    parser.add_argument("--critic", help="critic and reward model shape (default: the actor's)")
    parser.add_argument("--modes", nargs="+", default=["full"], choices=("full", "lora"),
                        help="full fine-tuning, or LoRA (--actor_lora_dim 8 --only_optimize_lora)")
    parser.add_argument("--zero_stages", nargs="+", type=int, default=[2], choices=(0, 1, 2, 3))
    parser.add_argument("--processes", nargs="+", type=int, default=[1])
    parser.add_argument("--ema", nargs="+", default=["off"], choices=("off", "on"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch", type=int, default=4, help="prompts a round per process (= training micro-batch)")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--answer_len", type=int, default=64)
    parser.add_argument("--num_examples", type=int, default=200)
    parser.add_argument("--find_largest", action="store_true",
                        help="walk SHAPES by size per mode; the first of --zero_stages/--processes/--ema")
    parser.add_argument("--step3_args", help="more Step 3 flags for every case, e.g. \"--release_inference_cache\"")
    parser.add_argument("--workdir", help="where the runs' outputs go (deleted after each run; default: the temp dir)")
    parser.add_argument("--json", "--out", dest="json", help="write the args and rows here (JSON)")
    return parser


def main() -> None:
    if "--child" in sys.argv:  # the launcher puts its --local_rank=N first; Step 3 takes it
        return child_main([a for a in sys.argv[1:] if a != "--child"])
    if sys.argv[1:2] == ["--build"]:
        print(shape_path(sys.argv[2]))
        return None
    args = build_parser().parse_args()
    title = (f"Step 3 memory on the CPU: 2 rounds + save, {args.batch} prompts x 1 answer per process, prompt "
             f"{args.prompt_len} + answer {args.answer_len} tokens (eos off)")
    if args.find_largest:
        rows, largest = find_largest(args)
        report(rows, args, title)
        print("\nlargest actor that finished: " + ", ".join(f"{m} {s or 'none'}" for m, s in largest.items()))
        if args.json:
            data = json.loads(Path(args.json).read_text())
            Path(args.json).write_text(json.dumps({**data, "largest": largest}, indent=2))
        return None
    rows = []
    for case in cases(args):
        print(f"running {case_name(case)}, {case['processes']} process(es) ...", flush=True)
        rows.append(run_case(case, args))
    report(rows, args, title)
    return None


if __name__ == "__main__":
    main()
