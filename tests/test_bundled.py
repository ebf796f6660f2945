"""The embedded verifiable data set: generator properties and the ground-truth checker."""
from collections import Counter

import pytest

from utils.data.bundled import (TASKS, generate_examples, is_task_prompt, plain_text_corpus,
                                score, score_batch, task_of, tokenizer_training_text)

N = 4000


@pytest.fixture(scope="module")
def examples():
    return generate_examples(N, seed=0)


def test_deterministic_and_seeded(examples):
    assert generate_examples(N, seed=0) == examples
    other = generate_examples(N, seed=1)
    assert len(other) == N
    assert sum(a["prompt"] == b["prompt"] for a, b in zip(examples, other)) < N // 100


def test_shape_balance_uniqueness(examples):
    assert len(TASKS) >= 10 and len(set(TASKS)) == len(TASKS)
    assert all(set(ex) == {"prompt", "chosen", "rejected", "task"} for ex in examples)
    counts = Counter(ex["task"] for ex in examples)
    assert set(counts) == set(TASKS)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert len({ex["prompt"] for ex in examples}) == N
    assert all(ex["chosen"] != ex["rejected"] for ex in examples)
    assert not any("Human:" in ex["prompt"] or "Assistant:" in ex["prompt"] for ex in examples)
    # short answers: the small models must be able to produce them
    assert max(len(ex["chosen"].split()) for ex in examples) <= 12
    assert max(len(ex["chosen"]) for ex in examples) <= 50


def test_prompt_templates_vary(examples):
    for task in TASKS:
        heads = {" ".join(ex["prompt"].split()[:3]) for ex in examples if ex["task"] == task}
        assert len(heads) >= 2, task


def test_checker_agrees_with_generator(examples):
    chosen = score_batch([ex["prompt"] for ex in examples], [ex["chosen"] for ex in examples])
    rejected = score_batch([ex["prompt"] for ex in examples], [ex["rejected"] for ex in examples])
    assert chosen == [1.0] * N
    assert all(r < 1.0 for r in rejected)
    # both kinds of rejection, in every task: wrong content (0) and broken format (0.5)
    for task in TASKS:
        kinds = Counter(r for r, ex in zip(rejected, examples) if ex["task"] == task)
        assert kinds[0.0] >= 20 and kinds[0.5] >= 20, (task, kinds)


def test_wrapped_prompts(examples):
    for ex in examples[:200]:
        wrapped = f" Human: {ex['prompt']} Assistant:"
        assert score(wrapped, ex["chosen"]) == 1.0
        assert score(f"\n\nHuman: {ex['prompt']}\n\nAssistant:", f" {ex['chosen']}\n") == 1.0
        assert score(wrapped, ex["rejected"]) == score(ex["prompt"], ex["rejected"])


