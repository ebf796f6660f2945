"""Steps 1 and 3 end to end on a model whose tokenizer has a chat template (the tiny built-ins
have none): Step 1 trains on `messages` rows in the template and records it, Step 3 samples from
template-rendered conversational prompts, its reward function gets the row's columns, and chat
talks to the result in its template."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import assert_ok, run_module
from tests.test_step3 import rounds
from tests.test_step3_reward_fn import target_recorder

# plain-text role markers and the tokenizer's own eos: no new tokens, so the tiny model's
# embeddings fit the tokenizer unchanged
TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}### assistant:\n{% endif %}")
NUMBERS = range(3, 43)


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    from utils.model import load_tokenizer, resolve_model_path
    folder = tmp_path_factory.mktemp("templated") / "model"
    shutil.copytree(resolve_model_path("tiny-llama"), folder)
    tokenizer = load_tokenizer(str(folder))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_steps_1_and_3_train_and_talk_in_the_template(templated, tmp_path):
    from inference.chat import default_prompt_format
    from utils.model import load_tokenizer

    sft_data = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "user", "content": f"Say {n}."}, {"role": "assistant", "content": str(n)}]}
        for n in NUMBERS])
    sft = tmp_path / "sft"
    assert_ok(run_module("training.step1_supervised_finetuning.main", [
        "--model_name_or_path", templated, "--data_path", sft_data, "--data_split", "1,0,0",
        "--max_seq_len", "32", "--per_device_train_batch_size", "8", "--max_steps", "3", "--dtype", "fp32",
        "--disable_tqdm", "--output_dir", sft]))
    assert json.loads((sft / "training_config.json").read_text())["data_format"] == "template"
    assert default_prompt_format(str(sft)) == "template"  # chat.py talks to it in the template
    assert load_tokenizer(str(sft)).chat_template == TEMPLATE  # saved with the model

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": [{"role": "user", "content": f"Say {n}."}], "target": str(n)} for n in NUMBERS])
    spec, calls = target_recorder(tmp_path)
    out = tmp_path / "step3"
    assert_ok(run_module("training.step3_rlhf_finetuning.main", [
        "--actor_model_name_or_path", sft, "--critic_model_name_or_path", tmp_path / "no-critic",
        "--data_path", prompts, "--data_split", "0,0,1", "--reward_fn", spec,
        "--advantage", "grpo", "--samples_per_prompt", "2", "--per_device_generation_batch_size", "4",
        "--per_device_training_batch_size", "4", "--max_prompt_seq_len", "32", "--max_answer_seq_len", "6",
        "--num_warmup_steps", "0", "--dtype", "fp32", "--max_rounds", "2", "--disable_tqdm",
        "--log_interval", "1", "--output_dir", out]))
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(seen) == len(rounds(out)) == 2
    for call in seen:
        for prompt, target in zip(call["prompts"], call["target"]):
            # the prompt as the policy saw it: the template's turn and generation prompt, its own row's target
            assert prompt.startswith("### user:\nSay ") and prompt.rstrip().endswith("### assistant:"), prompt
            assert f"Say {target}." in prompt
    assert json.loads((out / "actor" / "training_config.json").read_text())["data_format"] == "template"
