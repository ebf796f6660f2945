"""What one rollout leaves for PPO: the `Experience` batch, its text, and the data rows behind it."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass
class Experience:
    """One rollout batch with all PPO needs; (B, A) tensors cover the answer tokens."""
    prompts: torch.Tensor         # (B, P) left-padded prompt ids
    seq: torch.Tensor             # (B, P + A) prompt + answer, pads after the answer
    attention_mask: torch.Tensor  # (B, P + A) real tokens of prompt and answer
    action_mask: torch.Tensor     # (B, A) answer tokens up to and including the first eos
    log_probs: torch.Tensor       # (B, A) actor when generating (PPO's "old" policy)
    ref_log_probs: torch.Tensor   # (B, A) reference model
    # (B, A) critic at the rollout's weights; these three are None until the update's critic
    # forward gives the values (Step3Config.values_from_update: scoring.with_values)
    values: torch.Tensor | None
    scores: torch.Tensor          # (B,) reward model score of each whole answer
    rewards: torch.Tensor         # (B, A) KL-penalized per-token rewards
    advantages: torch.Tensor | None  # (B, A)
    returns: torch.Tensor | None     # (B, A)

    def __len__(self) -> int:
        return self.seq.size(0)

    @property
    def prompt_len(self) -> int:
        return self.prompts.size(1)

    def split(self, size: int) -> list["Experience"]:
        """Micro-batches of `size` rows for the PPO updates."""
        parts = {f.name: getattr(self, f.name) for f in fields(self)}
        parts = {name: t if t is None else t.split(size) for name, t in parts.items()}
        return [Experience(**{name: chunks if chunks is None else chunks[i] for name, chunks in parts.items()})
                for i in range(len(parts["seq"]))]

    @staticmethod
    def concat(exps: list["Experience"], pad_token_id: int) -> "Experience":
        """The rows of several rollouts as one: prompts left-padded and answers right-padded to
        the widest (masks 0 there), so a round's answers split into equal micro-batches
        whatever the generation batches were."""
        if len(exps) == 1:
            return exps[0]
        p = max(e.prompt_len for e in exps)
        a = max(e.seq.size(1) - e.prompt_len for e in exps)
        return Experience(**{f.name: None if getattr(exps[0], f.name) is None
                             else torch.cat([_widen(e, f.name, p, a, pad_token_id) for e in exps])
                             for f in fields(Experience)})


def _widen(e: Experience, name: str, p: int, a: int, pad_token_id: int) -> torch.Tensor:
    """One field of `e` padded to prompt width p and answer width a."""
    t = getattr(e, name)
    if t.dim() == 1:  # scores
        return t
    if name == "prompts":
        return F.pad(t, (p - t.size(1), 0), value=pad_token_id)
    if name in ("seq", "attention_mask"):  # prompt part left, answer part right
        fill = pad_token_id if name == "seq" else 0
        left = F.pad(t[:, :e.prompt_len], (p - e.prompt_len, 0), value=fill)
        right = F.pad(t[:, e.prompt_len:], (0, a - (t.size(1) - e.prompt_len)), value=fill)
        return torch.cat([left, right], 1)
    return F.pad(t, (0, a - t.size(1)), value=0)  # (B, A) answer-token tensors


@dataclass
class Rows:
    """The data set rows behind a batch, one entry per prompt or answer: each row's other columns
    (what reward functions get as keyword arguments) and where it came from (what their errors
    name, e.g. "prompts.jsonl row 12")."""
    columns: list[dict]
    origins: list[str]

    @staticmethod
    def of_batch(batch: dict, n: int) -> "Rows":
        """A DataCollatorPrompt batch's rows ({} and "prompt i of the batch" where it has none)."""
        columns = batch.get("columns") or [{} for _ in range(n)]
        origins = batch.get("origins") or [f"prompt {i} of the batch" for i in range(n)]
        if len(columns) != n or len(origins) != n:
            raise ValueError(f"the prompt batch has {n} prompts but {len(columns)} columns and "
                             f"{len(origins)} origins: give one of each per prompt")
        return Rows(list(columns), list(origins))

    @staticmethod
    def unknown(n: int) -> "Rows":
        """For answers scored without their rows (the tensor API)."""
        return Rows([{} for _ in range(n)], [f"answer {i} of the rollout" for i in range(n)])

    def repeat(self, k: int) -> "Rows":
        """Each row k times in a row, as the rollout lays out a prompt's k answers."""
        return Rows([c for c in self.columns for _ in range(k)], [o for o in self.origins for _ in range(k)])

    def __len__(self) -> int:
        return len(self.origins)


def decode_rollout(tokenizer, prompts, seq, action_mask) -> tuple[list[str], list[str]]:
    """(prompt texts, answer texts) of a rollout, special tokens and padding dropped."""
    texts = [tokenizer.decode(row[row != tokenizer.pad_token_id], skip_special_tokens=True) for row in prompts]
    answers = [tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
               for row, mask in zip(seq[:, prompts.size(1):], action_mask)]
    return texts, answers


def decoded(tokenizer, exp: Experience) -> tuple[list[str], list[str]]:
    return decode_rollout(tokenizer, exp.prompts, exp.seq, exp.action_mask)
