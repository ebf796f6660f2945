"""Step 3 with --reward_fn: the flags and which rewards they select, the text-function source
(texts, row columns and origins in rollout order, weights with a reward model, None), the
per-reward metrics, and two end-to-end runs (the logged reward is the function's; a function
that raises stops the run with one line)."""
from __future__ import annotations

import argparse
import json
import re
import textwrap

import pytest
import torch

from tests.helpers import assert_ok, error_line, run_module
from tests.test_step3 import rounds
from training.step3_rlhf_finetuning.config import (GenerationConfig, HybridConfig, Step3Config, as_step3_config,
                                                   reward_names)
from training.step3_rlhf_finetuning.experience import Rows
from training.step3_rlhf_finetuning.metrics import reward_part_means
from training.step3_rlhf_finetuning.rewards import (RewardSource, TextFunctionSource, WeightedSources, reward_source,
                                                    score_answers, scored_parts)
from training.step3_rlhf_finetuning.rollout import AnswerSampler
from utils import dist
from utils.cli import free_port
from utils.config import ConfigError, parse_config
from utils.model import load_tokenizer
from utils.rewards import RewardFunctionError, load_reward_function

MODULE = "training.step3_rlhf_finetuning.main"

REWARDS = textwrap.dedent('''
    CALLS = []

    def record(prompts, completions, **columns):
        CALLS.append({"prompts": prompts, "completions": completions, **columns})
        return [float(len(c)) for c in completions]

    def by_answer(completions, answer):
        return [None if a is None else float(c == a) for c, a in zip(completions, answer)]

    def boom(prompts, completions, **columns):
        if any(c.endswith("2") for c in completions):
            raise ValueError("no twos")
        return [0.0] * len(completions)
''')


@pytest.fixture()
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


def config(*flags) -> Step3Config:
    return parse_config(Step3Config, [*map(str, flags), "--output_dir", "/tmp/unused"], exit_on_error=False)


# ------------------------------------------------------------------ flags


def test_the_flag_repeats_and_takes_several_values(reward_file):
    a, b, c = (f"{reward_file}:{name}" for name in ("record", "by_answer", "boom"))
    cfg = config("--reward_fn", a, "--reward_fn", b, c, "--reward_weights", "1", "0.5", "2")
    assert cfg.reward_fn == [a, b, c] and cfg.reward_weights == [1.0, 0.5, 2.0]
    assert config().reward_fn == [] and config().reward_source == "auto"


def test_weights_are_counted_in_one_line(reward_file):
    fn = f"{reward_file}:record"
    with pytest.raises(ConfigError, match=r"--reward_weights has 1 values for 2 rewards \(record, model\)") as err:
        config("--reward_fn", fn, "--reward_model_name_or_path", "tiny-llama", "--reward_weights", "1")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"has 2 values for 1 rewards \(record\)"):
        config("--reward_fn", fn, "--reward_weights", "1", "2")  # no reward model: one weight
    assert config("--reward_fn", fn, "--reward_source", "checker", "--reward_weights", "1", "2").reward_weights


