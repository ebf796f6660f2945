"""Hybrid engine: generate with the actor between its PPO training steps, under any ZeRO stage.

DeepSpeed's own hybrid engine needs CUDA kernels; this one is plain PyTorch + DeepSpeed's
public pieces, so it runs on CPU and GPU alike.

How one generate() goes
  1. Enter inference: the trained weights are copied into the *inference copy*, a plain HF
     model of the actor's config whose parameters are ordinary tensors (no ZeRO hooks, no
     LoRA layers). Under ZeRO-3 the weights are gathered once per call, `tp_gather_partition_size`
     decoder layers at a time (deepspeed.zero.GatheredParameters), so the peak is the copy
     plus one chunk of full layers. Under ZeRO 0/1/2 every rank already holds whole weights:
     the copy's parameters *share storage* with them (nothing copied; the optimizer updates
     them in place, and the sharing is redone every call in case DeepSpeed rebinds a tensor).
     LoRA (peft): the copy holds the fused weights W + scaling * B @ A, computed into it with
     utils.model.merge_lora_state_dict (GPT-2's Conv1D transposition included). The trained
     model is never merged or un-merged in place, so its weights and adapters stay untouched.
  2. Generate with a KV cache on the copy (HF generate, see inference/generation.py), with
     DeepSpeed's process-wide F.linear replacement undone for the duration.
  3. Leave inference: with release_inference_cache the copy is dropped (rebuilt next call:
     less memory between generations, a rebuild each time); otherwise it is kept and only
     its weights are refreshed next call. The trained module's train()/eval() state is
     restored (the copy is always in eval mode; the trained module is never run here).

Tensor parallelism (inference_tp_size N > 1): the copy is split over groups of N consecutive
ranks by DeepSpeed AutoTP (inference/tensor_parallel.py). The ranks of a group run one forward
together, so they stack their prompts, generate the group's batch with one shared sampling
seed, and each keeps its own rows. The shards are refreshed every call by cutting the full
weights with AutoTP's own split and copying into the existing shards; re-sharding (a new full
copy + init_inference) is the fallback when a model has a shard we cannot recompute.

ZeRO-3 with several processes: every rank must call generate() (the gathers are collective).
With TP 1 generation itself has no collective, so ranks may stop at different lengths; with TP
the group's ranks hold identical logits and identical RNG streams, so they stop together.

Why it is built this way: the copy runs at the unsharded model's speed (the refresh is a small
share of a call), so what is left between it and generating on the ZeRO-3 module is that module's
per-layer fetches and hooks (plus its replaced F.linear). Refreshing TP shards by slicing beats
re-sharding. release_inference_cache pays off only when generation and training memory must not
overlap (the kept copy is one full model per rank under ZeRO-3, its fused LoRA weights only
under ZeRO 0-2). Measurements (bench/hybrid_generation.py, profiles, memory):
docs/2026-11-23-hybrid-engine.md.
"""
from __future__ import annotations

import copy
import gc
import time

import torch
from torch import nn

from inference.generation import (SampledLogProbs, answer_lengths, check_sampling, draw_seed, generation_config,
                                  pad_to_width, sampling_processors, seeded_rng)
from inference.tensor_parallel import (NotSliceable, ShardRefresher, TPGroups, broadcast_seed, check_tp_config,
                                       gather_group_prompts, shard)
from utils.config import ConfigError
from utils.dist import world_size
from utils.model.lora import is_lora_wrapped, lora_fan_in_fan_out, lora_scaling, merge_lora_state_dict
from utils.strategy import DeepSpeedStrategy


