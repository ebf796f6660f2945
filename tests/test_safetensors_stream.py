"""The streaming safetensors writer (utils/safetensors_stream.py) against safetensors' own."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from utils.safetensors_stream import INDEX_FILE, Spec, in_file_order, write_file, write_model


def sample() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"w.bf16": torch.randn(3, 5, generator=gen).bfloat16(),
            "w.f32": torch.randn(7, generator=gen),
            "w.f16": torch.randn(2, 3, generator=gen).half(),
            "ids": torch.arange(-3, 6, dtype=torch.int64).reshape(3, 3),
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4),
            "mask": torch.tensor([True, False, True]),
            "bytes": torch.arange(5, dtype=torch.uint8),
            "odd.bf16": torch.randn(3, generator=gen).bfloat16()}  # 6 bytes: the next must still align


def stream(tensors: dict):
    specs = in_file_order([Spec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()])
    return specs, (tensors[s.name] for s in specs)


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        # compare bits: equal() would call two NaNs different and -0.0 equal to 0.0
        assert torch.equal(a[key].reshape(-1).view(torch.uint8), b[key].reshape(-1).view(torch.uint8)), key


def test_reads_back_as_safetensors_own_file(tmp_path):
    tensors = sample()
    save_file(tensors, tmp_path / "ref.safetensors")
    write_file(tmp_path / "ours.safetensors", *stream(tensors))
    assert_same(load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "ref.safetensors"))
    assert_same(load_file(tmp_path / "ours.safetensors"), tensors)


def test_bf16_bytes_are_the_tensor_bits(tmp_path):
    """bf16 has no numpy dtype: the bytes must be the raw 16-bit patterns, little-endian."""
    value = torch.tensor([1.0, -2.0, 3.140625], dtype=torch.bfloat16)
    write_file(tmp_path / "x.safetensors", *stream({"x": value}))
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert raw[-6:] == b"".join(int(v).to_bytes(2, "little", signed=True) for v in value.view(torch.int16))
    assert raw[-6:] == bytes.fromhex("803f00c04940")


def test_views_and_non_contiguous_tensors_are_written_as_their_values(tmp_path):
    flat = torch.arange(24, dtype=torch.float32)
    tensors = {"view": flat[4:10], "transposed": flat.reshape(4, 6).T}
    write_file(tmp_path / "v.safetensors", *stream(tensors))
    assert_same(load_file(tmp_path / "v.safetensors"), {k: v.contiguous() for k, v in tensors.items()})


def test_a_tensor_unlike_its_spec_is_refused(tmp_path):
    with pytest.raises(ValueError, match="expected torch.float32"):
        write_file(tmp_path / "x.safetensors", [Spec("x", (2,), torch.float32)], iter([torch.zeros(2).half()]))


def test_shards_and_their_index(tmp_path):
    tensors = sample()
    specs, produced = stream(tensors)
    names = write_model(tmp_path, specs, produced, max_shard_bytes=64)
    assert len(names) > 1 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    loaded = {}
    for name in names:
        loaded.update(load_file(tmp_path / name))
    assert_same(loaded, tensors)
    (tmp_path / "one").mkdir()
    assert write_model(tmp_path / "one", *stream(tensors)) == ["model.safetensors"]
    assert not (tmp_path / "one" / INDEX_FILE).exists()