@pytest.mark.parametrize("spec, message", [
    ("nofile.py:f", "--reward_fn nofile.py:f: file nofile.py not found"),
    ("{file}:missing", "has no function 'missing'"),
    ("no_such_module_xyz:f", "cannot import module no_such_module_xyz"),
])
def test_a_bad_spec_fails_when_the_config_is_checked(reward_file, spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config("--reward_fn", spec.format(file=reward_file))


def test_a_bad_spec_stops_the_command_before_any_model_loads(tmp_path):
    # the critic path does not exist: a run that got as far as loading models would say so instead
    line = error_line(run_module(MODULE, ["--reward_fn", "nofile.py:f", "--critic_model_name_or_path",
                                          tmp_path / "nothing", "--output_dir", tmp_path / "x"]))
    assert line == "error: --reward_fn nofile.py:f: file nofile.py not found"


@pytest.mark.parametrize("flags, model_used, names", [
    ([], True, ["model"]),  # as before: the reward model
    (["--reward_source", "model"], True, ["model"]),
    (["--reward_source", "checker"], False, ["checker"]),
    (["--reward_fn", "F"], False, ["record"]),  # the function alone
    (["--reward_fn", "F", "--reward_model_name_or_path", "tiny-llama"], True, ["record", "model"]),
    (["--reward_fn", "F", "--reward_source", "model"], True, ["record", "model"]),
    (["--reward_fn", "F", "--reward_source", "checker"], False, ["record", "checker"]),
])
def test_which_rewards_are_used(reward_file, flags, model_used, names):
    cfg = config(*[f"{reward_file}:record" if f == "F" else f for f in flags])
    assert cfg.uses_reward_model is model_used
    assert reward_names(["record"] if cfg.reward_fn else [], cfg.reward_source, model_used) == names


def test_a_deepspeed_chat_namespace_without_the_new_fields_uses_the_reward_model():
    assert as_step3_config(argparse.Namespace(actor_zero_stage=2)).uses_reward_model
    assert as_step3_config(argparse.Namespace(reward_source="model")).uses_reward_model
    assert not as_step3_config(argparse.Namespace(reward_source="checker")).uses_reward_model


# ------------------------------------------------------------------ the sources


class FakeActor:
    """Answers row i of the (repeated) prompts with the text "answer i" + eos."""

    def __init__(self, tok):
        self.tok, self.module, self.training = tok, self, False

    def generate(self, input_ids, attention_mask, generation_config, **_):
        ids = [self.tok(f"answer {i}", add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
               for i in range(input_ids.size(0))]
        width = max(map(len, ids))
        answers = torch.tensor([x + [self.tok.pad_token_id] * (width - len(x)) for x in ids])
        return torch.cat([input_ids, answers], 1)

    def eval(self):
        pass

    def train(self, mode=True):
        pass

    def zero_optimization_stage(self):
        return 0


def sampled(tok, prompts: list[str], k: int, batch_extra: dict):
    """Answers to `prompts` (k each) as the trainer's rollout samples them, with the batch's rows."""
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    batch = {"prompt": torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids]),
             "prompt_att_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]), **batch_extra}
    sampler = AnswerSampler(FakeActor(tok), tok, GenerationConfig(max_answer_seq_len=8, samples_per_prompt=k),
                            HybridConfig(enable_hybrid_engine=False))
    return sampler.sample(batch["prompt"], batch["prompt_att_mask"], Rows.of_batch(batch, len(prompts)))


def text_source(tok, reward_file, name: str) -> TextFunctionSource:
    return TextFunctionSource(load_reward_function(f"{reward_file}:{name}"), tok)


def test_texts_columns_and_origins_reach_the_function_k_answers_per_prompt_in_order(tok, reward_file):
    rows = {"columns": [{"answer": "4", "id": 1}, {"answer": "7", "id": 2}],
            "origins": ["prompts.jsonl row 12", "prompts.jsonl row 30"]}
    answers = sampled(tok, ["What is 2 + 2?", "And 3 + 4?"], 2, rows)
    source = text_source(tok, reward_file, "record")
    scores = score_answers(source, answers.prompts, answers.seq, answers.attention_mask, answers.action_mask,
                           answers.rows)
    call = source.fn.fn.__globals__["CALLS"][-1]
    assert call["prompts"] == ["What is 2 + 2?"] * 2 + ["And 3 + 4?"] * 2
    assert call["completions"] == ["answer 0", "answer 1", "answer 2", "answer 3"]
    assert call["answer"] == ["4", "4", "7", "7"] and call["id"] == [1, 1, 2, 2]
    assert scores.tolist() == [8.0] * 4
    # an error names the function and the row the failing answer came from (answer 2: row 30)
    with pytest.raises(RewardFunctionError, match=r"^reward function boom raised ValueError: no twos "
                                                  r"\(on prompts.jsonl row 30\)$"):
        score_answers(text_source(tok, reward_file, "boom"), answers.prompts, answers.seq,
                      answers.attention_mask, answers.action_mask, answers.rows)


def test_a_batch_without_rows_gets_defaults(tok, reward_file):
    answers = sampled(tok, ["What is 2 + 2?", "And 3 + 4?"], 2, {})
    assert answers.rows.columns == [{}] * 4
    assert answers.rows.origins == ["prompt 0 of the batch"] * 2 + ["prompt 1 of the batch"] * 2
    with pytest.raises(RewardFunctionError, match=r"\(on prompt 1 of the batch\)$"):
        score_answers(text_source(tok, reward_file, "boom"), answers.prompts, answers.seq,
                      answers.attention_mask, answers.action_mask, answers.rows)
    with pytest.raises(ValueError, match="2 prompts but 1 columns"):
        Rows.of_batch({"columns": [{}]}, 2)


class FakeRewardModel:
    """A reward model whose score of row i is 10 * (i + 1) at every token."""

    def __call__(self, seq, attention_mask, position_ids=None):
        return (torch.arange(seq.size(0)).float().unsqueeze(1) + 1).expand(seq.shape) * 10


def test_weights_combine_functions_with_the_reward_model(tok, reward_file):
    cfg = config("--reward_fn", f"{reward_file}:by_answer", "--reward_fn", f"{reward_file}:record",
                 "--reward_model_name_or_path", "tiny-llama", "--reward_weights", "2", "0.5", "0.1")
    source = reward_source(None, FakeRewardModel(), cfg, tok)
    assert isinstance(source, WeightedSources) and list(source.sources) == ["by_answer", "record", "model"]
    # by_answer: answer 0 is right, answer 1 wrong, answer 2 has no `answer` column (None: left out)
    answers = sampled(tok, ["p0", "p1", "p2"], 1, {"columns": [{"answer": "answer 0"}, {"answer": "x"}, {}]})
    total, parts = scored_parts(source, answers.prompts, answers.seq, answers.attention_mask,
                                answers.action_mask, answers.rows)
    assert parts == {"by_answer": [1.0, 0.0, None], "record": [8.0] * 3, "model": [10.0, 20.0, 30.0]}
    assert total.tolist() == pytest.approx([2 + 4 + 1, 0 + 4 + 2, 4 + 3])


def test_functions_alone_need_no_reward_model_and_the_api_takes_them(tok, reward_file):
    cfg = config("--reward_fn", f"{reward_file}:record")
    source = reward_source(None, None, cfg, tok)  # the engine loaded no reward model
    assert list(source.sources) == ["record"] and isinstance(source.sources["record"], TextFunctionSource)
    fns = [load_reward_function(f"{reward_file}:record"), load_reward_function(f"{reward_file}:by_answer")]
    assert list(reward_source(fns, None, as_step3_config(argparse.Namespace()), tok).sources) == ["record", "by_answer"]
    assert list(reward_source(fns[0], None, as_step3_config(argparse.Namespace()), tok).sources) == ["record"]
    with pytest.raises(ValueError, match="share a name"):
        reward_source([fns[0], fns[0]], None, as_step3_config(argparse.Namespace()), tok)
    with pytest.raises(ValueError, match="no reward model"):
        reward_source(None, None, config(), tok)


def test_a_function_alone_that_does_not_apply_is_an_error(tok, reward_file):
    answers = sampled(tok, ["p0"], 1, {"columns": [{"answer": None}], "origins": ["data.jsonl row 3"]})
    with pytest.raises(RewardFunctionError, match="no reward applies to data.jsonl row 3"):
        score_answers(text_source(tok, reward_file, "by_answer"), answers.prompts, answers.seq,
                      answers.attention_mask, answers.action_mask, answers.rows)


def test_a_source_written_before_rows_still_scores(tok):
    class Old(RewardSource):
        def score(self, prompts, seq, attention_mask, action_mask):
            return torch.ones(seq.size(0))
    answers = sampled(tok, ["p0", "p1"], 1, {})
    assert score_answers(Old(), answers.prompts, answers.seq, answers.attention_mask, answers.action_mask,
                         answers.rows).tolist() == [1.0, 1.0]


def test_per_reward_metrics_leave_out_none_and_reduce_sums_and_counts(monkeypatch):
    parts = [{"a": [1.0, None, 3.0], "model": [0.5, 0.5, 0.5]}, {"a": [None, None], "model": [1.0, 1.0]}]
    assert reward_part_means(parts) == {"reward_a": 2.0, "reward_model": pytest.approx(0.7)}
    assert reward_part_means([{"a": [None]}]) == {}  # applied nowhere: no metric, not NaN
    # two processes; on the other one, "a" applied to nothing and "model" scored 3 answers at 4
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "sum_over_ranks", lambda t: t + torch.tensor([[0.0, 0.0], [12.0, 3.0]],
                                                                            dtype=torch.float64))
    assert reward_part_means(parts) == {"reward_a": 2.0, "reward_model": pytest.approx((3.5 + 12) / 8)}


