"""The rollout: the actor answers a batch of prompts (through the hybrid engine, or plain HF
`generate` on the DeepSpeed engine), `samples_per_prompt` answers to each."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from inference.generation import SampledLogProbs, generation_config, pad_to_width, sampling_processors
from inference.hybrid_engine import HybridEngine
from training.step3_rlhf_finetuning.config import GenerationConfig, HybridConfig
from training.step3_rlhf_finetuning.experience import Rows
from utils import dist
from utils.rl_math import answer_mask, answer_width


@dataclass
class Answers:
    """Sampled answers, before any scoring."""
    prompts: torch.Tensor         # (B, P) left-padded prompt ids, each prompt's answers in consecutive rows
    seq: torch.Tensor             # (B, P + A) prompt + answer, A the longest answer
    attention_mask: torch.Tensor  # (B, P + A)
    action_mask: torch.Tensor     # (B, A) answer tokens up to and including the first eos
    generation_s: float           # seconds spent generating
    rows: Rows | None = None      # the data rows behind the B answers (None: not known, tensor API)
    log_probs: torch.Tensor | None = None  # (B, A) the sampled tokens' log-probs, from generating

    @property
    def prompt_len(self) -> int:
        return self.prompts.size(1)


class AnswerSampler:
    """Samples the actor's answers with the settings of `--temperature/--top_k/--top_p`;
    `keep_log_probs`: with the sampled tokens' log-probs under softmax(logits / temperature)."""

    def __init__(self, actor, tokenizer, generation: GenerationConfig, hybrid: HybridConfig,
                 keep_log_probs: bool = False):
        self.actor, self.gen, self.keep_log_probs = actor, generation, keep_log_probs
        self.pad_token_id = tokenizer.pad_token_id
        # with ignore_eos nothing ends an answer early: every answer is max_answer_seq_len tokens
        self.eos_token_id = None if generation.ignore_eos else tokenizer.eos_token_id
        self.hybrid = None
        if hybrid.enable_hybrid_engine:
            self.hybrid = HybridEngine(
                actor, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
                inference_tp_size=hybrid.inference_tp_size, release_inference_cache=hybrid.release_inference_cache,
                tp_gather_partition_size=hybrid.tp_gather_partition_size)

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, mask: torch.Tensor, rows: Rows | None = None) -> Answers:
        """`rows`: the prompts' data rows, repeated like the prompts for the answers' Rows."""
        device = dist.current_device()
        prompts, mask = prompts.to(device), mask.to(device)
        k = self.gen.samples_per_prompt
        if k > 1:  # each prompt's answers in consecutive rows: the groups of rloo / grpo
            prompts, mask = prompts.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
            rows = rows.repeat(k) if rows is not None else None
        start = time.perf_counter()
        seq, log_probs = self._generate(prompts, mask)
        generation_s = time.perf_counter() - start
        prompt_len = prompts.size(1)
        answers = seq[:, prompt_len:]
        action_mask = (torch.ones_like(answers, dtype=torch.bool) if self.eos_token_id is None
                       else answer_mask(answers, self.eos_token_id, self.pad_token_id))
        # drop the columns after the longest answer: every later forward skips the padding
        width = answer_width(action_mask)
        seq, action_mask = seq[:, :prompt_len + width], action_mask[:, :width]
        if log_probs is not None:
            log_probs = log_probs[:, :width] * action_mask
        return Answers(prompts, seq, torch.cat([mask, action_mask.long()], 1), action_mask, generation_s, rows,
                       log_probs)

    def _generate(self, prompts: torch.Tensor, mask: torch.Tensor):
        """(ids padded to the full answer width, their answers' log-probs or None)."""
        g = self.gen
        sampling = {"do_sample": True, "temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p}
        if self.hybrid is not None:
            out = self.hybrid.generate(prompts, mask, max_new_tokens=g.max_answer_seq_len,
                                       with_log_probs=self.keep_log_probs, **sampling)
            return out if self.keep_log_probs else (out, None)
        recorder = SampledLogProbs(g.temperature) if self.keep_log_probs else None
        was_training = self.actor.module.training
        self.actor.eval()
        # a complete config, nothing inherited from the checkpoint's (a repetition penalty there
        # would also change the logits the recorder sees)
        config, processors = sampling_processors(generation_config(
            max_new_tokens=g.max_answer_seq_len, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
            **sampling), recorder)
        out = self.actor.module.generate(
            input_ids=prompts, attention_mask=mask, generation_config=config, logits_processor=processors,
            synced_gpus=self.actor.zero_optimization_stage() == 3 and dist.world_size() > 1)
        self.actor.train(was_training)
        log_probs = recorder.result(out, prompts.size(1), g.max_answer_seq_len) if recorder is not None else None
        # generate pads rows that ended early; it stops once all have ended, so pad to the width
        return pad_to_width(out, prompts.size(1) + g.max_answer_seq_len, self.pad_token_id), log_probs
