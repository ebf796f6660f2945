"""KV-cache generation on a plain HF causal LM, as the hybrid engine runs it.

Generation is Hugging Face `generate` on the inference copy, with a GenerationConfig made from
scratch (nothing inherited from the checkpoint's generation_config: SmolLM2's, for one, would
add its own sampling defaults). Against a hand-written decode loop over a DynamicCache it gives
the same tokens at the same speed on SmolLM2-135M (HF's per-step overhead shows only on models of
a few million parameters; docs/2026-11-23-hybrid-engine.md), and it keeps every family's
position-id and cache quirks right, so it stays.
"""
from __future__ import annotations

import contextlib

import torch

from utils.rl_math import answer_mask


def generation_config(*, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int,
                      top_p: float, pad_token_id: int, eos_token_id):
    """A complete GenerationConfig: every field the sampler reads is set here."""
    from transformers import GenerationConfig
    sampling = dict(do_sample=True, temperature=float(temperature), top_k=int(top_k),
                    top_p=float(top_p)) if do_sample else dict(do_sample=False)
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1,
                            use_cache=True, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                            bos_token_id=None, repetition_penalty=1.0, **sampling)


def check_sampling(do_sample: bool, temperature: float, top_k: int, top_p: float,
                   max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")


def pad_to_width(tokens: torch.Tensor, width: int, pad_token_id: int) -> torch.Tensor:
    """Right-pad (B, T) ids to (B, width): `generate` stops early once every row has ended."""
    if tokens.shape[1] >= width:
        return tokens[:, :width]
    pad = tokens.new_full((tokens.shape[0], width - tokens.shape[1]), pad_token_id)
    return torch.cat([tokens, pad], dim=1)


def answer_lengths(answers: torch.Tensor, eos_token_id) -> torch.Tensor:
    """(B,) tokens each row really generated: up to and including its first eos (all of them
    without an eos id, as generate then never stops early)."""
    if eos_token_id is None:
        return torch.full((answers.shape[0],), answers.shape[1], device=answers.device)
    # the one first-eos rule of the toolkit; its pad id is only read when there is no eos id
    return answer_mask(answers, eos_token_id, pad_token_id=-1).sum(dim=1)


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed for one generate() call, from `generator` (or torch's global RNG)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


@contextlib.contextmanager
def seeded_rng(seed: int | None, device: torch.device):
    """Run with torch's RNG seeded to `seed`, then put the caller's RNG state back.

    HF `generate` samples from the global RNG; a fixed seed here makes sampling reproducible
    from a torch.Generator, and identical on every rank of a tensor-parallel group (their
    logits are identical after the all-reduce, so identical RNG streams pick the same tokens).
    None leaves the RNG alone."""
    if seed is None:
        yield
        return
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        yield


class SampledLogProbs:
    """A logits processor for HF `generate` that keeps the log-prob of each sampled token under
    softmax(logits / temperature): the behaviour policy's log-probs, as the Step 3 scoring forward
    would compute them, without that forward.

    Placed in `logits_processor`, it runs before generate's own temperature/top-k/top-p warpers,
    so it sees the model's logits (HF casts them to fp32) and the log-probs are of the tempered
    distribution without top-k/top-p truncation, the distribution the training loss scores. A
    step's token is only known at the next call (or at the end), so one step's log-softmax is
    kept at a time: memory is one (batch, vocab) tensor, not one per step."""

    def __init__(self, temperature: float):
        self.temperature = float(temperature)
        self._pending: torch.Tensor | None = None  # (B, V) log-softmax of the last step
        self._picked: list[torch.Tensor] = []     # (B,) per finished step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._pending is not None:
            self._take(input_ids[:, -1])
        self._pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        self._picked.append(self._pending.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
        self._pending = None

    def result(self, sequences: torch.Tensor, prompt_len: int, width: int) -> torch.Tensor:
        """(B, width) log-probs of sequences[:, prompt_len:] (the generate output, before any
        padding), 0 after the last generated step."""
        steps = sequences.shape[1] - prompt_len
        if self._pending is not None and len(self._picked) < steps:
            self._take(sequences[:, prompt_len + len(self._picked)])
        if len(self._picked) != steps:
            raise RuntimeError(f"recorded {len(self._picked)} sampled log-probs for {steps} generated tokens")
        log_probs = (torch.stack(self._picked, 1) if self._picked
                     else sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32))
        return torch.nn.functional.pad(log_probs, (0, width - steps))[:, :width]


class GumbelSampler:
    """A logits processor that draws each next token from softmax(scores / temperature) itself,
    by the Gumbel-max trick (argmax of scores / T + Gumbel noise, one uniform a vocabulary entry),
    and hands `generate` a score that is 0 for that token and -inf elsewhere: run greedy,
    generate takes exactly the drawn token.

    Why: HF samples with torch.multinomial, whose per-entry exponential draws cost 7.4 ms at
    8 x 49k on this 2-core CPU (`aten::exponential_`: 269 ms of a 4 s SmolLM2-135M generation in
    torch.profiler); a uniform draw and two logs cost 1.7 ms. It is the same race as
    multinomial's (argmax of p / Exp(1)), so a slightly different model with the same seed
    mostly draws the same tokens, as there. An inverse-CDF draw (one uniform a row, cheaper
    still) did not: its token boundaries sum every earlier probability's error, so it agreed on
    55% of near-uniform rows nudged by 1e-2, and a bf16 Step 3 run at stage 0 and at ZeRO-2 drew
    other answers by round 3. Only without top-k/top-p truncation (`untruncated`),
    Step 3's default; the draws come from torch's global RNG, as HF's do (seeded_rng makes them
    reproducible)."""

    def __init__(self, temperature: float):
        self.temperature = float(temperature)

    @staticmethod
    def untruncated(do_sample: bool, top_k: int, top_p: float) -> bool:
        return do_sample and top_k == 0 and top_p >= 1.0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # log E with E = -log u ~ Exp(1); argmax(log p - log E) is a draw from p (u = 0: never drawn)
        log_e = torch.rand(scores.shape, dtype=torch.float32, device=scores.device).log_().neg_().log_()
        tokens = (scores.float() / self.temperature - log_e).argmax(-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)


def sampling_processors(config, recorder: SampledLogProbs | None = None):
    """(generation config, logits processors) for a Step 3 rollout's `generate`: the recorder
    first (it sees the model's scores), then, for untruncated sampling, GumbelSampler in place
    of HF's multinomial, with generate made greedy to take its draw."""
    processors = [recorder] if recorder is not None else []
    if GumbelSampler.untruncated(config.do_sample, config.top_k, config.top_p):
        processors.append(GumbelSampler(config.temperature))
        config = generation_config(max_new_tokens=config.max_new_tokens, do_sample=False, temperature=1.0,
                                   top_k=0, top_p=1.0, pad_token_id=config.pad_token_id,
                                   eos_token_id=config.eos_token_id)
    return config, processors or None