# ------------------------------------------------------------------ end to end

RUN = ["--actor_model_name_or_path", "tiny-llama", "--num_examples", "200",
       "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4",
       "--max_prompt_seq_len", "32", "--max_answer_seq_len", "8", "--num_warmup_steps", "0",
       "--dtype", "fp32", "--max_rounds", "2", "--disable_tqdm", "--log_interval", "1",
       "--advantage", "grpo", "--samples_per_prompt", "2"]


def test_a_run_with_a_reward_function_logs_its_score(tmp_path):
    """The function is the whole reward (no reward model or critic: their path does not exist);
    the logged reward is --reward_weights 0.5 x the mean of the scores it returned."""
    calls = tmp_path / "calls.jsonl"
    (tmp_path / "length.py").write_text(textwrap.dedent(f'''
        import json

        def length(prompts, completions):
            with open({str(calls)!r}, "a") as f:
                f.write(json.dumps({{"prompts": prompts, "completions": completions}}) + "\\n")
            return [len(c) for c in completions]
    '''))
    out = tmp_path / "run"
    proc = run_module(MODULE, [*RUN, "--critic_model_name_or_path", tmp_path / "no-model-here",
                               "--reward_fn", f"{tmp_path / 'length.py'}:length", "--reward_weights", "0.5",
                               "--output_dir", out])
    assert_ok(proc)
    logged = rounds(out)
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(logged) == len(seen) == 2
    for row, call in zip(logged, seen):
        assert len(call["completions"]) == 8 and call["prompts"][::2] == call["prompts"][1::2]  # K=2 in a row
        mean = sum(map(len, call["completions"])) / 8
        assert row["train/reward_length"] == pytest.approx(mean)
        assert row["train/reward"] == pytest.approx(0.5 * mean)
    assert "reward_length" in proc.stdout + proc.stderr  # the console line too


