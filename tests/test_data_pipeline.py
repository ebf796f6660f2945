"""Split/blend/tokenize/cache of create_prompt_dataset, and the unsupervised (ptx) source."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import logging  # noqa: E402
import multiprocessing as mp  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from utils.config import ConfigError  # noqa: E402
from utils.data import create_prompt_dataset, get_unsupervised_dataset, load_raw_dataset  # noqa: E402
from utils.data import pipeline  # noqa: E402
from utils.data.pipeline import gather_rows, split_indices  # noqa: E402
from utils.data.sources import resolve_source  # noqa: E402

LOCAL = Path(__file__).parent / "fixtures" / "data" / "local"
HUB = Path(__file__).parent / "fixtures" / "data" / "hub"
PREFS = str(LOCAL / "prefs.jsonl")
SFT_CSV = str(LOCAL / "sft.csv")
TRAIN_TEXT = ["Human: What is the capital of France? Assistant: The capital of France is Paris.",
              "How many legs does a spider have? Eight legs. Spell cat backwards: tac.",
              "日本の首都はどこですか？東京です。中国的首都是哪里？北京。", "Hello, nice to meet you!"]


def make_tokenizer(texts=TRAIN_TEXT, vocab_size=300):
    """A tiny byte-level BPE that prepends <s> when asked for special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture
def build_count(monkeypatch):
    calls = []
    original = pipeline.tokenize_rows

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "tokenize_rows", counting)
    return calls


def ids(tok, text, special):
    return tok(text, add_special_tokens=special)["input_ids"]


def rows_of(dataset, field):
    return sorted(tuple(dataset[i][field].tolist()) for i in range(len(dataset)))


# ---- split and blend ----------------------------------------------------------------------

def test_split_indices_are_seeded_disjoint_and_proportional():
    shares = split_indices(100, [0.2, 0.4, 0.4], seed=5)
    assert [len(s) for s in shares] == [20, 40, 40]
    assert sorted(sum((s.tolist() for s in shares), [])) == list(range(100))
    again = split_indices(100, [0.2, 0.4, 0.4], seed=5)
    assert all((a == b).all() for a, b in zip(shares, again))
    assert not (split_indices(100, [0.2, 0.4, 0.4], seed=6)[0] == shares[0]).all()


def _prompts(rows):
    return [s["prompt"] for *_, s in rows]


def test_steps_get_disjoint_shares_of_each_source():
    sources = [resolve_source("bundled")]
    per_phase = [gather_rows(sources, [], [0.2, 0.4, 0.4], p, seed=3, num_examples=500)
                 for p in (1, 2, 3)]
    train = [set(map(tuple, ((s["prompt"], s["chosen"]) for *_, s in r["train"]))) for r in per_phase]
    assert [len(t) for t in train] == [100, 200, 200]
    assert not (train[0] & train[1] or train[0] & train[2] or train[1] & train[2])
    evals = [len(r["eval"]) for r in per_phase]
    assert evals == [10, 20, 20]  # eval capped to a tenth of num_examples, then split the same way
    again = gather_rows(sources, [], [0.2, 0.4, 0.4], 2, seed=3, num_examples=500)
    assert _prompts(again["train"]) == _prompts(per_phase[1]["train"])


def test_blend_takes_each_sources_share_and_shuffles():
    sources = [resolve_source(PREFS), resolve_source("bundled")]
    rows = gather_rows(sources, [], [0.5, 0.5, 0.0], 1, seed=0, num_examples=40)
    names = [r[0] for r in rows["train"]]
    assert names.count(PREFS) == 2 and names.count("bundled") == 20  # 4 and 40 train rows, halved
    assert names != sorted(names, key=lambda n: n != PREFS)  # interleaved, not concatenated
    reshuffled = gather_rows(sources, [], [0.5, 0.5, 0.0], 1, seed=1, num_examples=40)
    assert _prompts(reshuffled["train"]) != _prompts(rows["train"])
    assert sorted(_prompts(reshuffled["train"])) != sorted(_prompts(rows["train"]))  # other split


