"""Raw sources: every hub adapter on its real-schema fixture, every local format, bad inputs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from utils.config import ConfigError  # noqa: E402
from utils.data import RawDataset, load_raw_dataset  # noqa: E402
from utils.data.raw_datasets import HUB_ADAPTERS, holdout, strip_citations  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "data"
HUB = FIXTURES / "hub"
LOCAL = FIXTURES / "local"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class FakeHub:
    """datasets.load_dataset serving <root>/<org>__<name>[__config]/<split>.jsonl."""

    def __init__(self, roots):
        self.roots, self.calls = roots, []

    def load_dataset(self, path, name=None, **kwargs):
        self.calls.append((path, name))
        folder_name = path.replace("/", "__") + (f"__{name}" if name else "")
        folder = next((r / folder_name for r in self.roots if (r / folder_name).is_dir()), None)
        if folder is None:
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")
        return datasets.DatasetDict({f.stem: datasets.Dataset.from_list(read_jsonl(f))
                                     for f in sorted(folder.glob("*.jsonl"))})


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    hub = FakeHub([HUB, tmp_path / "hub"])
    monkeypatch.setattr(datasets, "load_dataset", hub.load_dataset)
    return hub


def triples(samples):
    return [(s["prompt"], s["chosen"], s["rejected"]) for s in samples]


P1 = "東京タワーは東京都港区にある総合電波塔である。高さは333メートルで、1958年に完成した。"
P2 = "琵琶湖は滋賀県にある日本最大の湖である。面積は約670平方キロメートルである。"
P3 = "将棋は二人で行う日本の伝統的なボードゲームである。駒は全部で40枚使う。"
H = " Human: {} Assistant:".format

# name -> (load_dataset args, train rows, eval rows); eval None = seeded 10% held out of train
EXPECTED = {
    "Dahoas/rm-static": (("Dahoas/rm-static", None), [
        ("\n\nHuman: How do I clean fingerprints off a laptop screen?\n\nAssistant:",
         " Turn the laptop off, then wipe the screen gently with a microfiber cloth lightly dampened with water.",
         " Spray glass cleaner straight onto the screen and scrub it with a paper towel."),
        ("\n\nHuman: What is a good name for a goldfish?\n\nAssistant: How about Bubbles?\n\nHuman: "
         "Something more unusual, please.\n\nAssistant:",
         " You could call it Captain Nemo, Goldie Hawn, or Sir Swims-a-Lot.", " Bubbles."),
        ("\n\nHuman: Can you recommend a book about the history of tea?\n\nAssistant:",
         " For All the Tea in China by Sarah Rose tells how Robert Fortune smuggled tea plants out of China.",
         " I don't really read books."),
    ], [
        ("\n\nHuman: Why is the sky blue?\n\nAssistant:",
         " Sunlight is scattered by air molecules, and blue light is scattered much more than red light.",
         " Because it reflects the ocean."),
        ("\n\nHuman: How long should I boil an egg?\n\nAssistant:",
         " About six minutes for a soft yolk and nine to ten minutes for a hard-boiled egg.", " Two hours."),
    ]),
    "Dahoas/full-hh-rlhf": (("Dahoas/full-hh-rlhf", None), [
        ("\n\nHuman: What are some cuss words in english?\n\nAssistant:",
         " I'd rather not list offensive words, but I can explain why certain words are considered rude.",
         " Here is a list of them."),
        ("\n\nHuman: How do I make a cup of green tea?\n\nAssistant:",
         " Heat water to about 80 °C, pour it over the leaves and steep for two to three minutes.",
         " Boil the leaves for half an hour."),
    ], [
        ("\n\nHuman: Is it safe to swim right after eating?\n\nAssistant:",
         " Yes. The idea that you must wait an hour is a myth, though a very large meal may make you feel sluggish.",
         " No, you will drown."),
    ]),
    "Dahoas/synthetic-instruct-gptj-pairwise": (("Dahoas/synthetic-instruct-gptj-pairwise", None), [
        (H("I was wondering if you could walk me through the process of setting up a hydroponic garden for herbs."),
         " Sure! Choose a container, add a net pot with a growing medium, fill the reservoir with nutrient "
         "solution and give the herbs 14 hours of light a day.", " Hydroponics is a type of agriculture."),
        (H("What is the best way to store fresh basil?"),
         " Trim the stems and keep the basil in a glass of water on the counter, loosely covered with a plastic bag.",
         " Put it in the freezer whole."),
        (H("Give me three tips for writing a cover letter."),
         " Address it to a person, open with why you want this job, and show one concrete result you achieved.",
         " Write a cover letter."),
        (H("How do I convert Celsius to Fahrenheit?"),
         " Multiply the Celsius temperature by 9/5 and add 32.", " Add 100 to it."),
    ], None),
    "yitingxie/rlhf-reward-datasets": (("yitingxie/rlhf-reward-datasets", None), [
        ("\n\nHuman: Do you know why turkeys became the official food of thanksgiving?\n\nAssistant:",
         " The Pilgrims probably ate wild fowl, and by the 1800s turkey was cheap and big enough to feed a whole family.",
         " I know that the American Heritage Dictionary says so."),
        ("\n\nHuman: How can I keep my cat off the kitchen counter?\n\nAssistant:",
         " Give the cat a taller place to perch nearby and make the counter less appealing with double-sided tape.",
         " Cats like counters."),
    ], [
        ("\n\nHuman: What is the capital of Australia?\n\nAssistant:",
         " The capital of Australia is Canberra.", " Sydney."),
    ]),
    "openai/webgpt_comparisons": (("openai/webgpt_comparisons", None), [  # the tie is dropped
        (H("Why do onions make you cry?"),
         " Cutting an onion releases syn-propanethial-S-oxide, a gas that irritates the eyes. "
         "The eyes make tears to wash it away.", " Onions are sad."),
        (H("How do noise cancelling headphones work?"),
         " Microphones pick up the outside noise and the headphones play the same sound wave inverted, "
         "which cancels it out.", " They play the sound."),
        (H("What causes the seasons on Earth?"),
         " The tilt of Earth's axis, about 23.5 degrees, changes how directly sunlight hits each hemisphere "
         "during the year.", " The distance to the sun changes."),
    ], None),
    "stanfordnlp/SHP": (("stanfordnlp/SHP", None), [
        (H("In an interstellar burst, am I moving at the speed of light?"),
         " No. Nothing with mass can reach the speed of light.", " Yes, briefly."),
        (H("Why does my bread come out dense?"),
         " Usually the dough is under-proofed: let it rise until it has doubled in size.", " Too little kneading."),
        (H("Did medieval people really think the Earth was flat?"),
         " No. Educated medieval Europeans knew the Earth was a sphere; the flat-Earth myth is from the 19th century.",
         " Everyone did."),
    ], [
        (H("Why do ice cubes crack in a drink?"),
         " The outside warms and expands faster than the cold inside, and the stress cracks the ice.", " Magic."),
    ]),
    "pvduy/sharegpt_alpaca_oa_vicuna_format": (("pvduy/sharegpt_alpaca_oa_vicuna_format", None), [
        (H("What is the boiling point of water at sea level?"),
         " Water boils at 100 °C (212 °F) at sea level.", None),
        (H("Translate 'good morning' into French. Assistant: Bonjour. Human: And into Spanish?"),
         " Buenos días.", None),
    ], [(H("Name a prime number greater than 10."), " 11 is a prime number.", None)]),
    "wangrui6/Zhihu-KOL": (("wangrui6/Zhihu-KOL", None), [
        (H("如何评价电影《流浪地球》？"), " 《流浪地球》是中国科幻电影的一个里程碑，特效和世界观都相当出色。", None),
        (H("为什么程序员喜欢用机械键盘？"), " 机械键盘手感清晰、寿命长，长时间打字也不容易疲劳。", None),
        (H("学习日语应该从哪里开始？"), " 先把五十音图背熟，再学习基础语法和常用词汇。", None),
        (H("怎样才能养成早起的习惯？"), " 固定起床时间，晚上少看手机，早上起床后立刻拉开窗帘晒太阳。", None),
    ], None),
    "Cohere/miracl-zh-queries-22-12": (("Cohere/miracl-zh-queries-22-12", None), [
        (H("月球到地球的距离是多少？"), " 月球与地球的平均距离约为384,400公里。", " 火星是太阳系中的第四颗行星。"),
        (H("长城有多长？"), " 明长城全长约8,851.8公里。", " 黄河是中国第二长的河流。"),
    ], [(H("熊猫吃什么？"), " 大熊猫的食物99%是竹子。", None)]),
    "Cohere/miracl-ja-queries-22-12": (("Cohere/miracl-ja-queries-22-12", None), [
        (H("富士山の高さは何メートルですか？"), " 富士山は標高3776メートルで、日本最高峰の山である。",
         " 阿蘇山は熊本県にある活火山である。"),
        (H("日本の首都はどこですか？"), " 東京都は日本の首都であり、最大の都市である。", " 京都市はかつて日本の都であった。"),
    ], [(H("寿司の起源は何ですか？"), " 寿司の起源は東南アジアの魚の保存方法であるなれずしにある。",
         " 天ぷらはポルトガルから伝わった料理である。")]),
    "Hello-SimpleAI/HC3-Chinese": (("Hello-SimpleAI/HC3-Chinese", "all"), [
        (H("我有一个计算机相关的问题，什么是云计算？"), " 云计算是通过网络按需提供计算资源的服务模式，用户不用自己购买服务器。", None),
        (H("感冒了应该多喝水吗？"), " 多喝水有助于身体代谢，但感冒主要还是靠休息和自身免疫力恢复。", None),
    ], None),
    "mkqa-Chinese": (("mkqa", None), [  # the unanswerable question is dropped
        (H("《源氏物语》的作者是谁"), " 紫式部", None), (H("东京塔有多高"), " 333.0 米", None),
    ], None),
    "mkqa-Japanese": (("mkqa", None), [
        (H("源氏物語の作者は誰ですか"), " 紫式部", None), (H("東京タワーの高さは"), " 333.0 メートル", None),
    ], None),
    "lmqg/qg_jaquad": (("lmqg/qg_jaquad", None), [
        (H("東京タワーが完成したのはいつですか？"), " 高さは333メートルで、1958年に完成した。", None),
        (H("日本最大の湖はどの県にありますか？"), " 琵琶湖は滋賀県にある日本最大の湖である。", None),
    ], [(H("将棋では駒を何枚使いますか？"), " 駒は全部で40枚使う。", None)]),
    "lmqg/qag_jaquad": (("lmqg/qag_jaquad", None), [
        (H("東京タワーの高さは何メートルですか？"), " " + P1, None),
        (H("琵琶湖の面積はどれくらいですか？"), " " + P2, None),
    ], [(H("将棋は何人で行いますか？"), " " + P3, None)]),
}


def test_every_deepspeed_chat_name_has_an_adapter_and_a_fixture():
    assert set(EXPECTED) == set(HUB_ADAPTERS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hub_adapter_on_real_schema_fixture(fake_hub, name):
    load_args, train, eval_ = EXPECTED[name]
    raw = load_raw_dataset(name, seed=7)
    assert isinstance(raw, RawDataset)
    assert fake_hub.calls == [load_args]
    if eval_ is not None:
        assert triples(raw.train) == train
        assert triples(raw.eval) == eval_
    else:  # no eval split upstream: a seeded tenth (at least one row) is held out
        assert len(raw.eval) == max(1, round(len(train) * 0.1))
        assert sorted(triples(raw.train) + triples(raw.eval), key=str) == sorted(train, key=str)
        assert triples(load_raw_dataset(name, seed=7).eval) == triples(raw.eval)
    sample = raw.train[0]
    assert raw.get_prompt_and_chosen(sample) == sample["prompt"] + sample["chosen"]
    if sample["rejected"] is None:
        assert raw.get_rejected(sample) is None and raw.get_prompt_and_rejected(sample) is None
    else:
        assert raw.get_prompt_and_rejected(sample) == raw.get_prompt(sample) + raw.get_rejected(sample)
    assert raw.fingerprint


def test_webgpt_citations_are_stripped():
    assert strip_citations("Yes [1]. It works [2, 3] well[4][5].") == "Yes. It works well."
    assert strip_citations("Keep (parentheses) and [sic] text") == "Keep (parentheses) and [sic] text"


def test_unknown_hub_name_with_generic_columns_loads(fake_hub, tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"Wrong {i}."}
            for i in range(20)]
    (tmp_path / "hub" / "someone__prefs").mkdir(parents=True)
    (tmp_path / "hub" / "someone__prefs" / "train.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    raw = load_raw_dataset("someone/prefs", seed=1)
    assert fake_hub.calls == [("someone/prefs", None)]
    assert (len(raw.train), len(raw.eval)) == (18, 2)
    assert triples(raw.train)[0] == (H("Question 0?"), " Answer 0.", " Wrong 0.")


def test_holdout_is_seeded_and_disjoint():
    rows = list(range(50))
    train, eval_ = holdout(rows, seed=3)
    assert len(eval_) == 5 and sorted(train + eval_) == rows
    assert holdout(rows, seed=3) == (train, eval_)
    assert holdout(rows, seed=4)[1] != eval_


def test_num_examples_caps_rows(fake_hub):
    raw = load_raw_dataset("Dahoas/rm-static", seed=0, num_examples=2)
    assert len(raw.train) == 2 and len(raw.eval) == 1
    full = triples(load_raw_dataset("Dahoas/rm-static").train)
    assert all(t in full for t in triples(raw.train))


# ---- local formats --------------------------------------------------------------------------

PREFS = [
    (H("What is the capital of France?"), " The capital of France is Paris.", " Lyon."),
    ("\n\nHuman: Name a color of the rainbow.\n\nAssistant:", " Indigo.", " Brown."),
    (H("日本の首都はどこですか？"), " 東京です。", " 大阪です。"),
    (H("How many legs does a spider have?"), " A spider has eight legs.", " Six."),
    (H("Spell 'cat' backwards."), " tac", " act"),
]


def all_rows(raw):
    return sorted(triples(raw.train) + triples(raw.eval), key=str)


def test_local_jsonl_preferences():
    raw = load_raw_dataset(str(LOCAL / "prefs.jsonl"), seed=0)
    assert (len(raw.train), len(raw.eval)) == (4, 1)
    assert all_rows(raw) == sorted(PREFS, key=str)
    assert raw.has_rejected


def test_local_csv_is_sft_only_where_rejected_is_empty():
    raw = load_raw_dataset(str(LOCAL / "sft.csv"))
    assert all_rows(raw) == sorted([
        (H("What is 2 plus 3?"), " 5", None),
        (H("Write a greeting, please."), " Hello, nice to meet you!", None),
        (H("中国的首都是哪里？"), " 北京。", " 上海。")], key=str)


def test_local_chat_messages():
    raw = load_raw_dataset(str(LOCAL / "chat.jsonl"))
    assert all_rows(raw) == sorted([
        (" Human: Hi! What's 7 times 6? Assistant:", " 42.", None),
        (" System: You are terse. Human: Name a fruit. Assistant: Apple. Human: Another one? Assistant:",
         " Pear.", " I cannot help with that."),
        (" Human: Translate 'cat' to Japanese. Assistant:", " 猫 (ねこ).", " 犬."),
    ], key=str)


@pytest.mark.parametrize("fmt", ["json_records", "json_columns", "parquet", "disk_dataset", "disk_dict"])
def test_local_formats_give_the_same_rows(tmp_path, fmt):
    records = read_jsonl(LOCAL / "prefs.jsonl")
    if fmt == "json_records":
        path = tmp_path / "p.json"
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    elif fmt == "json_columns":
        path = tmp_path / "p.json"
        path.write_text(json.dumps({k: [r[k] for r in records] for k in records[0]}), encoding="utf-8")
    elif fmt == "parquet":
        path = tmp_path / "p.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    elif fmt == "disk_dataset":
        path = tmp_path / "ds"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    else:
        path = tmp_path / "dsd"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:4]),
                              "test": datasets.Dataset.from_list(records[4:])}).save_to_disk(str(path))
    raw = load_raw_dataset(str(path), seed=0)
    assert all_rows(raw) == sorted(PREFS, key=str)
    if fmt == "disk_dict":  # its own test split is the eval split
        assert triples(raw.eval) == [PREFS[4]]


def test_bundled_source():
    raw = load_raw_dataset("bundled", seed=0)
    assert (len(raw.train), len(raw.eval)) == (5400, 600)
    s = raw.train[0]
    assert s["prompt"].startswith(" Human: ") and s["prompt"].endswith(" Assistant:")
    assert s["chosen"].startswith(" ") and s["rejected"].startswith(" ") and s["chosen"] != s["rejected"]
    from utils.data import bundled
    body = s["prompt"][len(" Human: "):-len(" Assistant:")]
    assert bundled.score(body, s["chosen"].strip()) == 1.0


def test_bundled_test_split_does_not_follow_the_seed():
    """Runs with different seeds must share one held-out set, or each evaluates on the other's
    training pairs."""
    a, b = load_raw_dataset("bundled", seed=0), load_raw_dataset("bundled", seed=4321)
    assert [r["prompt"] for r in a.eval] == [r["prompt"] for r in b.eval]
    assert not {r["prompt"] for r in a.eval} & {r["prompt"] for r in b.train}


# ---- bad input --------------------------------------------------------------------------------

def error_of(spec):
    with pytest.raises(ConfigError) as e:
        load_raw_dataset(spec)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_file():
    assert error_of("/nonexistent/prefs.jsonl") == "data file not found: /nonexistent/prefs.jsonl"


def test_unknown_file_type(tmp_path):
    (tmp_path / "data.xml").write_text("<rows/>")
    assert "unknown file type '.xml'" in error_of(str(tmp_path / "data.xml"))


def test_missing_columns_names_the_ones_present(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    msg = error_of(str(path))
    assert "needs a 'prompt' column" in msg and "['question', 'answer']" in msg


@pytest.mark.parametrize("name,content,expected", [
    ("empty.jsonl", "", "the file is empty"),
    ("empty.json", "[]", "the file holds no rows"),
    ("header.csv", "prompt,chosen\n", "the file holds no rows"),
    ("broken.jsonl", '{"prompt": "a", "chosen": "b"}\n{"prompt": "a", \n', "line 2 is not valid JSON"),
    ("broken.json", '[{"prompt": "a"', "not valid JSON"),
    ("broken.parquet", "PAR1 this is not parquet", "not a readable parquet file"),
    ("scalar.json", "42", "expected a list of records"),
    ("blank.jsonl", '{"prompt": "", "chosen": ""}\n', "no row has a prompt"),
    ("chat.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}\n',
     "row 0 is malformed (KeyError: 'content')"),
])
def test_empty_and_corrupt_files(tmp_path, name, content, expected):
    (tmp_path / name).write_text(content)
    assert expected in error_of(str(tmp_path / name))


def test_empty_saved_dataset(tmp_path):
    datasets.Dataset.from_dict({"prompt": [], "chosen": []}).save_to_disk(str(tmp_path / "ds"))
    assert "the data set is empty" in error_of(str(tmp_path / "ds"))


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert "datasets.load_from_disk cannot read" in error_of(str(tmp_path))


def test_unknown_name(fake_hub):
    msg = error_of("nobody/no-such-dataset")
    assert msg.startswith("data path 'nobody/no-such-dataset' is neither a known data set (bundled, ")
    assert "nor loadable from the hub (Dataset 'nobody/no-such-dataset' doesn't exist" in msg


def test_known_name_unreachable_offline():
    msg = error_of("Dahoas/rm-static")  # the real datasets.load_dataset, hub unreachable here
    assert msg.startswith("could not load data set 'Dahoas/rm-static' with datasets.load_dataset")


def test_hub_sources_through_the_pipeline_and_cache(fake_hub, tmp_path):
    from tests.test_data_pipeline import make_tokenizer
    from utils.data import create_prompt_dataset
    tok = make_tokenizer()
    names = ["Dahoas/rm-static", "Cohere/miracl-zh-queries-22-12"]
    train, evl = create_prompt_dataset(names, "0,10,0", tmp_path, 2, 0, tok, 256)
    assert (len(train), len(evl)) == (3 + 2, 2 + 0)  # the miracl dev row has no negative passage
    chosen = {tuple(train[i]["chosen_input_ids"].tolist()) for i in range(len(train))}
    sample = EXPECTED["Cohere/miracl-zh-queries-22-12"][1][1]
    assert tuple(tok(sample[0])["input_ids"] + tok(sample[1], add_special_tokens=False)["input_ids"]) in chosen
    again, _ = create_prompt_dataset(names, "0,10,0", tmp_path, 2, 0, tok, 256)
    assert again.path == train.path
