"""Data layer: sources -> RawDataset -> per-step split/blend -> token ids (cached) -> collators."""
from utils.data.collators import DataCollatorPrompt, DataCollatorReward, DataCollatorSFT, to_device
from utils.data.pipeline import create_prompt_dataset
from utils.data.raw_datasets import RawDataset
from utils.data.sources import load_raw_dataset
from utils.data.unsupervised import get_unsupervised_dataset

__all__ = ["create_prompt_dataset", "get_unsupervised_dataset", "load_raw_dataset", "RawDataset",
           "DataCollatorSFT", "DataCollatorReward", "DataCollatorPrompt", "to_device"]
