"""chat.py: a scripted multi-turn session, and the backend's prompt building and trimming."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


from inference.chat import ChatSession, GenerationSettings
from tests.helpers import assert_ok
from utils.model import load_causal_lm, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_scripted_session_two_turns_and_clear():
    script = "What is 2 + 3?\nAnd 4 + 4?\nclear\nIs 7 odd?\nquit\n"
    proc = subprocess.run([sys.executable, "chat.py", "--path", "tiny-llama", "--max_new_tokens", "4"],
                          cwd=ROOT, input=script, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert_ok(proc)
    out = proc.stdout
    assert out.count("Assistant: ") == 3
    assert "(history cleared)" in out
    assert out.index("(history cleared)") > out.index("Assistant: ", out.index("Assistant: ") + 1)


def session(max_new_tokens=4):
    tok = load_tokenizer("tiny-llama")
    model = load_causal_lm("tiny-llama", tok).eval()
    return ChatSession(model, tok, GenerationSettings(max_new_tokens=max_new_tokens))


def test_history_is_kept_then_cleared():
    chat = session()
    chat.reply("What is 2 + 3?")
    chat.reply("And 4 + 4?")
    assert [u for u, _ in chat.history] == ["What is 2 + 3?", "And 4 + 4?"]
    text = chat.tokenizer.decode(chat.prompt_ids("Next?"))
    assert text.count("Human:") == 3 and "What is 2 + 3?" in text
    chat.clear()
    assert chat.tokenizer.decode(chat.prompt_ids("Next?")).count("Human:") == 1


def test_oldest_turns_are_dropped_to_fit_the_context():
    chat = session(max_new_tokens=16)
    chat.model.config.max_position_embeddings = 64
    chat.history = [(f"question number {i} " * 3, f"answer {i}") for i in range(10)]
    ids = chat.prompt_ids("the newest question")
    assert len(ids) <= 64 - 16
    text = chat.tokenizer.decode(ids)
    assert "the newest question" in text and "question number 0" not in text
    assert "question number 9" in text


def test_chat_template_is_used_for_models_with_one():
    chat = session()
    chat.tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    assert chat.uses_template()
    assert chat.tokenizer.decode(chat.prompt_ids("hi")).endswith("<user>hi<assistant>")
    chat.prompt_format = "human_assistant"
    assert chat.tokenizer.decode(chat.prompt_ids("hi")).strip().endswith("Human: hi Assistant:")
