"""Best-of-N (inference/best_of_n.py, prompt_eval --best_of, bench.quality --best_of): the kept
answer is the reward's argmax (first on ties), the reported scores follow from the per-answer
ground truth, the reward model reads the ids Step 3 would score, and bad input is refused."""
from __future__ import annotations

import json
import statistics
import textwrap
from types import SimpleNamespace

import pytest
import torch

from inference.best_of_n import Choice, Reward, Sampling, best_of_n, pick_best, reward_model_scores, sample_batch
from tests.helpers import error_line, model_with_other_tokenizer, run_module
from utils.config import ConfigError
from utils.rewards import load_reward_functions

QUESTION = "What is 2 plus 3? Answer with the number only."  # a bundled task prompt: the answer is 5
FAKE_ANSWERS = ["4", "5", " The answer is 5"]  # ground truth 0, 1, 0.5
REWARDS = textwrap.dedent('''
    def by_answer(prompts, completions, answer, **kwargs):
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

    def longest(completions):
        return [float(len(c)) for c in completions]

    def shortest(completions):
        return [-float(len(c)) for c in completions]

    def flat(prompts, completions):
        return [0.5 for _ in completions]
''')


@pytest.fixture(scope="module")
def tokenizer():
    from utils.model import load_tokenizer
    return load_tokenizer("tiny-llama")


@pytest.fixture()
def reward_file(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS)
    return path


class FakePolicy:
    """Stands in for a causal LM: row i of every batch answers FAKE_ANSWERS[i % 3] (then eos),
    so which answer a reward should keep is known. Records each generate call."""

    def __init__(self, tokenizer):
        self.tokenizer, self.device, self.calls = tokenizer, torch.device("cpu"), []
        self.config = SimpleNamespace(max_position_embeddings=1024)

    def generate(self, input_ids, attention_mask, generation_config):
        self.calls.append((input_ids.clone(), generation_config))
        rows = [self.tokenizer(FAKE_ANSWERS[i % len(FAKE_ANSWERS)])["input_ids"] + [self.tokenizer.eos_token_id]
                for i in range(input_ids.size(0))]
        width = max(map(len, rows)) + 2  # pads after the eos, as generate leaves them
        answers = torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, answers], dim=1)


def fake_run(tokenizer, reward, questions=(QUESTION,), columns=None, n=3, batch_size=8):
    from inference.chat import ChatSession
    policy = FakePolicy(tokenizer)
    session = ChatSession(policy, tokenizer, prompt_format="human_assistant")
    choices = best_of_n(policy, tokenizer, session, list(questions), columns or [{} for _ in questions],
                        Sampling(n=n, batch_size=batch_size, temperature=0.7, top_p=0.9), reward)
    return choices, policy


def functions(path, *names):
    return load_reward_functions([f"{path}:{name}" for name in names])


def test_pick_best_is_the_argmax_and_the_first_on_ties():
    assert pick_best([0.1, 0.7, 0.3]) == 1
    assert pick_best([0.2, 0.9, 0.9, 0.1]) == 1
    assert pick_best([-1.0]) == 0
    with pytest.raises(ValueError):
        pick_best([])


def test_keeps_the_answer_a_reward_function_prefers(tokenizer, reward_file):
    """The function gets the row's columns (here `answer`) and the answer text as Step 3 decodes it."""
    choices, policy = fake_run(tokenizer, Reward(functions=functions(reward_file, "by_answer")),
                               columns=[{"answer": "5"}])
    (choice,) = choices
    assert choice.answers == ["4", "5", "The answer is 5"]
    assert choice.rewards == [0.0, 1.0, 0.0] and choice.best == 1 and choice.answers[choice.best] == "5"
    prompts, config = policy.calls[0]
    assert prompts.size(0) == 3 and all(torch.equal(prompts[0], row) for row in prompts)  # one prompt, N rows
    assert config.do_sample and config.temperature == 0.7 and config.top_p == 0.9


