"""Safetensors written one tensor at a time, so saving a model needs memory for one tensor, not
for a copy of the whole state dict (safetensors' own save_file wants every tensor at once).

The format: an 8-byte little-endian header length N, N bytes of JSON (each tensor's dtype,
shape and [begin, end) byte offsets into the data that follows; padded with spaces to a multiple
of 8), then the tensors' raw little-endian bytes back to back. Shapes and dtypes are known before
any tensor is produced (under ZeRO-3 from the parameters' metadata), so the header goes first.
"""
from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
          torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
          torch.float8_e5m2: "F8_E5M2"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size, "5GB"


@dataclass(frozen=True)
class Spec:
    """What one tensor will be, before it exists."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def in_file_order(specs: list[Spec]) -> list[Spec]:
    """Widest elements first (safetensors' own order): every tensor then starts at a multiple of
    its element size, as a loader that maps the file in place needs."""
    return sorted(specs, key=lambda s: -s.itemsize)


def header(specs: list[Spec], metadata: dict | None = None) -> bytes:
    """The length prefix and the JSON header for `specs`, their data in that order."""
    entries, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for spec in specs:
        if spec.dtype not in DTYPES:
            raise TypeError(f"{spec.name}: safetensors has no dtype {spec.dtype}")
        entries[spec.name] = {"dtype": DTYPES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def write_file(path: str | Path, specs: list[Spec], tensors: Iterator[torch.Tensor],
               metadata: dict | None = None) -> None:
    """Write `specs` to one safetensors file, taking each tensor from `tensors` (in the order of
    `specs`) only when its turn comes and holding no reference to it once written."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian bytes; this writer copies memory as is")
    with _create(path) as f:
        f.write(header(specs, metadata))
        for spec in specs:
            f.write(_raw_bytes(spec, next(tensors)))


def _create(path: str | Path):
    """The one place a file is opened for writing (tests/full_disk.py fills the disk here)."""
    return open(path, "wb")


def _raw_bytes(spec: Spec, tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy when it is already a contiguous CPU tensor."""
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise ValueError(f"{spec.name}: got {tensor.dtype} {tuple(tensor.shape)}, "
                         f"expected {spec.dtype} {spec.shape}")
    flat = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d -> 1-d: view(uint8) needs a dim
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def shards(specs: list[Spec], max_bytes: int = MAX_SHARD_BYTES) -> list[list[Spec]]:
    """`specs` (already in file order) cut into files of at most `max_bytes` each, as
    huggingface_hub splits them: a tensor larger than that gets a file of its own."""
    out, size = [[]], 0
    for spec in specs:
        if out[-1] and size + spec.nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(spec)
        size += spec.nbytes
    return out


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_model(folder: str | Path, specs: list[Spec], tensors: Iterator[torch.Tensor],
                max_shard_bytes: int | None = None) -> list[str]:
    """A model's weights into `folder` as transformers reads them: model.safetensors, or shards
    and model.safetensors.index.json. `specs` must be in_file_order, `tensors` in the same order.
    Returns the files written."""
    folder = Path(folder)
    groups = shards(specs, max_shard_bytes or MAX_SHARD_BYTES)  # read at call time: tests shrink it
    names = shard_names(len(groups))
    for name, group in zip(names, groups):
        write_file(folder / name, group, tensors)
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: name for name, group in zip(names, groups) for s in group}}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names
