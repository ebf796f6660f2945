"""How a sample becomes the texts a step tokenizes: DeepSpeed-Chat's " Human: ... Assistant:"
text, or, for a conversational row (it carries "prompt_messages") under --chat_template auto,
the tokenizer's own chat template.

With the template, the prompt is the conversation rendered with the generation prompt and an
answer is what rendering the conversation plus that assistant turn adds after it; both already
hold the template's special tokens, so they are encoded without the tokenizer's and no extra
end-of-text token is appended (the template ends the turn). Plain rows, and every row under
--chat_template none or with a tokenizer that has no template, keep the Human/Assistant text.
"""
from __future__ import annotations

from dataclasses import dataclass

from utils.config import CHAT_TEMPLATE_MODES, ConfigError


@dataclass
class Rendered:
    """One row's texts: the prompt, its answers by sample key (None where the row has none), and
    whether the chat template rendered them."""
    prompt: str
    answers: dict[str, str | None]
    template: bool


def chat_template_of(tokenizer, mode: str) -> str | None:
    """The template that renders conversational rows, or None (Human/Assistant text for all)."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ConfigError(f"--chat_template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, got {mode!r}")
    return (getattr(tokenizer, "chat_template", None) or None) if mode == "auto" else None


def render(where: str, sample: dict, keys: tuple[str, ...], tokenizer, template: str | None) -> Rendered:
    """`sample`'s prompt and its answers `keys` ("chosen", "rejected") as text to encode."""
    messages = sample.get("prompt_messages")
    if template is None or not messages:
        return Rendered(sample["prompt"], {k: sample[k] for k in keys}, False)
    prompt = _apply(where, tokenizer, messages, template, generation=True)
    return Rendered(prompt, {k: _answer_text(where, tokenizer, messages, template, prompt, sample[k])
                             for k in keys}, True)


def _answer_text(where, tokenizer, messages, template, prompt: str, answer: str | None) -> str | None:
    if answer is None:
        return None
    # answers carry the Human/Assistant format's leading space; message contents are stripped
    # there too (sources._turn), so the template gets the bare text
    turn = {"role": "assistant", "content": answer.strip()}
    full = _apply(where, tokenizer, messages + [turn], template, generation=False)
    if not full.startswith(prompt):
        raise ConfigError(f"{where}: the tokenizer's chat template does not render this conversation as its "
                          "prompt (with the generation prompt) followed by the answer, so the answer tokens "
                          "cannot be told apart; use --chat_template none")
    return full[len(prompt):]


def _apply(where, tokenizer, messages, template, generation: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation)
    except Exception as e:  # noqa: BLE001 - a template's own errors (jinja, raise_exception) vary
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: the tokenizer's chat template refused this conversation ({reason}); "
                          "use --chat_template none") from e
