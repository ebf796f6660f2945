"""The constraints task family (utils.data.constraints), its data source, the task registry and
the example reward functions."""
from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest

from tests.helpers import ROOT
from utils.data import bundled, constraints, tasks
from utils.data.sources import BundledSource, resolve_source

ROWS = constraints.generate_examples(1500, seed=0)


def test_chosen_meets_every_rule_and_rejected_breaks_one():
    for row in ROWS:
        assert constraints.score(row["prompt"], row["chosen"]) == 1.0, row
        assert constraints.score(row["prompt"], row["rejected"]) < 1.0, row


def test_generation_is_deterministic_and_prompts_distinct():
    assert constraints.generate_examples(200, seed=3) == constraints.generate_examples(200, seed=3)
    assert constraints.generate_examples(50, seed=3) != constraints.generate_examples(50, seed=4)
    assert len({r["prompt"] for r in ROWS}) == len(ROWS)


def test_the_prompt_text_gives_back_the_row_constraints_for_every_phrasing():
    for row in ROWS:
        assert constraints.parse_constraints(row["prompt"]) == row["constraints"]
        wrapped = f" Human: {row['prompt']} Assistant:"
        assert constraints.parse_constraints(wrapped) == row["constraints"]
        assert json.loads(json.dumps(row["constraints"])) == row["constraints"]
    used = {(c["kind"], phrase) for row in ROWS for c in row["constraints"]
            for phrase in constraints._PHRASES[c["kind"]]
            if constraints._compile(phrase).search(row["prompt"])}
    assert used == {(k, p) for k, ps in constraints._PHRASES.items() for p in ps}
    assert {constraints.question_of(r["prompt"]).split(" the ")[0] for r in ROWS} == {
        o.split(" the ")[0] for o in constraints._OPENERS}


def test_every_kind_appears_alone_and_in_pairs_and_answers_stay_short():
    kinds = [tuple(c["kind"] for c in r["constraints"]) for r in ROWS]
    assert {k[0] for k in kinds if len(k) == 1} == set(constraints.KINDS)
    assert 0.4 < sum(len(k) == 2 for k in kinds) / len(kinds) < 0.8
    assert max(len(r["chosen"].split()) for r in ROWS) <= 30  # ~40 SmolLM2 tokens


PROMPT = "Describe the {t}. {rules}"
CASES = [  # (rules, response, expected score)
    ("Answer in exactly 5 words.", "The cat is very calm.", 1.0),
    ("Answer in exactly 5 words.", "The cat is calm.", 0.0),
    ("Use exactly 3 words.", "- the cat's bowl", 1.0),  # a bullet mark is no word
    ("Answer in at most 6 words.", "The cat is calm.", 1.0),
    ("Use no more than 3 words.", "The cat is calm.", 0.0),
    ("Answer in exactly 2 sentences.", "The cat is calm. It sleeps!", 1.0),
    ("Write exactly 3 sentences.", "The cat is calm. It sleeps", 0.0),
    ("Answer in exactly 2 sentences.", "<<Cats>>\nThe cat is calm. It sleeps.", 1.0),
    ("Answer with exactly 2 bullet points starting with '- '.", "- soft fur\n- green eyes", 1.0),
    ("Use exactly 3 bullet points, each on its own line starting with '- '.", "- a\n- b", 0.0),
    ('Answer in JSON with the keys "color" and "size".', '{"color": "red", "size": "big"}', 1.0),
    ('Reply with a JSON object with the keys "color", "size" and "name".', '{"color": "red"}', 0.0),
    ('Answer in JSON with the keys "color" and "size".', 'Sure: {"color": "red", "size": "big"}', 0.0),
    ("Include the word 'calm'.", "It is CALM.", 1.0),
    ("Use the word 'calm' somewhere.", "It is calmer.", 0.0),
    ("Do not use the word 'cat'.", "It is calm.", 1.0),
    ("Never say the word 'cat'.", "The Cat is calm.", 0.0),
    ("End your answer with the word 'today'.", '"It is calm today."', 1.0),
    ("The last word must be 'today'.", "Today it is calm.", 0.0),
    ("Write everything in capital letters.", "THE CAT IS CALM.", 1.0),
    ("Answer in uppercase letters only.", "THE CAT IS Calm.", 0.0),
    ("Wrap your whole answer in double quotes.", '  "The cat is calm."  ', 1.0),
    ("Put your entire answer inside double quotes.", 'The cat is "calm".', 0.0),
    ("Give it a title in double angular brackets, like <<title>>.", "<<My Cat>>\nIt is calm.", 1.0),
    ("Add a title wrapped in << and >>.", "<< >> It is calm.", 0.0),
    ("Answer in exactly 4 words. Include the word 'calm'.", "The cat is calm.", 1.0),
    ("Answer in exactly 4 words. Include the word 'calm'.", "The cat is quiet.", 0.5),
    ("Answer in exactly 4 words. Include the word 'calm'.", "The cat is quiet today.", 0.0),
    ("Write everything in capital letters. Wrap your whole answer in double quotes.", "...", 0.0),
]