class HybridEngine:
    """Fast generation for a DeepSpeed-trained actor (see the module docstring).

    last_stats, after each generate(): gather_s (entering inference: ZeRO-3 gathers, LoRA
    fusing, copies or shard refresh; the first call also builds the copy), generate_s,
    new_tokens (this rank's answer tokens up to and including each row's eos), tokens_per_s
    (new_tokens / generate_s), built (the copy was made from scratch this call),
    gathered_chunks (ZeRO-3 GatheredParameters entries: one per chunk, 0 under ZeRO 0-2).
    """

    def __init__(self, engine, *, pad_token_id: int, eos_token_id: int | list[int] | None,
                 inference_tp_size: int = 1, release_inference_cache: bool = False,
                 tp_gather_partition_size: int = 8):
        """engine: the actor's deepspeed.DeepSpeedEngine (engine.module is an HF causal LM, or a
        peft PeftModel wrapping one)."""
        if tp_gather_partition_size < 1:
            raise ConfigError(f"--tp_gather_partition_size must be at least 1, got {tp_gather_partition_size}")
        self.engine = engine
        self.pad_token_id = int(pad_token_id)
        self.eos_token_id = eos_token_id
        self.tp_size = int(inference_tp_size)
        self.release_inference_cache = release_inference_cache
        self._trained, self._lora = _unwrap(engine.module)
        check_tp_config(self._trained.config, self.tp_size, world_size())
        self.device = torch.device(getattr(engine, "device", None) or "cpu")
        self._zero3 = engine.zero_optimization_stage() == 3
        self._dtype = next(self._trained.parameters()).dtype
        self._chunks = param_chunks(self._trained, tp_gather_partition_size)
        self._fused = _lora_fused_names(self._trained) if self._lora else set()
        self._groups = TPGroups(self.tp_size) if self.tp_size > 1 else None
        self._model: nn.Module | None = None  # the inference copy (sharded under TP)
        self._refresher = None  # TP: writes full weights into the existing shards
        self.last_stats: dict = {}

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
                 do_sample: bool = True, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None,
                 with_log_probs: bool = False):
        """prompt (B, P) LEFT-padded ids, prompt_mask (B, P) 0/1. Returns (B, P + max_new_tokens)
        on the engine's device: the prompt followed by each row's answer; after a row's first
        eos every later position is pad_token_id (always exactly that wide, so answers start at
        P). Enters inference mode (gathers/refreshes the inference copy), generates with a KV
        cache, leaves inference mode; the engine's train() state is as before. Under ZeRO-3 or
        TP every rank must call it, with the same sampling settings within a TP group.
        with_log_probs: return (ids, (B, max_new_tokens) fp32 log-probs of the answer tokens
        under softmax(logits / temperature), 0 after the last generated step: SampledLogProbs)."""
        check_sampling(do_sample, temperature, top_k, top_p, max_new_tokens)
        if prompt.shape != prompt_mask.shape or prompt.dim() != 2:
            raise ValueError(f"prompt {tuple(prompt.shape)} and prompt_mask "
                             f"{tuple(prompt_mask.shape)} must both be (batch, prompt_len)")
        was_training = self.engine.module.training
        try:
            start = time.perf_counter()
            built, chunks = self._enter()
            gather_s = _elapsed(start, self.device)
            start = time.perf_counter()
            config = generation_config(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                       temperature=temperature, top_k=top_k, top_p=top_p,
                                       pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id)
            recorder = SampledLogProbs(temperature if do_sample else 1.0) if with_log_probs else None
            with DeepSpeedStrategy.torch_linear():
                out, log_probs = self._generate(prompt.to(self.device), prompt_mask.to(self.device), config,
                                                generator if do_sample else None, do_sample, recorder)
            generate_s = _elapsed(start, self.device)
        finally:
            self._leave()
            self.engine.module.train(was_training)
        new_tokens = int(answer_lengths(out[:, prompt.shape[1]:], self.eos_token_id).sum())
        self.last_stats = {"gather_s": gather_s, "generate_s": generate_s, "new_tokens": new_tokens,
                           "tokens_per_s": new_tokens / max(generate_s, 1e-9),
                           "built": built, "gathered_chunks": chunks}
        return (out, log_probs) if with_log_probs else out

    @property
    def inference_model(self) -> nn.Module | None:
        """The inference copy as it is now (None before the first call or after a release)."""
        return self._model

    # ------------------------------------------------------------------ inference copy

    def _enter(self) -> tuple[bool, int]:
        """Make the inference copy hold the current trained weights.

        Returns (whether it was built from scratch, how many ZeRO-3 chunk gathers it took)."""
        if self._model is None or (self._groups is not None and self._refresher is None):
            return True, self._build()
        if self._groups is None:
            return False, self._fill(self._model, alias=not self._zero3)
        chunks = 0
        for state in self._full_weights():
            self._refresher.refresh(state)
            chunks += int(self._zero3)
        return False, chunks

    def _build(self) -> int:
        """A new inference copy filled with the trained weights (and sharded under TP)."""
        self._model = self._refresher = None
        gc.collect()
        model = self._new_copy()
        # under TP the shards are cut from the copy, so it must own its storage
        chunks = self._fill(model, alias=not self._zero3 and self._groups is None)
        if self._groups is None:
            self._model = model
            return chunks
        aliases = _aliases(model)
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        self._model = shard(model, self._groups, self._dtype, self.device)
        try:
            self._refresher = ShardRefresher(self._model, aliases, shapes)
        except NotSliceable:  # re-shard every call instead (slower, always right)
            self._refresher = None
        return chunks

    def _new_copy(self) -> nn.Module:
        """An un-hooked model of the actor's class and config, weights left uninitialized."""
        from transformers import GenerationConfig
        from transformers.initialization import no_init_weights
        config = copy.deepcopy(self._trained.config)
        config.use_cache = True  # gradient checkpointing turns it off in the trained config
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self._dtype)
        try:
            with no_init_weights(), torch.device(self.device):
                model = type(self._trained)(config)
        finally:
            torch.set_default_dtype(previous)
        model.tie_weights()  # no_init_weights also skips the tying post_init would do
        model.eval().requires_grad_(False)
        model.generation_config = GenerationConfig()  # nothing inherited: see generation.py
        _copy_buffers(self._trained, model)
        return model

    def _fill(self, model: nn.Module, alias: bool) -> int:
        """Write every trained weight into `model`; returns the number of ZeRO-3 gathers.

        alias: share storage with the trained tensors instead of copying (ZeRO 0-2 only: a
        ZeRO-3 gather is released after its chunk). Fused LoRA weights are always copied."""
        params = dict(model.named_parameters(remove_duplicate=False))
        filled, chunks = set(), 0
        for state in self._full_weights():
            chunks += int(self._zero3)
            for name, tensor in state.items():
                target = params.get(name)
                if target is None or target.shape != tensor.shape:
                    raise RuntimeError(f"trained weight {name} {tuple(tensor.shape)} has no place in "
                                       "the inference copy")
                if alias and name not in self._fused:
                    target.data = tensor
                else:
                    target.data.copy_(tensor)
                filled.add(id(target))
        missing = [n for n, p in params.items() if id(p) not in filled]
        if missing:
            raise RuntimeError(f"inference copy weights not found in the trained model: {missing[:5]}")
        return chunks

    def _full_weights(self):
        """Yields, chunk by chunk, the trained weights whole and LoRA-fused, under the plain
        model's names. Under ZeRO-3 a chunk stays gathered only until the next one is asked."""
        for chunk in self._chunks:
            with self._gathered([p for _, p in chunk]):
                state = {name: p.data for name, p in chunk}
                if self._lora is not None:
                    state = merge_lora_state_dict(state, *self._lora)
                yield state

    def _gathered(self, params):
        return DeepSpeedStrategy.gathered(params)

    def _leave(self) -> None:
        if not self.release_inference_cache:
            return
        self._model = self._refresher = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ generation

    def _generate(self, prompt, mask, config, generator, do_sample: bool, recorder: SampledLogProbs | None):
        """(ids, log-probs or None), both padded to the full answer width."""
        if self._groups is None:
            seed = draw_seed(generator) if generator is not None else None
            with seeded_rng(seed, self.device):
                return self._sample(prompt, mask, config, recorder)
        return self._generate_tp(prompt, mask, config, generator, do_sample, recorder)

    def _generate_tp(self, prompt, mask, config, generator, do_sample: bool, recorder):
        """The group generates its stacked prompts together; this rank keeps its rows."""
        ids, full_mask, own, extra = gather_group_prompts(prompt, mask, self._groups, self.pad_token_id)
        seed = None
        if do_sample:  # every rank draws (generators stay in step), the first rank's seed wins
            seed = broadcast_seed(draw_seed(generator), self._groups, self.device)
        with seeded_rng(seed, self.device):
            out, log_probs = self._sample(ids, full_mask, config, recorder)
        return out[own, extra:], (log_probs[own] if log_probs is not None else None)

    def _sample(self, ids, mask, config, recorder):
        config, processors = sampling_processors(config, recorder)
        out = self._model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                   logits_processor=processors)
        width = ids.shape[1] + config.max_new_tokens
        log_probs = recorder.result(out, ids.shape[1], config.max_new_tokens) if recorder is not None else None
        return pad_to_width(out, width, self.pad_token_id), log_probs