# (prompt, response, expected score): correct, wrong, format broken, per task kind.
CASES = [
    ("What is 17 plus 25? Answer with the number only.", "42", 1.0),
    ("What is 17 plus 25? Answer with the number only.", " 42. ", 1.0),
    ("What is 17 plus 25? Answer with the number only.", "43", 0.0),
    ("What is 17 plus 25? Answer with the number only.", "The answer is 42.", 0.5),
    ("What is 17 plus 25? Answer with the number only.", "42 is not right, it is 41", 0.0),
    ("What is 17 plus 25? Answer with the number only.", "forty-two", 0.0),
    ("Subtract 9 from 30. Reply with just the number.", "21", 1.0),
    ("Subtract 9 from 30. Reply with just the number.", "-21", 0.0),
    ("What is the difference between 30 and 9? Reply with just the number.", "Sure, 21", 0.5),
    ("Multiply 7 by 8. Give only the number as your answer.", "56", 1.0),
    ("Compute 7 * 8. Give only the number as your answer.", "54", 0.0),
    ("Which is smaller, 71 or 38? Answer with the number only.", "38", 1.0),
    ("Which is larger, 71 or 38? Answer with the number only.", "38", 0.0),
    ("Which number is bigger: 71 or 38? Answer with the number only.", "It is 71", 0.5),
    ("What is the largest number in the list 4, 91, 23? Answer with the number only.", "91", 1.0),
    ("Find the minimum of 4, 91, 23. Answer with the number only.", "91", 0.0),
    ("Find the minimum of 4, 91, 23. Answer with the number only.", "4", 1.0),
    ("Add up 3, 5, 10. Reply with just the number.", "18", 1.0),
    ("Add up 3, 5, 10. Reply with just the number.", "The total is 18", 0.5),
    ("How many numbers are in the list 8, 8, 1, 0? Answer with the number only.", "4", 1.0),
    ("How many numbers are in the list 8, 8, 1, 0? Answer with the number only.", "3", 0.0),
    ("Sort 30, 4, 12 in ascending order. Answer with the numbers separated by commas.",
     "4, 12, 30", 1.0),
    ("Sort 30, 4, 12 in ascending order. Answer with the numbers separated by commas.",
     "4,12,30", 1.0),
    ("Sort 30, 4, 12 in ascending order. Answer with the numbers separated by commas.",
     "30, 12, 4", 0.0),
    ("Sort the numbers 30, 4, 12 from largest to smallest. Reply with the list only, comma "
     "separated.", "30, 12, 4", 1.0),
    ("Sort 30, 4, 12 in ascending order. Answer with the numbers separated by commas.",
     "[4, 12, 30]", 0.5),
    ("Sort 30, 4, 12 in ascending order. Answer with the numbers separated by commas.",
     "4 12 30", 0.5),
    ("Sort 30, 4, 12 in ascending order. Answer with the numbers separated by commas.",
     "4, 12, 30, 31", 0.0),
    ("Reverse the list 1, 2, 3, 9. Answer with the numbers separated by commas.", "9, 3, 2, 1",
     1.0),
    ("Reverse the list 1, 2, 3, 9. Answer with the numbers separated by commas.", "1, 2, 3, 9",
     0.0),
    ("Reverse the word 'tiger'. Answer with the word only.", "regit", 1.0),
    ("Reverse the word 'tiger'. Answer with the word only.", "REGIT", 1.0),  # case not asked
    ("Reverse the word 'tiger'. Answer with the word only.", "tiger", 0.0),
    ("Spell 'tiger' backwards. Answer with the word only.", "Reversed it is regit.", 0.5),
    ("Reverse the word 'tiger'. Answer in uppercase.", "REGIT", 1.0),
    ("Reverse the word 'tiger'. Answer in uppercase.", "regit", 0.5),
    ("Write 'apple' in uppercase letters. Answer with the word only.", "APPLE", 1.0),
    ("Write 'apple' in uppercase letters. Answer with the word only.", "apple", 0.0),
    ("Write 'apple' in uppercase letters. Answer with the word only.", "Apple", 0.0),
    ("Write 'apple' in uppercase letters. Answer with the word only.", "Here: APPLE", 0.5),
    ("Convert the word 'APPLE' to lowercase. Reply with just the word.", "apple", 1.0),
    ("Convert the word 'Apple' to lowercase. Reply with just the word.", "Apple", 0.0),
    ("How many times does the letter 'a' appear in 'banana'? Answer with the number only.", "3",
     1.0),
    ("How many times does the letter 'a' appear in 'banana'? Answer with the number only.", "2",
     0.0),
    ("How many 'z' letters are in 'banana'? Answer with the number only.", "0", 1.0),
    ("Count the letter 'n' in the word 'banana'. Answer with the number only.",
     "There are 2", 0.5),
    ("What is the first letter of 'zebra'? Answer with the letter only.", "z", 1.0),
    ("What letter does 'zebra' end with? Answer with the letter only.", "a", 1.0),
    ("What letter does 'zebra' end with? Answer with the letter only.", "z", 0.0),
    ("What letter does 'zebra' start with? Answer in uppercase.", "Z", 1.0),
    ("What letter does 'zebra' start with? Answer in uppercase.", "z", 0.5),
    ("Repeat the word 'cat' 3 times, separated by commas. Answer with the words only.",
     "cat, cat, cat", 1.0),
    ("Repeat the word 'cat' 3 times, separated by commas. Answer with the words only.",
     "cat,cat,cat", 1.0),
    ("Repeat the word 'cat' 3 times, separated by commas. Answer with the words only.",
     "cat cat cat", 0.5),
    ("Repeat the word 'cat' 3 times, separated by commas. Answer with the words only.",
     "cat, cat", 0.0),
    ("Repeat the word 'cat' 3 times, separated by commas. Answer with the words only.",
     "cat, cat, cat, cat", 0.0),
    ("Say 'cat' 2 times with commas between them. Answer in uppercase.", "CAT, CAT", 1.0),
    ("Say 'cat' 2 times with commas between them. Answer in uppercase.", "cat, cat", 0.5),
    ("Is 14 even? Answer yes or no.", "yes", 1.0),
    ("Is 14 even? Answer yes or no.", "Yes.", 1.0),
    ("Is 14 an odd number? Answer yes or no.", "no", 1.0),
    ("Is 14 odd? Answer yes or no.", "yes", 0.0),
    ("Is 14 even? Reply with yes or no only.", "Yes, 14 is even.", 0.5),
    ("Is 5 greater than 9? Answer yes or no.", "no", 1.0),
    ("Is 5 smaller than 9? Answer yes or no.", "no", 0.0),
    ("Is 5 less than 9? Answer yes or no.", "The answer is yes", 0.5),
    ("Sort these words alphabetically: pear, apple, kiwi. Reply in exactly three words.",
     "apple kiwi pear", 1.0),
    ("Sort these words alphabetically: pear, apple, kiwi. Reply in exactly three words.",
     "apple, kiwi, pear", 1.0),
    ("Sort these words alphabetically: pear, apple, kiwi. Reply in exactly three words.",
     "pear apple kiwi", 0.0),
    ("Put pear, apple and kiwi in alphabetical order. Reply in exactly three words.",
     "In order: apple kiwi pear", 0.5),
    ("Put pear, apple and kiwi in alphabetical order. Reply in exactly three words.",
     "", 0.0),
]