def test_a_run_whose_function_raises_stops_with_one_line(tmp_path):
    data = tmp_path / "prompts.jsonl"
    # three rows in four are "bad": the first rounds' prompts hold some
    data.write_text("".join(json.dumps({"prompt": f"Question {'ok' if i % 4 == 0 else 'bad'} {i}: say hi.",
                                        "chosen": "hi"}) + "\n" for i in range(40)))
    (tmp_path / "picky.py").write_text(textwrap.dedent('''
        def picky(prompts, completions, **columns):
            for p in prompts:
                if "bad" in p:
                    raise ValueError("a bad prompt")
            return [1.0] * len(completions)
    '''))
    proc = run_module(MODULE, [*RUN, "--critic_model_name_or_path", tmp_path / "no-model-here",
                               "--data_path", data, "--data_split", "0,0,1",
                               "--reward_fn", f"{tmp_path / 'picky.py'}:picky", "--output_dir", tmp_path / "x"])
    line = error_line(proc)  # exit 2, no traceback, the last line
    row = re.fullmatch(r"error: reward function picky raised ValueError: a bad prompt "
                       r"\(on .*prompts.jsonl: row (\d+)\)", line)
    assert row, line
    assert int(row.group(1)) % 4 != 0  # the row named is one of the bad ones
    assert sum(ln.startswith("error: ") for ln in proc.stderr.splitlines()) == 1


