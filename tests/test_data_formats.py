"""Prompt-only data, row columns carried to Step 3, and conversational rows rendered with the
tokenizer's chat template (--chat_template auto|none)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from tests.test_data_pipeline import make_tokenizer  # noqa: E402
from utils.config import ConfigError  # noqa: E402
from utils.data import DataCollatorPrompt, create_prompt_dataset, load_raw_dataset  # noqa: E402

# SmolLM2-135M-Instruct's own template (read from its GGUF): ChatML with a default system turn
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
          "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "You are terse."}
# conversational rows in each form a file may hold them: (prompt messages, chosen, rejected)
CONVERSATIONS = [
    ([user("What is 2 plus 3?")], "5", "6"),
    ([SYSTEM, user("Name a fruit."), assistant("Apple."), user("Another one?")], "Pear.", "Cat."),
    ([user("Translate 'cat' to Japanese.")], "猫 (ねこ).", "犬."),
    ([user("Spell cat backwards.")], "tac", "act"),
]


def conversational_rows():
    """The same four conversations as a messages row, chosen/rejected conversations, and prompt messages."""
    (p0, c0, r0), (p1, c1, r1), (p2, c2, r2), (p3, c3, r3) = CONVERSATIONS
    return [{"messages": p0 + [assistant(c0)], "rejected": r0},
            {"messages": p1 + [assistant(c1)], "rejected": p1 + [assistant(r1)]},
            {"prompt": p2, "chosen": c2, "rejected": r2},
            {"chosen": p3 + [assistant(c3)], "rejected": p3 + [assistant(r3)]}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.eos_token = "<|im_end|>"  # as SmolLM2's: generation stops at the end of the turn
    return tok


def ids(tok, text, special):
    return tok(text, add_special_tokens=special)["input_ids"]


def template_ids(tok, messages, generation=False):
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def rows_of(dataset, field):
    return sorted(tuple(dataset[i][field].tolist()) for i in range(len(dataset)))


def both(train, evl, field):
    return sorted(rows_of(train, field) + rows_of(evl, field))


# ---- prompt-only data and row columns ------------------------------------------------------

QUESTIONS = [f"What is {a} plus {b}?" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)]]


def prompt_only_file(tmp_path):
    rows = [{"prompt": q, "answer": sum(map(int, q[8:-1].split(" plus "))), "tags": {"n": i, "ok": [True]}}
            for i, q in enumerate(QUESTIONS)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def test_prompt_only_rows_become_prompt_only_samples(tmp_path):
    raw = load_raw_dataset(prompt_only_file(tmp_path), seed=0)
    samples = raw.train + raw.eval
    assert len(samples) == 6 and all(s["chosen"] is None and s["rejected"] is None for s in samples)
    by_prompt = {s["prompt"]: s["columns"] for s in samples}
    assert by_prompt[" Human: What is 5 plus 6? Assistant:"] == {"answer": 11, "tags": {"n": 2, "ok": [True]}}


def test_prompt_only_rows_reach_the_step3_batch_with_their_columns_and_origins(tok, tmp_path):
    path = prompt_only_file(tmp_path)
    train, evl = create_prompt_dataset([path], "0,0,1", tmp_path / "cache", 3, 0, tok, 64)
    assert (len(train), len(evl)) == (5, 1)
    batch = next(iter(DataLoader(train, batch_size=5, collate_fn=DataCollatorPrompt(tok.pad_token_id))))
    assert set(batch) == {"prompt", "prompt_att_mask", "columns", "origins"}
    assert len(batch["columns"]) == len(batch["origins"]) == 5
    for row, (columns, origin) in enumerate(zip(batch["columns"], batch["origins"])):
        text = tok.decode(batch["prompt"][row][batch["prompt_att_mask"][row].bool()], skip_special_tokens=True)
        a, b = map(int, text.split("What is ")[1].split("?")[0].split(" plus "))
        assert columns["answer"] == a + b  # the columns of this very prompt, in batch order
        assert origin == f"{path}: row {columns['tags']['n']}"
        assert QUESTIONS[columns["tags"]["n"]] in text
    again, _ = create_prompt_dataset([path], "0,0,1", tmp_path / "cache", 3, 0, tok, 64)  # from the cache
    assert again.path == train.path
    assert [again[i]["columns"] for i in range(5)] == [train[i]["columns"] for i in range(5)]
    assert (train.path / "train.records.json").exists()


def test_records_are_copies(tok, tmp_path):
    train, _ = create_prompt_dataset([prompt_only_file(tmp_path)], "0,0,1", tmp_path / "cache", 3, 0, tok, 64)
    train[0]["columns"]["answer"] = "changed by a reward function"
    assert train[0]["columns"]["answer"] != "changed by a reward function"


@pytest.mark.parametrize("phase", [1, 2])
def test_steps_1_and_2_on_prompt_only_data_fail_in_one_line(tok, tmp_path, phase):
    path = prompt_only_file(tmp_path)
    with pytest.raises(ConfigError) as e:
        create_prompt_dataset([path], "1,1,1", tmp_path / "cache", phase, 0, tok, 64)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"no Step {phase} training rows")
    assert f"{path}: prompt-only, no chosen answers; Step {phase} needs rows with a chosen answer" in msg


def test_mixed_file_prompt_only_rows_serve_step3_only(tok, tmp_path, caplog):
    rows = [{"prompt": q, "chosen": "yes" if i % 2 else "", "rejected": "no" if i % 2 else None}
            for i, q in enumerate(QUESTIONS)]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    sft, sft_eval = create_prompt_dataset([path], "1,0,0", tmp_path / "c1", 1, 0, tok, 64)
    assert len(sft) + len(sft_eval) == 3  # the three rows with a chosen answer
    yes = ids(tok, " yes", False)
    assert all(d[i]["input_ids"].tolist()[-len(yes):] == yes for d in (sft, sft_eval) for i in range(len(d)))
    assert "Step 1: skipped 3 prompt-only rows" in caplog.text
    prompts, prompts_eval = create_prompt_dataset([path], "0,0,1", tmp_path / "c3", 3, 0, tok, 64)
    assert len(prompts) + len(prompts_eval) == 6


def test_non_json_column_is_refused_in_one_line(tmp_path):
    path = tmp_path / "dated.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Hi?", "chosen": "Hello.",
                                          "when": datetime.datetime(2026, 12, 5, 13, 0)}]), path)
    with pytest.raises(ConfigError) as e:
        load_raw_dataset(str(path))
    assert str(e.value) == (f"{path}: row 0: column 'when' holds a datetime value, which JSON cannot carry to "
                            "Step 3; convert it (e.g. to text) or drop the column")


def test_non_finite_float_column_is_refused(tmp_path):
    path = tmp_path / "nan.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Hi?", "score": float("nan")}]), path)
    with pytest.raises(ConfigError, match="column 'score' holds a float value"):
        load_raw_dataset(str(path))


def test_a_conversation_that_ends_on_a_user_turn_is_a_prompt(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [user("Hi!"), assistant("Hello."), user("Bye?")],
                                               "id": 7}])
    (s,) = load_raw_dataset(path).train + load_raw_dataset(path).eval
    assert (s["prompt"], s["chosen"], s["columns"]) == (" Human: Hi! Assistant: Hello. Human: Bye? Assistant:",
                                                        None, {"id": 7})
    assert s["prompt_messages"] == [user("Hi!"), assistant("Hello."), user("Bye?")]


# ---- conversational rows and the chat template ---------------------------------------------

def test_conversational_prompt_column_keeps_its_messages(tmp_path):
    path = write_jsonl(tmp_path / "conv.jsonl", [{"prompt": [SYSTEM, user("Name a fruit.")], "chosen": "Pear.",
                                                  "level": 2}])
    (s,) = load_raw_dataset(path).train + load_raw_dataset(path).eval
    assert (s["prompt"], s["chosen"], s["rejected"]) == (" System: You are terse. Human: Name a fruit. Assistant:",
                                                         " Pear.", None)
    assert s["prompt_messages"] == [SYSTEM, user("Name a fruit.")] and s["columns"] == {"level": 2}


SKY = "What color is the sky?"
HUMAN_SKY = " Human: What color is the sky? Assistant:"


# TRL's dataset formats (its docs' "Dataset formats and types" table): each row -> the
# (prompt, chosen, rejected, prompt_messages, columns) it loads as
@pytest.mark.parametrize("row, expected", [
    ({"prompt": SKY}, (HUMAN_SKY, None, None, None, {})),
    ({"prompt": SKY, "completion": " It is blue."}, (HUMAN_SKY, " It is blue.", None, None, {})),
    ({"prompt": SKY, "chosen": "Blue.", "rejected": "Green."}, (HUMAN_SKY, " Blue.", " Green.", None, {})),
    # unpaired preference: the completion may be the bad one, so it is not an SFT answer
    ({"prompt": SKY, "completion": "Green.", "label": False},
     (HUMAN_SKY, None, None, None, {"completion": "Green.", "label": False})),
    ({"prompt": [user(SKY)]}, (HUMAN_SKY, None, None, [user(SKY)], {})),
    ({"prompt": [user(SKY)], "completion": [assistant("It is blue.")]},
     (HUMAN_SKY, " It is blue.", None, [user(SKY)], {})),
    ({"prompt": [user(SKY)], "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]},
     (HUMAN_SKY, " Blue.", " Green.", [user(SKY)], {})),
    ({"chosen": [user(SKY), assistant("Blue.")], "rejected": [user(SKY), assistant("Green.")]},
     (HUMAN_SKY, " Blue.", " Green.", [user(SKY)], {})),
    ({"messages": [user(SKY), assistant("It is blue.")]}, (HUMAN_SKY, " It is blue.", None, [user(SKY)], {})),
    # TRL's "-trl-style" sets: a text prompt next to whole conversations
    ({"prompt": SKY, "chosen": [user(SKY), assistant("Blue.")], "rejected": [user(SKY), assistant("Green.")]},
     (HUMAN_SKY, " Blue.", " Green.", [user(SKY)], {})),
], ids=["prompt-only", "prompt-completion", "preference", "unpaired-preference", "conv-prompt-only",
        "conv-prompt-completion", "conv-preference", "conv-implicit-prompt-preference", "conv-messages",
        "trl-style"])
def test_trl_dataset_formats(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "trl.jsonl", [row])
    (s,) = load_raw_dataset(path).train + load_raw_dataset(path).eval
    assert (s["prompt"], s["chosen"], s["rejected"], s.get("prompt_messages"), s["columns"]) == expected


def test_step1_ids_equal_the_chat_template_ids(chat_tok, tmp_path):
    path = write_jsonl(tmp_path / "conv.jsonl", conversational_rows())
    train, evl = create_prompt_dataset([path], "1,0,0", tmp_path / "cache", 1, 0, chat_tok, 256,
                                       eos_token_id=chat_tok.eos_token_id, response_loss_only=True)
    assert train.data_format == "template"
    expected = sorted(tuple(template_ids(chat_tok, p + [assistant(c)])) for p, c, _ in CONVERSATIONS)
    assert both(train, evl, "input_ids") == expected
    # the loss covers the answer tokens only: the labels hide exactly the template's prompt
    masked = sorted((len(template_ids(chat_tok, p, generation=True)),
                     tuple(template_ids(chat_tok, p + [assistant(c)]))) for p, c, _ in CONVERSATIONS)
    got = sorted((sum(t == -100 for t in d[i]["labels"].tolist()), tuple(d[i]["input_ids"].tolist()))
                 for d in (train, evl) for i in range(len(d)))
    assert got == masked


def test_step2_pairs_equal_the_chat_template_ids(chat_tok, tmp_path):
    path = write_jsonl(tmp_path / "conv.jsonl", conversational_rows())
    train, evl = create_prompt_dataset([path], "0,1,0", tmp_path / "cache", 2, 0, chat_tok, 256,
                                       eos_token_id=chat_tok.eos_token_id)
    pairs = sorted((tuple(d[i]["chosen_input_ids"].tolist()), tuple(d[i]["rejected_input_ids"].tolist()),
                    int(d[i]["prompt_length"])) for d in (train, evl) for i in range(len(d)))
    # apply_chat_template's ids through the answer's end-of-text token: ChatML's newline after it
    # is dropped, so the reward model reads its score at the token Step 3's answers end with
    eos = chat_tok.eos_token_id

    def through_eos(messages):
        full = template_ids(chat_tok, messages)
        assert full[-1] != eos and eos in full  # the template does add something after the token
        return tuple(full[:len(full) - full[::-1].index(eos)])
    assert pairs == sorted((through_eos(p + [assistant(c)]), through_eos(p + [assistant(r)]),
                            len(template_ids(chat_tok, p, generation=True))) for p, c, r in CONVERSATIONS)


def test_step3_prompts_equal_the_chat_template_ids(chat_tok, tmp_path):
    path = write_jsonl(tmp_path / "conv.jsonl", conversational_rows())
    train, evl = create_prompt_dataset([path], "0,0,1", tmp_path / "cache", 3, 0, chat_tok, 256)
    assert both(train, evl, "prompt_input_ids") == sorted(tuple(template_ids(chat_tok, p, generation=True))
                                                          for p, _, _ in CONVERSATIONS)


def human_assistant_ids(tok, eos):
    """Step 1 ids of CONVERSATIONS in DeepSpeed-Chat's format: prompt with the tokenizer's
    special tokens, the answer without, then eos."""
    def turn(m):
        return f" {'Human' if m['role'] == 'user' else m['role'].title()}: {m['content']}"
    return sorted(tuple(ids(tok, "".join(map(turn, p)) + " Assistant:", True) + ids(tok, " " + c, False) + [eos])
                  for p, c, _ in CONVERSATIONS)


def test_chat_template_none_keeps_human_assistant(chat_tok, tmp_path):
    path = write_jsonl(tmp_path / "conv.jsonl", conversational_rows())
    train, evl = create_prompt_dataset([path], "1,0,0", tmp_path / "cache", 1, 0, chat_tok, 256,
                                       eos_token_id=chat_tok.eos_token_id, chat_template="none")
    assert both(train, evl, "input_ids") == human_assistant_ids(chat_tok, chat_tok.eos_token_id)
    assert train.data_format == "human_assistant"


def test_plain_rows_keep_human_assistant_under_a_template(chat_tok, tmp_path):
    rows = [{"prompt": "What is 2 plus 3?", "chosen": "5"}, {"prompt": "Spell cat backwards.", "chosen": "tac"}]
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    train, evl = create_prompt_dataset([path], "1,0,0", tmp_path / "cache", 1, 0, chat_tok, 256,
                                       eos_token_id=chat_tok.eos_token_id)
    eos = chat_tok.eos_token_id
    assert both(train, evl, "input_ids") == sorted(
        tuple(ids(chat_tok, f" Human: {r['prompt']} Assistant:", True) + ids(chat_tok, " " + r["chosen"], False)
              + [eos]) for r in rows)
    assert train.data_format == "human_assistant"
    mixed = write_jsonl(tmp_path / "mixed.jsonl", rows + conversational_rows())
    train, _ = create_prompt_dataset([mixed], "1,0,0", tmp_path / "cache", 1, 0, chat_tok, 256)
    assert train.data_format == "mixed"


def test_a_tokenizer_without_template_keeps_human_assistant(tok, tmp_path):
    path = write_jsonl(tmp_path / "conv.jsonl", conversational_rows())
    train, evl = create_prompt_dataset([path], "1,0,0", tmp_path / "cache", 1, 0, tok, 256,
                                       eos_token_id=tok.eos_token_id)
    assert both(train, evl, "input_ids") == human_assistant_ids(tok, tok.eos_token_id)


def test_cache_key_follows_the_mode_and_the_template(chat_tok, tmp_path):
    path = write_jsonl(tmp_path / "conv.jsonl", conversational_rows())

    def build(tokenizer, mode):
        return create_prompt_dataset([path], "0,0,1", tmp_path / "cache", 3, 0, tokenizer, 256,
                                     chat_template=mode)[0].path
    auto, none = build(chat_tok, "auto"), build(chat_tok, "none")
    assert auto != none and build(chat_tok, "auto") == auto
    other = make_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    other.chat_template = CHATML.replace("You are a helpful AI assistant", "You help")
    assert build(other, "auto") not in (auto, none)


def test_a_template_that_does_not_extend_the_prompt_is_refused(tmp_path):
    tok = make_tokenizer()
    # renders the generation prompt as "<assistant>" but a finished turn as "<a>": no common prefix
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<a>{{ m['content'] }}"
                         "{% else %}<u>{{ m['content'] }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    path = write_jsonl(tmp_path / "conv.jsonl", conversational_rows()[:1])
    with pytest.raises(ConfigError) as e:
        create_prompt_dataset([path], "1,0,0", tmp_path / "cache", 1, 0, tok, 256)
    assert "\n" not in str(e.value) and str(e.value).endswith("use --chat_template none")
    assert str(e.value).startswith(f"{path}: row 0: the tokenizer's chat template does not render")


def test_bad_mode_is_a_config_error(chat_tok, tmp_path):
    with pytest.raises(ConfigError, match="--chat_template must be one of auto, none, got 'always'"):
        create_prompt_dataset(["bundled"], "1,0,0", tmp_path / "cache", 1, 0, chat_tok, 64, chat_template="always")


# ---- the recorded format and chat.py ------------------------------------------------------

def test_step_data_records_the_format_in_the_saved_config(chat_tok, tmp_path, monkeypatch):
    from training import skeleton
    from training.step1_supervised_finetuning.main import SFTConfig
    monkeypatch.setattr(skeleton, "make_loaders", lambda train, evl, collate, cfg: (train, None, evl))
    path = write_jsonl(tmp_path / "conv.jsonl", conversational_rows())
    for mode, expected in (("auto", "template"), ("none", "human_assistant")):
        cfg = SFTConfig(data_path=[path], data_split="1,0,0", data_output_path=str(tmp_path / "cache"),
                        chat_template=mode)
        skeleton.step_data(skeleton.Step(cfg), chat_tok)
        assert dataclasses.asdict(cfg)["data_format"] == expected  # what finish_run saves


@pytest.mark.parametrize("record,expected", [
    ({"data_format": "template"}, "template"), ({"data_format": "mixed"}, "template"),
    ({"data_format": "human_assistant"}, "human_assistant"), ({}, "human_assistant"), (None, "auto")])
def test_chat_talks_in_the_format_the_model_trained_on(tmp_path, record, expected):
    """A model trained here (training_config.json; older ones record no data_format) gets its
    training format; any other model stays on auto (its tokenizer's template if it has one)."""
    from inference.chat import default_prompt_format
    if record is not None:
        (tmp_path / "training_config.json").write_text(json.dumps(record))
    assert default_prompt_format(str(tmp_path), "auto") == expected
    assert default_prompt_format(str(tmp_path), "human_assistant") == "human_assistant"