def test_ties_keep_the_first_answer_and_weights_follow_the_order(tokenizer, reward_file):
    (choice,), _ = fake_run(tokenizer, Reward(functions=functions(reward_file, "flat")))
    assert choice.rewards == [0.5, 0.5, 0.5] and choice.best == 0
    # weighted 1 and 2, longest outweighs shortest: the combined reward is the answer's length
    both = Reward(functions=functions(reward_file, "shortest", "longest"), weights=[1.0, 2.0])
    (choice,), _ = fake_run(tokenizer, both)
    assert choice.parts == {"shortest": [-1.0, -1.0, -16.0], "longest": [1.0, 1.0, 16.0]}
    assert choice.rewards == [1.0, 1.0, 16.0] and choice.best == 2
    # Step 3's --reward_weights order: the functions, then the reward model
    assert Reward(model_path="rm", functions=functions(reward_file, "flat"), weights=[1.0, 3.0]).weight_of == {
        "flat": 1.0, "reward_model": 3.0}


def test_prompts_are_batched_with_their_n_answers_together(tokenizer, reward_file):
    questions = [QUESTION, "What is 7 plus 1? Answer with the number only.", "Is 7 odd? Answer yes or no."]
    choices, policy = fake_run(tokenizer, Reward(functions=functions(reward_file, "longest")),
                               questions=questions, n=3, batch_size=7)  # 7 // 3 = 2 prompts a call
    assert [c.size(0) for c, _ in policy.calls] == [6, 3]
    first = policy.calls[0][0]
    assert torch.equal(first[0], first[2]) and not torch.equal(first[2], first[3])
    assert len(choices) == 3 and all(c.best == 2 for c in choices)


def test_oracle_at_least_best_at_least_min_on_the_ground_truth(tokenizer, reward_file):
    from inference.best_of_n import grade
    from utils.data import tasks
    for name, kept in (("longest", 0.5), ("shortest", 0.0), ("by_answer", 1.0)):
        choices, _ = fake_run(tokenizer, Reward(functions=functions(reward_file, name)), columns=[{"answer": "5"}])
        grade(choices, [QUESTION], tasks.family_of("bundled"))
        (c,) = choices
        assert c.scores == [0.0, 1.0, 0.5]
        assert c.best_score == kept, name
        assert c.oracle_score == 1.0 >= c.best_score >= min(c.scores)
        assert c.sampled_score == pytest.approx(0.5)


def test_the_checker_as_reward_keeps_the_right_answer(tokenizer):
    from utils.data import tasks
    (choice,), _ = fake_run(tokenizer, Reward(checker=tasks.family_of("bundled")))
    assert choice.parts["checker"] == [0.0, 1.0, 0.5] and choice.best == 1