def target_recorder(folder):
    """A reward function file whose function appends each call's prompts and `target` column to
    calls.jsonl and scores 1 where the answer holds the target: (its --reward_fn spec, calls file)."""
    calls = folder / "calls.jsonl"
    (folder / "target.py").write_text(textwrap.dedent(f'''
        import json

        def has_target(prompts, completions, target):
            with open({str(calls)!r}, "a") as f:
                f.write(json.dumps({{"prompts": prompts, "target": target}}) + "\\n")
            return [float(t in c) for c, t in zip(completions, target)]
    '''))
    return f"{folder / 'target.py'}:has_target", calls


def test_prompt_only_rows_reach_the_function_with_their_columns(tmp_path):
    """Prompt-only data (no chosen answer) with a ground-truth column: every call gets each
    answer's own row's column (K=2 answers a row), and the run's reward is the function's."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say the number {i}.", "target": str(i), "topic": "numbers"})
                            + "\n" for i in range(40)))
    spec, calls = target_recorder(tmp_path)
    out = tmp_path / "run"
    proc = run_module(MODULE, [*RUN, "--critic_model_name_or_path", tmp_path / "no-model-here",
                               "--data_path", data, "--data_split", "0,0,1", "--reward_fn", spec, "--output_dir", out])
    assert_ok(proc)
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(seen) == 2
    for call in seen:
        assert [re.search(r"number (\d+)", p).group(1) for p in call["prompts"]] == call["target"]
        assert call["target"][::2] == call["target"][1::2]


@pytest.mark.slow
def test_two_processes_a_reward_that_applies_on_one_only(tmp_path):
    """The function applies on rank 0 only (None on rank 1; the checker scores every answer):
    its logged mean is its score there, not a mean over ranks diluted by the one where it applied
    to nothing; a function raising on rank 1 only stops the run with its line."""
    (tmp_path / "ranked.py").write_text(textwrap.dedent('''
        import os

        def rank0(completions):
            return [3.0 if os.environ.get("RANK", "0") == "0" else None for _ in completions]

        def fails_on_rank1(completions):
            if os.environ.get("RANK", "0") == "1":
                raise RuntimeError("rank 1 data")
            return [0.0] * len(completions)
    '''))
    launcher = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]
    flags = [*RUN, "--critic_model_name_or_path", tmp_path / "no-model-here", "--reward_source", "checker",
             "--max_prompt_seq_len", "96"]
    out = tmp_path / "ok"
    proc = run_module(MODULE, [*flags, "--reward_fn", f"{tmp_path / 'ranked.py'}:rank0", "--output_dir", out],
                      launcher=launcher)
    assert_ok(proc)
    for row in rounds(out):
        assert row["train/reward_rank0"] == 3.0 and 0 <= row["train/reward_checker"] <= 1
        assert row["train/reward"] == pytest.approx(1.5 + row["train/reward_checker"])  # rank 0: 3 + c, rank 1: c
    proc = run_module(MODULE, [*flags, "--reward_fn", f"{tmp_path / 'ranked.py'}:fails_on_rank1",
                               "--output_dir", tmp_path / "x"], launcher=launcher)
    assert proc.returncode != 0
    assert re.search(r"error: reward function fails_on_rank1 raised RuntimeError: rank 1 data "
                     r"\(on (prompt \d+ of the batch|.*row \d+)\)\n", proc.stdout + proc.stderr), proc.stderr[-3000:]


def test_scores_beyond_the_clip_are_warned_about_once(caplog):
    """A reward on a larger scale than --clip_reward_value is flattened by the clip: one warning."""
    from types import SimpleNamespace

    from training.step3_rlhf_finetuning.ppo_trainer import DeepSpeedPPOTrainer
    trainer = SimpleNamespace(ppo=SimpleNamespace(clip_reward_value=5.0), _clip_warned=False)
    warn = DeepSpeedPPOTrainer._warn_once_if_clipped
    with caplog.at_level("WARNING"):
        warn(trainer, torch.tensor([1.0, -5.0, 4.9]))  # within the clip: nothing
        assert not caplog.records
        warn(trainer, torch.tensor([1.0, -12.5, 30.0]))
        warn(trainer, torch.tensor([40.0]))  # said once
    (record,) = caplog.records
    assert record.getMessage() == ("reward scores up to 30 are clipped to +-5 (--clip_reward_value): "
                                   "raise it for rewards on a larger scale")