@pytest.mark.parametrize("rules,response,expected", CASES)
def test_hand_written_cases(rules, response, expected):
    prompt = PROMPT.format(t="cat", rules=rules)
    assert constraints.is_task_prompt(prompt)
    assert constraints.score(prompt, response) == expected


def test_every_kind_has_a_hand_written_case():
    kinds = {c["kind"] for rules, _, _ in CASES
             for c in constraints.parse_constraints(PROMPT.format(t="cat", rules=rules))}
    assert kinds == set(constraints.KINDS)


def test_other_text_is_not_a_task_prompt():
    for text in ("Describe the cat.", "Describe the cat. Be nice.", "What is 2 plus 3? Answer with "
                 "the number only.", "Describe the cat. Use exactly five words.", "",
                 "Describe the cat. Include the word 'calm'. Tell a joke."):
        assert not constraints.is_task_prompt(text)
        with pytest.raises(ValueError, match="not a constraints task prompt"):
            constraints.score(text, "x")


def test_task_of_names_the_kinds_in_a_fixed_order():
    p = PROMPT.format(t="cat", rules="Include the word 'calm'. Answer in exactly 4 words.")
    assert constraints.task_of(p) == "word_exact+include"
    assert constraints.score_batch([p, p], ["The cat is calm.", ""]) == [1.0, 0.0]
    with pytest.raises(ValueError):
        constraints.score_batch([p], [])


def test_bundled_rows_and_fingerprint_are_unchanged():
    rows = json.dumps(bundled.generate_examples(), sort_keys=True).encode()
    assert hashlib.sha256(rows).hexdigest() == (
        "3423d247fe0c39142b3bcf3185315aff384354ed93c6d0face1c871a833140d3")
    src = resolve_source("bundled")
    assert src.fingerprint() == ("bundled:6000:split1234:8ff6cf73251830c509f79d5af7f3d81c7ad1e482"
                                 "b69250838d222502ea11d550")
    raw = src.load(1234)
    # every sample now carries its row's other columns: none for bundled, the rest as before
    assert all(s.pop("columns") == {} for s in raw.train + raw.eval)
    assert hashlib.sha256(json.dumps([raw.train, raw.eval], sort_keys=True).encode()).hexdigest() == (
        "fbd8ee90a464803f4d83fc84bdc9cc7d9b73a0fe12cd72f5e19d95140e93bd5c")


def test_constraints_source_has_a_fixed_split_and_a_constraints_column():
    src = resolve_source("bundled-constraints")
    assert isinstance(src, BundledSource) and src.name == "bundled-constraints"
    assert src.fingerprint().startswith("bundled-constraints:6000:split1234:")
    a, b = src.load(1), src.load(99)
    assert a.eval == b.eval and len(a.eval) == 600 and a.has_rejected
    for s in a.eval[:50]:
        assert s["prompt"].startswith(" Human: ") and s["prompt"].endswith(" Assistant:")
        rules = json.loads(s["columns"]["constraints"])
        assert constraints.parse_constraints(s["prompt"]) == rules
        assert constraints.score(s["prompt"], s["chosen"]) == 1.0
    assert resolve_source("bundled").load(1).eval[0]["columns"] == {}


