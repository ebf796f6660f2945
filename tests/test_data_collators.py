"""Collators: dynamic padding, masks, label padding, chosen-then-rejected order, left padding."""
import pytest
import torch
from torch.utils.data import DataLoader

from utils.config import ConfigError
from utils.data import DataCollatorPrompt, DataCollatorReward, DataCollatorSFT

PAD = 0
T = torch.tensor


def test_sft_right_pads_and_masks_labels():
    items = [{"input_ids": T([5, 6, 7]), "labels": T([-100, 6, 7])},
             {"input_ids": T([8, 9]), "labels": T([8, 9])}]
    batch = DataCollatorSFT(PAD)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, 9, -100]]
    assert all(v.dtype == torch.long for v in batch.values())


def test_pad_to_multiple_of_8():
    items = [{"input_ids": T(list(range(1, 10))), "labels": T(list(range(1, 10)))}]
    batch = DataCollatorSFT(PAD, pad_to_multiple_of=8)(items)
    assert batch["input_ids"].shape == (1, 16)
    assert batch["attention_mask"].sum().item() == 9 and batch["labels"][0, 9:].eq(-100).all()


def test_reward_puts_all_chosen_first_then_all_rejected():
    items = [{"chosen_input_ids": T([1, 2, 3]), "rejected_input_ids": T([1, 4])},
             {"chosen_input_ids": T([5]), "rejected_input_ids": T([5, 6, 7, 8])}]
    batch = DataCollatorReward(PAD)(items)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [5, 0, 0, 0], [1, 4, 0, 0], [5, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0],
                                                [1, 1, 1, 1]]


def test_reward_carries_prompt_lengths_for_both_halves():
    items = [{"chosen_input_ids": T([1, 2, 3]), "rejected_input_ids": T([1, 4]), "prompt_length": T([1])},
             {"chosen_input_ids": T([5, 6]), "rejected_input_ids": T([5, 7, 8]), "prompt_length": T([2])}]
    assert DataCollatorReward(PAD)(items)["prompt_lengths"].tolist() == [1, 2, 1, 2]


def test_prompt_is_left_padded():
    items = [{"prompt_input_ids": T([3, 4])}, {"prompt_input_ids": T([5, 6, 7, 8])}]
    batch = DataCollatorPrompt(9)(items)
    assert batch["prompt"].tolist() == [[9, 9, 3, 4], [5, 6, 7, 8]]
    assert batch["prompt_att_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    batch8 = DataCollatorPrompt(9, pad_to_multiple_of=8)(items)
    assert batch8["prompt"].tolist()[0] == [9] * 6 + [3, 4]  # the prompt still ends the row


def test_prompt_batch_carries_columns_and_origins_in_order():
    items = [{"prompt_input_ids": T([3, 4]), "columns": {"answer": 7}, "origin": "a.jsonl: row 2"},
             {"prompt_input_ids": T([5]), "columns": {}, "origin": "b.jsonl: row 0"},
             {"prompt_input_ids": T([6])}]  # built by hand, without a record
    batch = DataCollatorPrompt(9)(items)
    assert batch["columns"] == [{"answer": 7}, {}, {}]
    assert batch["origins"] == ["a.jsonl: row 2", "b.jsonl: row 0", ""]
    assert batch["prompt"].tolist() == [[3, 4], [9, 5], [9, 6]]


def test_collator_in_a_dataloader():
    data = [{"input_ids": T([1] * n), "labels": T([1] * n)} for n in (2, 5, 3, 1)]
    shapes = [b["input_ids"].shape for b in DataLoader(data, batch_size=2, collate_fn=DataCollatorSFT(PAD))]
    assert shapes == [(2, 5), (2, 3)]


def test_missing_pad_token_is_a_config_error():
    with pytest.raises(ConfigError, match="no pad token id"):
        DataCollatorSFT(None)