def test_sft_only_sources_go_whole_to_step1(tok, tmp_path):
    one, one_eval = create_prompt_dataset([PREFS], "2,4,4", tmp_path, 1, 0, tok, 64,
                                          sft_only_data_path=[SFT_CSV])
    base, base_eval = create_prompt_dataset([PREFS], "2,4,4", tmp_path, 1, 0, tok, 64)
    # sft.csv: 3 rows -> 2 train + 1 held-out eval, all of them added to Step 1
    assert (len(one), len(one_eval)) == (len(base) + 2, len(base_eval) + 1)
    assert set(rows_of(base, "input_ids")) < set(rows_of(one, "input_ids"))
    two, _ = create_prompt_dataset([PREFS], "2,4,4", tmp_path, 2, 0, tok, 64,
                                   sft_only_data_path=[SFT_CSV])
    two_base, _ = create_prompt_dataset([PREFS], "2,4,4", tmp_path, 2, 0, tok, 64)
    assert rows_of(two, "chosen_input_ids") == rows_of(two_base, "chosen_input_ids")


# ---- tokenization ------------------------------------------------------------------------

def test_step1_ids_and_labels(tok, tmp_path):
    raw = load_raw_dataset(PREFS, seed=0)
    train, evl = create_prompt_dataset([PREFS], "10,0,0", tmp_path, 1, 0, tok, 512,
                                       eos_token_id=tok.eos_token_id, response_loss_only=True)
    prompts = [ids(tok, s["prompt"], True) for s in raw.train]
    answers = [ids(tok, s["chosen"], False) for s in raw.train]
    assert prompts[0][0] == tok.bos_token_id and answers[0][0] != tok.bos_token_id
    assert rows_of(train, "input_ids") == sorted(tuple(p + a + [2]) for p, a in zip(prompts, answers))
    assert rows_of(train, "labels") == sorted(
        tuple([-100] * len(p) + a + [2]) for p, a in zip(prompts, answers))
    item = train[0]
    assert item["input_ids"].dtype == torch.long and item["input_ids"].dim() == 1
    assert len(evl) == 1


def test_step1_truncates_on_the_right_and_labels_everything_by_default(tok, tmp_path):
    raw = load_raw_dataset(PREFS, seed=0)
    train, _ = create_prompt_dataset([PREFS], "10,0,0", tmp_path, 1, 0, tok, 12)
    full = [ids(tok, s["prompt"], True) + ids(tok, s["chosen"], False) for s in raw.train]
    assert rows_of(train, "input_ids") == sorted(tuple(f[:12]) for f in full)
    assert all(torch.equal(train[i]["input_ids"], train[i]["labels"]) for i in range(len(train)))


def test_step2_pairs(tok, tmp_path):
    raw = load_raw_dataset(PREFS, seed=0)
    train, _ = create_prompt_dataset([PREFS], "0,10,0", tmp_path, 2, 0, tok, 512, eos_token_id=2)
    expect = sorted((tuple(ids(tok, s["prompt"], True) + ids(tok, s["chosen"], False) + [2]),
                     tuple(ids(tok, s["prompt"], True) + ids(tok, s["rejected"], False) + [2]),
                     len(ids(tok, s["prompt"], True)))
                    for s in raw.train)
    got = sorted((tuple(train[i]["chosen_input_ids"].tolist()),
                  tuple(train[i]["rejected_input_ids"].tolist()),
                  train[i]["prompt_length"].item()) for i in range(len(train)))
    assert got == expect


def test_step2_skips_rows_without_rejected(tok, tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"}
                                         if i % 2 else {"prompt": f"q{i}", "chosen": f"a{i}"})
                              for i in range(10)))
    train, evl = create_prompt_dataset([str(path)], "0,10,0", tmp_path, 2, 0, tok, 512)
    assert len(train) + len(evl) == 5
    assert "Step 2: skipped 5 rows without a rejected answer" in caplog.text


def test_step2_chosen_equal_to_rejected_is_an_error(tok, tmp_path):
    path = tmp_path / "same.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(9)]
    rows.append({"prompt": "q9", "chosen": "same", "rejected": "same"})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ConfigError, match=r"same\.jsonl: row 9 \(0-based\) has a chosen answer "
                                          r"equal to the rejected one"):
        create_prompt_dataset([str(path)], "0,1,0", tmp_path / "out", 2, 0, tok, 64)