def test_registry():
    f = tasks.family_of("bundled-constraints")
    assert f is tasks.family("bundled-constraints") and f.module is constraints
    assert tasks.family_of(["bundled", "bundled"]).module is bundled
    assert tasks.family_of(["bundled", "bundled-constraints"]) is None
    assert tasks.family_of("data/pairs.jsonl") is None
    from utils.config import ConfigError
    with pytest.raises(ConfigError, match="unknown task family"):
        tasks.family("nope")
    questions = f.held_out(5)
    held = resolve_source("bundled-constraints").load(0).eval[:5]
    assert questions == [constraints.question_of(s["prompt"]) for s in held]
    assert all(f.is_task_prompt(q) and f.score(q, "") == 0.0 for q in questions)
    assert f.score_batch(questions[:1], ["x"]) == [f.score(questions[0], "x")]
    assert f.task_of(questions[0]) == constraints.task_of(questions[0])
    assert tasks.family_of_prompt(questions[0]) is f
    assert tasks.family_of_prompt(tasks.family("bundled").held_out(1)[0]).name == "bundled"
    assert tasks.family_of_prompt("hello") is None


def _load_file(path: str, name: str):
    spec = importlib.util.spec_from_file_location(f"_file_{name}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def test_constraints_reward_as_file_and_module_uses_the_column_or_the_prompt():
    from examples.rewards.constraints import constraints_reward
    as_file = _load_file("examples/rewards/constraints.py", "constraints_reward")
    p = PROMPT.format(t="cat", rules="Answer in exactly 4 words.")
    prompts, answers = [p, p, "What is 2 plus 3?"], ["The cat is calm.", "THE CAT.", "5"]
    for fn in (constraints_reward, as_file):
        assert fn(prompts=prompts, completions=answers) == [1.0, 0.0, None]
        column = [json.dumps([{"kind": "upper"}]), [{"kind": "upper"}], None]
        assert fn(prompts=prompts, completions=answers, constraints=column, other=[1, 2, 3]) == [
            0.0, 1.0, None]
    with pytest.raises(ValueError, match="aligned"):
        constraints_reward(prompts=[p], completions=[])


def test_bundled_math_and_length_rewards():
    from examples.rewards.bundled_math import bundled_math_reward
    from examples.rewards.length import length_reward
    as_file = _load_file("examples/rewards/bundled_math.py", "bundled_math_reward")
    prompts = ["What is 2 plus 3? Answer with the number only.", "Describe the cat. Be nice."]
    for fn in (bundled_math_reward, as_file):
        assert fn(prompts=prompts, completions=["5", "x"]) == [1.0, None]
        assert fn(prompts=prompts[:1], completions=["The answer is 5."]) == [0.5]
    long = " ".join(["word"] * 50)
    assert length_reward(prompts=prompts, completions=["short", long]) == [0.0, -0.5]
    assert length_reward(prompts=prompts[:1], completions=[long], max_words=10) == [-1.0]


def test_policy_comparisons_take_the_family_from_data_path(tmp_path):
    from training.step2_reward_model_finetuning import policy_comparisons as pc
    prompts = pc.step2_prompts("2,4,4", 600, 1234, 20, "bundled-constraints")
    assert prompts and all(constraints.is_task_prompt(p) for p in prompts)
    args = pc.parse_args(["--model_name_or_path", "m", "--output_file", str(tmp_path / "o.jsonl"),
                          "--data_path", "bundled-constraints"])
    assert args.data_path == "bundled-constraints"
    with pytest.raises(SystemExit):
        pc.parse_args(["--model_name_or_path", "m", "--output_file", str(tmp_path / "o.jsonl"),
                       "--data_path", "pairs.jsonl"])