def test_evaluate_reports_greedy_sampled_best_and_oracle(tokenizer, reward_file, monkeypatch, tmp_path):
    """prompt_eval end to end on the fake policy: the summary means and output_json's fields."""
    from inference import prompt_eval
    from inference.chat import ChatSession

    def fake_session(path, max_new_tokens=32, prompt_format="auto"):
        policy = FakePolicy(tokenizer)
        return policy, tokenizer, ChatSession(policy, tokenizer, prompt_format="human_assistant")

    monkeypatch.setattr(prompt_eval, "load_session", fake_session)
    monkeypatch.setattr(prompt_eval, "greedy_answers", lambda *a, **k: ["5", "7"])
    out, prompts = tmp_path / "eval.json", tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": QUESTION, "answer": "5"}) + "\n" + json.dumps(
        {"prompt": "What is 2 plus 2? Answer with the number only.", "answer": "4"}) + "\n")
    prompt_eval.main([str(x) for x in [
        "--model_name_or_path_baseline", "a", "--model_name_or_path_finetune", "b", "--prompt_file", prompts,
        "--best_of", 3, "--reward_fn", f"{reward_file}:by_answer", "--output_json", out]])
    rows = json.loads(out.read_text())
    model = rows["models"][0]
    assert model["scores"] == [1.0, 0.0] and model["mean_score"] == 0.5  # greedy
    per_prompt = model["best_of_n"]["per_prompt"]
    assert [p["scores"] for p in per_prompt] == [[0.0, 1.0, 0.5], [1.0, 0.0, 0.0]]  # "4" right for 2 + 2
    # the .jsonl rows' `answer` column reached the function: it keeps "5", then "4"
    assert [p["best"] for p in per_prompt] == [1, 0] and per_prompt[0]["rewards"] == [0.0, 1.0, 0.0]
    best = model["best_of_n"]
    assert best["best_of_n_score"] == pytest.approx(1.0)
    assert best["oracle_score"] == pytest.approx(1.0)
    assert best["sampled_score"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert rows["best_of_n"]["n"] == 3 and rows["best_of_n"]["reward"] == "by_answer"


def test_one_sample_is_plain_sampling(tokenizer, reward_file):
    """N=1: the kept answer is the sample, whatever the reward; the seed fixes it; another seed
    changes it (it is sampled, not greedy)."""
    from inference.chat import ChatSession, load_for_generation
    model, tok = load_for_generation("tiny-llama")
    session = ChatSession(model, tok, prompt_format="human_assistant")
    questions = [QUESTION, "Is 7 odd? Answer yes or no."]

    def run(name, seed):
        sampling = Sampling(n=1, max_new_tokens=6, seed=seed)
        return best_of_n(model, tok, session, questions, [{}, {}], sampling,
                         Reward(functions=functions(reward_file, name)))

    short, long_ = run("shortest", 3), run("longest", 3)
    assert [c.answers for c in short] == [c.answers for c in long_]
    assert all(c.best == 0 for c in short)
    # the same as sampling those prompts directly with the seed best_of_n draws from --seed
    from inference.generation import draw_seed
    direct = sample_batch(model, tok, [session.prompt_ids(q) for q in questions],
                          Sampling(n=1, max_new_tokens=6), draw_seed(torch.Generator().manual_seed(3)))
    from inference.best_of_n import decode
    assert [session.cut_answer(a) for a in decode(tok, direct)[1]] == [c.answers[0] for c in short]
    assert [c.answers for c in run("shortest", 4)] != [c.answers for c in short]


def test_reward_model_scores_the_ids_step3_scores(tokenizer):
    """A left-padded batch of N answers per prompt: each row's score is the reward model's on that
    row's prompt + answer ids alone (the answer up to and including its eos, no padding), as
    Step 3's source scores it. tiny-gpt2 has absolute positions, so left padding shows."""
    from inference.chat import ChatSession
    from training.step3_rlhf_finetuning.rewards import RewardModelSource
    from utils.model import end_scores, load_reward_model

    policy = FakePolicy(tokenizer)
    session = ChatSession(policy, tokenizer, prompt_format="human_assistant")
    prompt_ids = [session.prompt_ids(q) for q in (QUESTION, "Is 7 odd? Answer yes or no.")]
    assert len(prompt_ids[0]) != len(prompt_ids[1])  # so one of them is left-padded
    torch.manual_seed(0)
    rm = load_reward_model("tiny-gpt2", tokenizer, dropout=0.0).eval()
    batch = sample_batch(policy, tokenizer, prompt_ids, Sampling(n=3), seed=5)
    scores = reward_model_scores(rm, batch)
    step3 = RewardModelSource(rm).score(batch.prompts, batch.seq, batch.attention_mask, batch.action_mask)
    assert scores == pytest.approx(step3.tolist(), abs=1e-6)
    for row, score in enumerate(scores):
        answer = tokenizer(FAKE_ANSWERS[row % 3])["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids[row // 3] + answer])
        with torch.no_grad():
            alone = end_scores(rm(ids, torch.ones_like(ids)), torch.ones_like(ids)).item()
        assert score == pytest.approx(alone, abs=1e-4), row
    # the Reward wrapper ranks by those scores
    reward = Reward(model_path="tiny-gpt2")
    reward._model = rm
    combined, parts = reward.score(tokenizer, batch, [QUESTION] * 6, [{}] * 6, [f"row {i}" for i in range(6)])
    assert combined == pytest.approx(scores) and parts["reward_model"] == combined


@pytest.mark.parametrize("flags, message", [
    (["--best_of", "0", "--reward_fn", "x.py:f"], "--best_of must be at least 1, got 0"),
    (["--best_of", "4"], "--best_of needs a reward to rank the answers"),
    (["--reward_model", "tiny-llama"], "rank --best_of samples: give --best_of N"),
    (["--best_of", "2", "--reward_model", "tiny-llama", "--temperature", "0"], "--temperature must be > 0"),
    (["--best_of", "2", "--reward_model", "tiny-llama", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--best_of", "2", "--reward_model", "tiny-llama", "--reward_weights", "1", "2"],
     "--reward_weights has 2 values for 1 rewards (reward_model)"),
    (["--task", "no-such-family"], "no-such-family"),
])
def test_prompt_eval_refusals(flags, message):
    from inference import prompt_eval
    with pytest.raises(ConfigError) as err:
        prompt_eval.main(["--model_name_or_path_baseline", "tiny-llama", "--model_name_or_path_finetune",
                          "tiny-llama", *flags])
    assert message in str(err.value)


def test_reward_model_with_another_tokenizer_is_refused_before_generating(tmp_path):
    other = model_with_other_tokenizer(tmp_path / "rm")
    proc = run_module("inference.prompt_eval", [
        "--model_name_or_path_baseline", "tiny-llama", "--model_name_or_path_finetune", "tiny-llama",
        "--best_of", 2, "--reward_model", other, "--num_prompts", 2], timeout=300)
    line = error_line(proc)
    assert "different tokenizer" in line and str(other) in line
    assert "==> prompt" not in proc.stdout


def test_choice_means():
    c = Choice(["a", "b", "c", "d"], [0.0, 2.0, 1.0, 2.0], {}, best=1, scores=[0.5, 0.0, 1.0, 1.0])
    assert (c.best_score, c.oracle_score, c.sampled_score) == (0.0, 1.0, 0.625)


# ---- bench.quality: flags, the Step 3 command, the best-of-N rows (no training) ----------------

@pytest.mark.parametrize("flags, message", [
    (["--reward_fn", "r.py:f", "--reward", "output/rm"], "--reward_fn rewards Step 3 without a reward model"),
    (["--reward_fn", "r.py:f", "--policy_pairs", "8"], "cannot go with --reward or --policy_pairs"),
    (["--reward_weights", "1"], "--reward_weights weighs --reward_fn functions"),
    (["--best_of", "0"], "--best_of must be at least 1, got 0"),
    (["--best_of", "2", "--best_of_temperature", "0"], "--best_of_temperature must be > 0"),
    (["--task", "no-such-family"], "no-such-family"),
    (["--reward_fn", "missing.py:f"], "--reward_fn missing.py:f: file missing.py not found"),
])
def test_quality_bench_refusals(tmp_path, capsys, flags, message):
    from bench.quality import check_args, parse_args
    with pytest.raises(SystemExit) as exit_:
        check_args(parse_args([*flags, "--output_dir", str(tmp_path)]))
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())  # nothing trained or written


def test_quality_bench_weights_must_match_the_functions(reward_file, capsys, tmp_path):
    from bench.quality import check_args, parse_args
    with pytest.raises(SystemExit):
        check_args(parse_args(["--reward_fn", f"{reward_file}:longest", "--reward_weights", "1", "2"]))
    assert "--reward_weights has 2 values for 1 rewards (longest)" in capsys.readouterr().err
    check_args(parse_args(["--reward_fn", f"{reward_file}:longest", "--reward_fn", f"{reward_file}:flat",
                           "--reward_weights", "1", "2", "--best_of", "4"]))  # accepted


def test_quality_bench_passes_reward_functions_and_the_task_to_every_step(reward_file, tmp_path):
    from bench.quality import data_flags, parse_args, reward_label, step3_reward_flags, train_data
    from train import PRESETS
    args = parse_args(["--reward_fn", f"{reward_file}:longest", "--reward_fn", "pkg.mod:exact",
                       "--reward_weights", "1", "0.5", "--task", "bundled-constraints"])
    args.reward_used = reward_label(args)
    sft = tmp_path / "sft"
    assert step3_reward_flags(args, sft) == ["--reward_fn", f"{reward_file}:longest", "--reward_fn", "pkg.mod:exact",
                                             "--reward_weights", "1.0", "0.5", "--critic_model_name_or_path", sft]
    data = data_flags(PRESETS["quick"], args)
    assert data.count("--data_path") == 1 and data[data.index("--data_path") + 1] == "bundled-constraints"
    assert "--num_examples" in data and train_data(args) == ["--data-path", "bundled-constraints"]
    plain = parse_args([])  # no --task: the preset's own data, unchanged
    assert data_flags(PRESETS["quick"], plain) == list(PRESETS["quick"].data) and train_data(plain) == []
    plain.reward_used = "checker"
    assert step3_reward_flags(plain, sft) == ["--reward_source", "checker", "--critic_model_name_or_path", sft]
    plain.reward_used = tmp_path / "rm"
    assert step3_reward_flags(plain, sft) == ["--critic_model_name_or_path", tmp_path / "rm"]


def test_quality_bench_policy_pairs_are_ranked_by_the_task_family(monkeypatch, tmp_path):
    """--policy_pairs with --task samples and ranks that family's prompts, not bundled's."""
    from bench import quality
    commands = []
    monkeypatch.setattr(quality, "run", lambda cmd, log, env=None: commands.append([str(c) for c in cmd]))
    args = quality.parse_args(["--task", "bundled-constraints", "--policy_pairs", "8",
                               "--max_new_tokens", "40", "--output_dir", str(tmp_path)])
    quality.check_args(args)  # accepted for a family other than bundled
    assert quality.policy_reward_model(args, tmp_path / "sft", tmp_path / "rm") == tmp_path / "step2_reward_policy"
    sample, train = commands
    assert sample[sample.index("--data_path") + 1] == "bundled-constraints"
    assert sample[sample.index("--max_new_tokens") + 1] == "40"
    assert train[train.index("--data_path") + 1] == str(tmp_path / "policy_pairs.jsonl")


def test_quality_bench_ptx_run_uses_the_task_family_prose(monkeypatch, tmp_path):
    from bench import quality
    from train import PRESETS
    pending = []
    monkeypatch.setattr(quality, "run_side_by_side", lambda runs, jobs: pending.extend(runs))
    args = quality.parse_args(["--task", "bundled-constraints", "--reward", "checker", "--sft", str(tmp_path / "sft"),
                               "--seeds", "7", "--skip", "dpo", "--output_dir", str(tmp_path)])
    models = quality.build_models(args, PRESETS["default"])
    assert set(models) == {"base", "sft", "ppo_seed7", "ppo_seed7_ema", "ppo_seed7_ptx"}
    (ptx,) = [[str(c) for c in cmd] for cmd, log in pending if log.name == "step3_seed7_ptx.log"]
    assert ptx[ptx.index("--unsupervised_dataset_name") + 1] == "bundled-constraints"


def test_quality_bench_best_of_rows_are_paired_with_greedy_sft(monkeypatch):
    """Each row: its per-prompt column's mean and its paired gain over greedy SFT (mean and SE
    of the per-prompt differences); the table shows them."""
    from bench import quality
    from inference import prompt_eval
    from utils.data import tasks
    choices = [Choice(["a", "b"], [1.0, 0.0], {}, best=0, scores=[0.0, 1.0]),
               Choice(["a", "b"], [0.0, 1.0], {}, best=1, scores=[1.0, 1.0]),
               Choice(["a", "b"], [2.0, 2.0], {}, best=0, scores=[0.5, 0.0])]
    seen = {}

    def fake_best_of_for(path, questions, sampling, reward, family):
        seen.update(path=path, n=sampling.n, temperature=sampling.temperature, seed=sampling.seed, reward=reward)
        return choices

    monkeypatch.setattr(prompt_eval, "best_of_for", fake_best_of_for)
    args = quality.parse_args(["--best_of", "2", "--best_of_temperature", "0.7", "--seeds", "9", "--reward", "checker"])
    args.reward_used = quality.CHECKER
    greedy = [0.0, 1.0, 1.0]
    best = quality.best_of_rows(args, tasks.family_of("bundled"), ["q1", "q2", "q3"], "sft", greedy)
    assert seen["n"] == 2 and seen["temperature"] == 0.7 and seen["seed"] == 9 and seen["reward"].names == ["checker"]
    assert best["per_prompt"] == {"sft_sampled": [0.5, 1.0, 0.25], "sft_best_of_2": [0.0, 1.0, 0.5],
                                  "sft_oracle_of_2": [1.0, 1.0, 0.5]}
    row = best["rows"]["SFT best-of-2 under the Step 3 reward"]
    assert row["score"] == pytest.approx(0.5)
    assert row["gain"] == pytest.approx(-0.5 / 3)  # differences 0, 0, -0.5
    assert row["gain_se"] == pytest.approx(statistics.stdev([0.0, 0.0, -0.5]) / 3 ** 0.5)
    oracle = best["rows"]["SFT oracle best-of-2"]
    assert oracle["gain"] == pytest.approx(0.5 / 3)  # differences 1, 0, -0.5
    text = quality.table({"scores": {}, "groups": {}, "other": {}, "by_task": {}, "best_of_n": best})
    assert "| SFT best-of-2 under the Step 3 reward | 0.500 | -0.167 (0.167) |" in text
