"""The activation store without a model: round trips, resumption, refusal of mixed settings, checksums."""

import json

import pandas as pd
import pytest
import torch

from probes.errors import CtdError, CtdInputError
from probes.store import ShardWriter, open_store


def _tensors(doc: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{doc}|positions": torch.arange(10, 10 + n),
        f"{doc}|blocks.0.hook_resid_post": torch.randn(n, 8, generator=g),
        f"{doc}|blocks.0.attn.hook_pattern:region_mass": torch.rand(n, 2, 4, generator=g),
    }


def _write_store(root, settings=None):
    writer = ShardWriter(root / "activations", settings or {"model": "m", "dtype": "float32"})
    writer.write(0, {**_tensors("a", 3, 0), **_tensors("b", 5, 1)}, ["a", "b"])
    writer.write(1, _tensors("c", 4, 2), ["c"])
    index = pd.DataFrame({"doc_id": ["a"] * 3 + ["b"] * 5 + ["c"] * 4, "position": range(12)})
    writer.finish(index)
    return writer


def test_what_is_written_is_read_back_exactly(tmp_path):
    _write_store(tmp_path)
    store = open_store(tmp_path)
    assert store.doc_ids == ["a", "b", "c"]
    assert store.points == ["blocks.0.hook_resid_post"]
    assert store.reductions == ["blocks.0.attn.hook_pattern:region_mass"]
    for doc, n, seed in (("a", 3, 0), ("b", 5, 1), ("c", 4, 2)):
        expected = _tensors(doc, n, seed)
        positions, values = store.read(doc, "blocks.0.hook_resid_post")
        assert torch.equal(positions, expected[f"{doc}|positions"])
        assert torch.equal(values, expected[f"{doc}|blocks.0.hook_resid_post"])
    assert len(store.index) == 12


def test_a_reopened_writer_knows_finished_shards_and_refuses_other_settings(tmp_path):
    _write_store(tmp_path)
    again = ShardWriter(tmp_path / "activations", {"model": "m", "dtype": "float32"})
    assert again.done(0) and again.done(1) and not again.done(2)
    (tmp_path / "activations" / "shard-00001.safetensors").write_bytes(b"truncated")
    assert not again.done(1)  # a damaged shard is redone
    with pytest.raises(CtdInputError, match="other settings"):
        ShardWriter(tmp_path / "activations", {"model": "m", "dtype": "float16"})


def test_a_corrupted_shard_is_named_on_read(tmp_path):
    _write_store(tmp_path)
    path = tmp_path / "activations" / "shard-00000.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    store = open_store(tmp_path)
    with pytest.raises(CtdError, match="checksum mismatch"):
        store.read("a", "blocks.0.hook_resid_post")
    assert store.read("c", "blocks.0.hook_resid_post")[1].shape == (4, 8)  # other shards still read


def test_unfinished_or_missing_stores_and_unknown_points_are_input_errors(tmp_path):
    with pytest.raises(CtdInputError, match="no activation store"):
        open_store(tmp_path)
    writer = ShardWriter(tmp_path / "activations", {"model": "m"})
    writer.write(0, _tensors("a", 2, 0), ["a"])
    with pytest.raises(CtdInputError, match="did not finish"):
        open_store(tmp_path)
    writer.finish(pd.DataFrame({"doc_id": ["a", "a"], "position": [0, 1]}))
    store = open_store(tmp_path)
    with pytest.raises(CtdInputError, match="was not captured"):
        store.read("a", "blocks.1.hook_resid_post")
    with pytest.raises(CtdInputError, match="not in the store"):
        store.read("zzz", "blocks.0.hook_resid_post")
    state = json.loads((tmp_path / "activations" / "shards.json").read_text())
    assert state["complete"] and state["shards"]["0"]["docs"] == ["a"]
