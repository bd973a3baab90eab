"""On-disk activation store: safetensors shards plus a parquet index, atomic and resumable.

Layout of ``<run>/activations/``:

- ``shard-00000.safetensors`` ... one per capture batch. Keys are ``"{doc_id}|{name}"`` where name
  is a TransformerLens hook name (``blocks.3.hook_resid_post``), a reduction
  (``blocks.3.attn.hook_pattern:region_mass``) or ``positions`` (absolute token indices in
  prompt + output, int64). Row i of every tensor of a document belongs to ``positions[i]``.
- ``shards.json``: per finished shard its file, sha256, documents and names, plus the store's
  settings. A shard is listed only after its file was renamed into place, so a listed shard is
  complete; an unlisted file is a leftover of an interrupted run and is rewritten.
- ``index.parquet``: one row per stored token: ``doc_id``, ``position``, ``norm_position``,
  ``region``, ``shard``; written when the capture finishes.

Reads are memory-mapped (``safetensors.safe_open``) and each shard's checksum is verified once
per reader before its first read.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from probes.errors import CtdError, CtdInputError, input_error
from probes.files import file_sha256

__all__ = ["ShardWriter", "StoreReader", "open_store", "file_sha256", "STORE_DIR", "DTYPES"]

STORE_DIR = "activations"
SEP = "|"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.int64)


def _write_json_atomic(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


@dataclass
class ShardWriter:
    """Writes shards into ``root`` and remembers which are finished (``shards.json``).

    ``settings`` identify the capture (model, points, batch size, dtype, ...): reopening a store
    with other settings is refused, so a resumed run never mixes two captures.
    """

    root: Path
    settings: dict
    _state: dict = field(init=False)

    def __post_init__(self):
        self.root = Path(self.root)
        self.settings = json.loads(json.dumps(self.settings, default=str))  # as shards.json stores it (tuples become lists)
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = self.root / "shards.json"
        if manifest.exists():
            try:
                state = json.loads(manifest.read_text())
            except json.JSONDecodeError:
                raise input_error(manifest, "damaged store manifest", "delete the activations folder and capture again") from None
            if state.get("settings") != self.settings:
                raise input_error(
                    manifest,
                    "the store was captured with other settings",
                    "capture into another run directory, or delete the activations folder to start over",
                )
            self._state = state
        else:
            self._state = {"settings": self.settings, "shards": {}, "complete": False}
            _write_json_atomic(self._state, manifest)

    def done(self, shard_id: int) -> bool:
        """Is shard ``shard_id`` listed and still intact on disk? (A damaged one is redone.)"""
        entry = self._state["shards"].get(str(shard_id))
        if entry is None:
            return False
        path = self.root / entry["file"]
        return path.exists() and path.stat().st_size == entry["bytes"]

    def write(self, shard_id: int, tensors: dict[str, torch.Tensor], docs: list[str]) -> None:
        name = f"shard-{shard_id:05d}.safetensors"
        final = self.root / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        try:
            metadata = {"docs": json.dumps(docs)}
            if all(v.dtype in _NUMPY_DTYPES for v in tensors.values()):
                # Same bytes as safetensors.torch.save_file, without its per-tensor Python overhead
                # (measured at a third of the capture's cost on the organism).
                save_numpy({k: v.contiguous().numpy() for k, v in tensors.items()}, tmp, metadata=metadata)
            else:  # bfloat16 has no numpy dtype; safetensors.torch refuses views sharing a buffer
                save_file({k: v.clone() for k, v in tensors.items()}, tmp, metadata=metadata)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        names = sorted({k.split(SEP, 1)[1] for k in tensors})
        self._state["shards"][str(shard_id)] = {
            "file": name,
            "sha256": file_sha256(final),
            "bytes": final.stat().st_size,
            "docs": docs,
            "names": names,
        }
        _write_json_atomic(self._state, self.root / "shards.json")

    def finish(self, index: pd.DataFrame) -> None:
        """Write ``index.parquet`` and mark the store complete (the last thing a capture does)."""
        fd, tmp = tempfile.mkstemp(prefix=".index.parquet.", dir=self.root)
        os.close(fd)
        try:
            index.to_parquet(tmp, index=False)
            os.replace(tmp, self.root / "index.parquet")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._state["complete"] = True
        _write_json_atomic(self._state, self.root / "shards.json")

    @property
    def shard_docs(self) -> dict[str, list[str]]:
        return {k: v["docs"] for k, v in self._state["shards"].items()}


class StoreReader:
    """Reads a finished store: ``.doc_ids``, ``.points``, ``.read(doc_id, point)``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = self.root / "shards.json"
        if not manifest.is_file():
            raise input_error(self.root, "no activation store here", "run `ctd capture --run DIR` first")
        try:
            self._state = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            raise input_error(manifest, "damaged store manifest", "delete the activations folder and capture again") from None
        if not self._state.get("complete"):
            raise input_error(self.root, "the capture did not finish", "rerun `ctd capture` on this run to complete it")
        self.settings: dict = self._state["settings"]
        self._doc_shard: dict[str, str] = {}
        names: set[str] = set()
        for shard_id, entry in self._state["shards"].items():
            for doc in entry["docs"]:
                self._doc_shard[doc] = shard_id
            names.update(entry["names"])
        self.points = sorted(n for n in names if n != "positions" and ":" not in n)
        self.reductions = sorted(n for n in names if ":" in n)
        self._verified: set[str] = set()
        self._index: pd.DataFrame | None = None

    @property
    def doc_ids(self) -> list[str]:
        return list(self._doc_shard)

    @property
    def index(self) -> pd.DataFrame:
        if self._index is None:
            path = self.root / "index.parquet"
            if not path.is_file():
                raise input_error(path, "file not found", "rerun `ctd capture` on this run to complete it")
            self._index = pd.read_parquet(path)
        return self._index

    def _shard_path(self, doc_id: str) -> Path:
        if doc_id not in self._doc_shard:
            raise CtdInputError(f"{self.root}: document {doc_id!r} is not in the store (it has {len(self._doc_shard)} documents)")
        shard_id = self._doc_shard[doc_id]
        entry = self._state["shards"][shard_id]
        path = self.root / entry["file"]
        if shard_id not in self._verified:
            if not path.is_file():
                raise input_error(path, "shard file missing", "rerun `ctd capture` to rewrite it")
            if file_sha256(path) != entry["sha256"]:
                raise CtdError(f"{path}: checksum mismatch (the shard is corrupted); delete it and rerun `ctd capture`")
            self._verified.add(shard_id)
        return path

    def read(self, doc_id: str, point: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions [n], values [n, ...])`` of ``point`` (a hook name or reduction) for ``doc_id``."""
        path = self._shard_path(doc_id)
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            key = f"{doc_id}{SEP}{point}"
            if key not in keys:
                available = sorted(k.split(SEP, 1)[1] for k in keys if k.startswith(doc_id + SEP))
                raise CtdInputError(f"{path}: point {point!r} was not captured for {doc_id!r}; captured: {available[:6]}...")
            return handle.get_tensor(f"{doc_id}{SEP}positions"), handle.get_tensor(key)


def open_store(run_dir: str | Path, store_dir: str = STORE_DIR) -> StoreReader:
    """The activation store of a run directory (``<run>/activations``, or another folder name)."""
    return StoreReader(Path(run_dir) / store_dir)