# ---------------------------------------------------------------------- helpers

def _unwrap(module: nn.Module):
    """(the HF model holding the weights, (lora scaling, fan_in_fan_out) or None)."""
    if is_lora_wrapped(module):
        from peft.tuners.lora import LoraLayer

        if any(getattr(m, "merged", False) for m in module.modules() if isinstance(m, LoraLayer)):
            raise ValueError("the actor's LoRA adapters are merged in place; the hybrid engine "
                             "fuses them into its own copy and expects them unmerged")
        return module.get_base_model(), (lora_scaling(module), lora_fan_in_fan_out(module))
    return module, None


def _lora_fused_names(model: nn.Module) -> set[str]:
    """Plain-model names of the weights that LoRA fusing recomputes."""
    names = {name for name, _ in model.named_parameters()}
    return {name.replace(".base_layer.", ".") for name in names
            if name.endswith(".base_layer.weight")
            and any(".lora_A." in n and n.startswith(name[: -len("base_layer.weight")]) for n in names)}


def decoder_layers_name(model: nn.Module) -> str:
    """Name of the ModuleList holding the repeated blocks (the one with the most parameters)."""
    lists = [(name, sum(1 for _ in m.parameters())) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers")
    return max(lists, key=lambda item: item[1])[0]


def param_chunks(model: nn.Module, layers_per_chunk: int) -> list[list[tuple[str, nn.Parameter]]]:
    """Named parameters in gather order: everything outside the decoder layers (embeddings,
    final norm, head) as one chunk, then `layers_per_chunk` layers per chunk. The order is
    the same on every rank, as collective gathers need."""
    prefix = decoder_layers_name(model) + "."
    other, layers = [], {}
    for name, param in model.named_parameters():
        if name.startswith(prefix):
            index = int(name[len(prefix):].split(".", 1)[0])
            layers.setdefault(index // layers_per_chunk, []).append((name, param))
        else:
            other.append((name, param))
    return [chunk for chunk in [other, *(layers[k] for k in sorted(layers))] if chunk]


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Canonical parameter name -> all names of that parameter (tied weights have several)."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    out: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(canonical[id(p)], []).append(name)
    return out


def _copy_buffers(source: nn.Module, target: nn.Module) -> None:
    """Buffers (rotary frequencies, masks) as the trained model has them: same values and
    dtype, so the copy computes exactly what the trained model would."""
    buffers = dict(source.named_buffers(remove_duplicate=False))
    for name, _ in list(target.named_buffers(remove_duplicate=False)):
        if name in buffers:
            owner, _, attr = name.rpartition(".")
            target.get_submodule(owner)._buffers[attr] = buffers[name].detach().clone()


def _elapsed(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