def test_step2_without_any_pairs_is_an_error(tok, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": f"a{i}"}) for i in range(5)))
    with pytest.raises(ConfigError, match="no Step 2 training rows.*needs sources with rejected"):
        create_prompt_dataset([str(path)], "2,4,4", tmp_path / "out", 2, 0, tok, 64)


def test_step3_prompts_truncated_from_the_left(tok, tmp_path, caplog):
    raw = load_raw_dataset(PREFS, seed=0)
    with caplog.at_level(logging.WARNING):
        train, _ = create_prompt_dataset([PREFS], "0,0,10", tmp_path, 3, 0, tok, 512,
                                         max_prompt_seq_len=6)
    prompts = [ids(tok, s["prompt"], True) for s in raw.train + raw.eval]
    assert rows_of(train, "prompt_input_ids") == sorted(
        tuple(ids(tok, s["prompt"], True)[-6:]) for s in raw.train)
    truncated = sum(len(p) > 6 for p in prompts)
    assert truncated > 0
    warnings = [r.getMessage() for r in caplog.records if "cut from the left" in r.getMessage()]
    assert warnings == [f"Step 3: {truncated} prompts were longer than 6 tokens and were cut from the left"]


def test_bad_split_and_phase(tok, tmp_path):
    with pytest.raises(ConfigError, match="--data_split '1,2' must be three"):
        create_prompt_dataset([PREFS], "1,2", tmp_path, 1, 0, tok, 64)
    with pytest.raises(ConfigError, match="train_phase must be 1, 2 or 3"):
        create_prompt_dataset([PREFS], "2,4,4", tmp_path, 4, 0, tok, 64)


# ---- cache --------------------------------------------------------------------------------

def test_cache_reused_and_rebuilt_on_change(tok, tmp_path, build_count):
    data = tmp_path / "prefs.jsonl"
    shutil.copy(PREFS, data)
    out = tmp_path / "cache"
    args = dict(data_split="10,0,0", output_path=out, train_phase=1, seed=0, max_seq_len=64)
    first, _ = create_prompt_dataset([str(data)], tokenizer=tok, **args)
    assert len(build_count) == 2  # train + eval
    again, _ = create_prompt_dataset([str(data)], tokenizer=tok, **args)
    assert len(build_count) == 2 and again.path == first.path
    assert rows_of(again, "input_ids") == rows_of(first, "input_ids")
    assert sorted(p.name for p in first.path.iterdir()) == ["eval.safetensors", "meta.json",
                                                            "train.safetensors"]

    with open(data, "a", encoding="utf-8") as f:  # edit the source: rebuilt
        f.write(json.dumps({"prompt": "Is fire hot?", "chosen": "Yes.", "rejected": "No."}) + "\n")
    edited, _ = create_prompt_dataset([str(data)], tokenizer=tok, **args)
    assert len(build_count) == 4 and edited.path != first.path
    assert len(edited) == 5  # 6 rows -> 5 train + 1 eval

    other_tok = make_tokenizer(TRAIN_TEXT + ["a different corpus changes the merges"], 280)
    create_prompt_dataset([str(data)], tokenizer=other_tok, **args)
    assert len(build_count) == 6
    for change in ({"max_seq_len": 32}, {"seed": 1}, {"data_split": "9,1,0"}):
        create_prompt_dataset([str(data)], tokenizer=tok, **{**args, **change})
    create_prompt_dataset([str(data)], tokenizer=tok, eos_token_id=2, **args)
    create_prompt_dataset([str(data)], tokenizer=tok, response_loss_only=True, **args)
    create_prompt_dataset([str(data)], tokenizer=tok, num_examples=3, **args)
    assert len(build_count) == 18
    assert len([p for p in out.iterdir() if p.is_dir()]) == 9
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_cache_files_hold_no_pickles(tok, tmp_path):
    train, _ = create_prompt_dataset([PREFS], "10,0,0", tmp_path, 1, 0, tok, 64)
    meta = json.loads((train.path / "meta.json").read_text())
    assert meta["rows"] == {"train": 4, "eval": 1} and meta["key"]["phase"] == 1
    assert all(not p.read_bytes().startswith(b"\x80") for p in train.path.iterdir())


def _dist_worker(rank, world, init_file, tok_dir, data, out, queue):
    os.environ["LOCAL_RANK"] = str(rank)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    built = []
    original = pipeline.tokenize_rows
    pipeline.tokenize_rows = lambda *a, **k: (built.append(1), original(*a, **k))[1]
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    train, _ = create_prompt_dataset([data], "10,0,0", out, 1, 0, tok, 64)
    queue.put((rank, len(built), str(train.path), rows_of(train, "input_ids")))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distributed_rank0_builds_others_reuse(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, tmp_path / "init", str(tmp_path / "tok"),
                                                    PREFS, str(tmp_path / "out"), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert [r[1] for r in results] == [2, 0]  # rank 0 tokenized train + eval, rank 1 nothing
    assert results[0][2:] == results[1][2:]


# ---- unsupervised (ptx) -------------------------------------------------------------------

def _blocks(ds):
    return [ds[i]["input_ids"].tolist() for i in range(len(ds))]


def test_unsupervised_txt_packs_paragraphs_with_eos(tok, tmp_path):
    ds = get_unsupervised_dataset(str(LOCAL / "corpus.txt"), tok, 16, tmp_path, seed=0)
    docs = [d.strip() for d in (LOCAL / "corpus.txt").read_text().split("\n\n") if d.strip()]
    assert len(docs) == 3
    stream = ids(tok, docs[0], False) + [2] + ids(tok, docs[1], False) + [2] + ids(tok, docs[2], False)
    expected = [stream[i:i + 16] for i in range(0, len(stream) - 15, 16)]
    assert sorted(_blocks(ds)) == sorted(expected) and len(ds) == len(stream) // 16
    assert all(torch.equal(ds[i]["labels"], ds[i]["input_ids"]) for i in range(len(ds)))


def test_unsupervised_jsonl_bundled_and_hub(tok, tmp_path, monkeypatch):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TRAIN_TEXT), encoding="utf-8")
    ds = get_unsupervised_dataset(str(path), tok, 8, tmp_path / "o", seed=0)
    stream = sum(([2] + ids(tok, t, False) for t in TRAIN_TEXT), [])[1:]
    assert len(ds) == len(stream) // 8
    assert sorted(_blocks(ds)) == sorted(stream[i:i + 8] for i in range(0, len(ds) * 8, 8))

    assert len(get_unsupervised_dataset("bundled", tok, 64, tmp_path / "o", seed=0)) > 10
    from utils.data import constraints  # each task family's own prose, in its own cache entry
    prose = get_unsupervised_dataset("bundled-constraints", tok, 64, tmp_path / "o", seed=0)
    first_doc = ids(tok, constraints.plain_text_corpus()[0], False)
    stream = [t for i in range(len(prose)) for t in prose[i]["input_ids"].tolist()]
    assert len(prose) > 10 and any(stream[i:i + 8] == first_doc[:8] for i in range(len(stream)))

    def load_dataset(path, name=None, **kw):
        folder = HUB / f"{path}__{name}"
        rows = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    wiki = get_unsupervised_dataset("wikitext", tok, 32, tmp_path / "o", seed=0,
                                    config_name="wikitext-2-raw-v1")
    assert len(wiki) >= 3 and all(len(b) == 32 for b in _blocks(wiki))


def test_unsupervised_bad_inputs(tok, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"content": "x"}))
    with pytest.raises(ConfigError, match=r"needs a 'text' column; it has \['content'\]"):
        get_unsupervised_dataset(str(path), tok, 8, tmp_path, seed=0)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ConfigError, match="fewer than one block of max_seq_len=512"):
        get_unsupervised_dataset(str(short), tok, 512, tmp_path, seed=0)
    with pytest.raises(ConfigError, match="text data file not found"):
        get_unsupervised_dataset(str(tmp_path / "none.txt"), tok, 8, tmp_path, seed=0)