@pytest.mark.parametrize("prompt,response,expected", CASES)
def test_score_cases(prompt, response, expected):
    assert score(prompt, response) == expected
    assert score(f" Human: {prompt} Assistant:", response) == expected


def test_every_task_has_hand_cases():
    covered = Counter(task_of(p) for p, _, _ in CASES)
    assert set(covered) == set(TASKS)


def test_task_of_names_the_generating_task(examples):
    assert all(task_of(ex["prompt"]) == ex["task"] for ex in examples[:500])
    assert task_of(f" Human: {examples[0]['prompt']} Assistant:") == examples[0]["task"]
    with pytest.raises(ValueError):
        task_of("Tell me a joke.")


def test_unknown_prompt_rejected():
    assert not is_task_prompt("Tell me a joke.")
    assert is_task_prompt(" Human: Is 3 odd? Answer yes or no. Assistant:")
    with pytest.raises(ValueError):
        score("Tell me a joke.", "no")
    with pytest.raises(ValueError):
        score_batch(["Is 3 odd? Answer yes or no."], [])


def test_plain_text_corpus():
    corpus = plain_text_corpus()
    assert 200 <= len(corpus) <= 1000
    assert corpus == plain_text_corpus()
    assert len(set(corpus)) > 0.9 * len(corpus)
    assert all(p.strip() and "Human:" not in p for p in corpus)
    assert any("In words it is written one hundred" in p for p in corpus)


def test_tokenizer_text_covers_wrapper_digits_and_answers():
    text = list(tokenizer_training_text())
    joined = "\n".join(text)
    assert " Human: " in joined and " Assistant: " in joined
    assert all(str(d) in joined for d in range(10))
    assert plain_text_corpus()[0] in text
