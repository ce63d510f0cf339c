"""The records of the data: an `Example` (one prompt and answer of one source and split), a
list of them with what the leakage check found (`Examples`), its tokens (`Tokenized`) and a padded
batch (`Batch`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch


SPLITS = ("train", "validation", "test")
END = "\n"  # every answer ends with a newline, so a generated answer has a place to stop


@dataclass(frozen=True)
class Example:
    source: str
    split: str
    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    row: int = 0  # the line (JSONL, CSV) or 1-based row (Parquet, datasets) in the source's file
    origin: str = ""  # file and line, e.g. "data/qa.csv line 5", for error messages


class Examples(list[Example]):
    """load_examples' result: the examples, plus what the leakage check found (for the manifest)."""

    def __init__(self, items: Iterable[Example] = (), leakage: dict[str, Any] | None = None):
        super().__init__(items)
        self.leakage: dict[str, Any] = leakage or {}


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]
    n_prompt: int  # ids[n_prompt:] are the answer tokens


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    answer_mask: torch.Tensor  # (B, T) bool: True where the token is an answer token
    index: torch.Tensor  # (B,) position of each example in the dataset

    def to(self, device: torch.device) -> "Batch":
        """The batch on `device` (the model's: gradex.device.device_of); `index` stays on the CPU, since it
        only names rows of the dataset."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.answer_mask.to(device), self.index)


