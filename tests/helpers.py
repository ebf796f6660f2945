"""Shared by the end-to-end tests: start a step module as a user would."""
from __future__ import annotations

import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, args, launcher=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m module args` (or `<launcher> --module module args`) from the repo root."""
    cmd = [*launcher, "--module", module] if launcher else [sys.executable, "-m", module]
    return subprocess.run([*cmd, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _text(stream) -> str:
    """Captured output as text ("" for none, or for a Popen's pipe object)."""
    if isinstance(stream, bytes):
        return stream.decode(errors="replace")
    return stream if isinstance(stream, str) else ""


def describe(proc, stdout=None, stderr=None) -> str:
    """What a finished subprocess did, for an assertion message: its command, exit code and the
    tails of its output (pass stdout/stderr for a Popen whose pipes were already read)."""
    args = proc.args if isinstance(proc.args, (list, tuple)) else [proc.args]
    out = _text(stdout if stdout is not None else getattr(proc, "stdout", None))
    err = _text(stderr if stderr is not None else getattr(proc, "stderr", None))
    return (f"command: {shlex.join(map(str, args))}\nexit code: {proc.returncode}\n"
            f"--- stdout (last 3000 chars) ---\n{out[-3000:]}\n--- stderr (last 5000 chars) ---\n{err[-5000:]}")


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    """The run exited 0; else fail with its command, exit code and output tails."""
    if proc.returncode != 0:
        raise AssertionError(f"expected exit code 0\n{describe(proc)}")


def assert_exit(proc: subprocess.CompletedProcess, code: int) -> None:
    """The run exited with `code` and printed no traceback; else fail showing what it did."""
    if proc.returncode != code or "Traceback" in _text(proc.stderr):
        raise AssertionError(f"expected exit code {code} and no traceback\n{describe(proc)}")


def ended_early(proc: subprocess.Popen, what: str) -> AssertionError:
    """For a polled Popen that exited (or a wait that ran out): the error naming `what` was
    awaited, with the process's command, exit code and output. Kills it first if still running."""
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate()
    return AssertionError(f"{what}\n{describe(proc, out or '', err or '')}")


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line a refused run ends with (exit 2, no traceback)."""
    assert_exit(proc, 2)
    return proc.stderr.strip().splitlines()[-1]


def session_rng(name: str) -> tuple[random.Random, str]:
    """A random generator for one test's random choices (e.g. a kill point), drawn from
    RLHFKIT_KILL_SEED (default 0, so every run kills at the same points; set it to try others)
    and the test's name, so tests do not shift each other's draws. Returns the generator and a
    note naming the seed, for assertion messages."""
    seed = os.environ.get("RLHFKIT_KILL_SEED", "0")
    return random.Random(f"{seed}/{name}"), f"RLHFKIT_KILL_SEED={seed}"


def logged_rows(path: Path) -> list[dict]:
    """The complete lines of a metrics.jsonl that a running (or killed) process may be writing:
    [] before the file exists; a last line without its newline (written half-way as we read) is
    left out instead of failing to parse (utils.metrics.read_jsonl, as --resume reads it)."""
    from utils.metrics import read_jsonl
    try:
        return read_jsonl(path)
    except FileNotFoundError:
        return []


def deepspeed_on_a_free_port(folder: Path) -> dict:
    """Environment whose PATH finds, first, a `deepspeed` that adds `--master_port <free port>`
    to the real launcher's arguments: for scripts that call the launcher without a port (its
    default 29500 may be held by another run on this machine). Pass it as the env of the run."""
    from utils.cli import deepspeed_launcher, free_port
    real = deepspeed_launcher()
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "deepspeed"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(real)} --master_port {free_port()} "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"}


def assert_chat_reply_is_greedy(folder: Path, message: str = "What is 2 + 3?", max_new_tokens: int = 4) -> str:
    """A model this toolkit saved loads for chat as chat.py builds it (Human/Assistant turns, as
    it was trained) and its greedy reply is exactly the text of the tokens the model itself
    puts after that prompt: found here one argmax at a time from its logits (up to eos, or a
    next "Human:" turn), decoded from the new tokens only. Returns the reply."""
    import torch

    from inference.chat import ChatSession, GenerationSettings, default_prompt_format
    from utils.model import load_causal_lm, load_tokenizer
    tokenizer = load_tokenizer(str(folder))
    model = load_causal_lm(str(folder), tokenizer).eval()
    prompt_format = default_prompt_format(str(folder))
    assert prompt_format == "human_assistant", f"{folder}: not recognised as trained here ({prompt_format})"
    session = ChatSession(model, tokenizer, GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False),
                          prompt_format=prompt_format)
    reply = session.reply(message)

    prompt = tokenizer(f" Human: {message} Assistant:")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        while len(new) < max_new_tokens:
            ids = torch.tensor([prompt + new])
            token = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id or "Human:" in tokenizer.decode(new, skip_special_tokens=True):
                break
    text = tokenizer.decode(new, skip_special_tokens=True)
    expected = text.split(" Human:")[0].split("\nHuman:")[0].strip()
    assert reply == expected, (f"{folder}: chat replied {reply!r} to {message!r}; greedy decoding gives "
                               f"{expected!r} (new tokens {new})")
    return reply


def model_with_other_tokenizer(folder: Path, base: str = "tiny-llama") -> Path:
    """A copy of built-in `base` whose tokenizer has one extra token (a mismatch to refuse)."""
    import shutil

    from utils.model import load_tokenizer, resolve_model_path
    shutil.copytree(resolve_model_path(base), folder)
    tokenizer = load_tokenizer(str(folder))
    tokenizer.add_tokens(["<not-in-the-other-vocabulary>"])
    tokenizer.save_pretrained(folder)
    return folder


class RunsCode:
    """Unpickling this calls os.makedirs(marker): it stands in for whatever code a pickle can run
    (torch.save pickles any object whose __reduce__ names a callable)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def save_malicious_weights(path: Path, marker: Path, state: dict | None = None) -> Path:
    """A pytorch_model.bin that looks like a state dict but creates `marker` when fully unpickled."""
    import torch
    torch.save({**(state or {}), "payload": RunsCode(marker)}, path)
    return path
