"""Chat backend: a conversation with a trained causal LM, one prompt built per turn.

A model this toolkit trained (its folder holds training_config.json) gets the format it trained
on: DeepSpeed-Chat's " Human: {question} Assistant: {answer}" turns, or its tokenizer's chat
template where its data were conversational rows rendered with it (--chat_template auto); other
models get the tokenizer's chat template when it has one (SmolLM2 and most instruct models),
else the same Human/Assistant format. History is trimmed from the oldest turn so
the prompt plus the new answer fit the model's context window.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.config import ConfigError
from utils.model import load_causal_lm, load_tokenizer, resolve_dtype


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    history: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant) turns
    prompt_format: str = "auto"  # auto | template | human_assistant

    def clear(self) -> None:
        self.history.clear()

    def uses_template(self) -> bool:
        if self.prompt_format == "human_assistant":
            return False
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_ids(self, message: str) -> list[int]:
        """Token ids of the conversation so far plus `message`, oldest turns dropped to fit."""
        budget = self.context_length() - self.settings.max_new_tokens
        turns = list(self.history)
        while True:
            ids = self._encode(turns, message)
            if len(ids) <= budget or not turns:
                return ids[-budget:] if budget > 0 else ids[-1:]
            turns.pop(0)

    def context_length(self) -> int:
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
            if getattr(config, name, None):
                return int(getattr(config, name))
        return 2048

    def _encode(self, turns, message: str) -> list[int]:
        if self.uses_template():
            messages = []
            for user, assistant in turns:
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            messages.append({"role": "user", "content": message})
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # BatchEncoding or plain ids
        text = "".join(f" Human: {u} Assistant: {a}" for u, a in turns) + f" Human: {message} Assistant:"
        return self.tokenizer(text)["input_ids"]

    @torch.no_grad()
    def reply(self, message: str, streamer=None) -> str:
        ids = torch.tensor([self.prompt_ids(message)], device=self.model.device)
        s = self.settings
        sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p,
                    "top_k": s.top_k} if s.do_sample else {"do_sample": False}
        if not self.uses_template():  # stop where the model starts the next turn itself
            sampling.update(stop_strings=["Human:"], tokenizer=self.tokenizer)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=s.max_new_tokens, repetition_penalty=s.repetition_penalty,
                                  pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=self.tokenizer.eos_token_id, streamer=streamer, **sampling)
        answer = self.cut_answer(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        self.history.append((message, answer))
        return answer

    @staticmethod
    def cut_answer(text: str) -> str:
        """A model trained on the Human/Assistant format may run on into the next turn."""
        return text.split(" Human:")[0].split("\nHuman:")[0].strip()


def load_for_generation(path: str, dtype: str = "auto", trust_remote_code: bool = False):
    """(model on the GPU if there is one else the CPU, in eval mode; its tokenizer)."""

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = load_causal_lm(path, tokenizer, dtype=resolve_dtype(dtype, device),
                           trust_remote_code=trust_remote_code).to(device).eval()
    return model, tokenizer


def default_prompt_format(path: str, requested: str = "auto") -> str:
    """'auto': for a model trained here (its folder holds training_config.json), the format its
    data were rendered in: the chat template where they were (data_format template, or mixed:
    conversational rows next to plain ones), else Human/Assistant turns (older models record no
    data_format: they trained on those); for other models the tokenizer's template if any."""
    record = Path(path) / "training_config.json"
    if requested != "auto" or not record.exists():
        return requested
    try:
        trained_on = json.loads(record.read_text(encoding="utf-8")).get("data_format", "")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ConfigError(f"{record}: not a readable training config ({e}); pass --prompt_format") from e
    return "template" if trained_on in ("template", "mixed") else "human_assistant"
