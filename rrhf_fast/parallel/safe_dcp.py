"""torch.distributed.checkpoint (DCP) for the sharded optimizer of an FSDP2 run, read without pickle.

DCP's FileSystemReader unpickles the checkpoint's `.metadata` (torch/distributed/checkpoint/
filesystem.py, `read_metadata`: `pickle.load`), and its DefaultLoadPlanner reads every non-tensor
value (the optimizer's param_groups) with `torch.load(weights_only=False)`: a crafted checkpoint
runs arbitrary code on `--resume`. So the run that saves also writes the metadata as plain JSON
(`metadata.json`, what DCP's own Metadata holds: tensor shapes and dtypes, chunk offsets, which
bytes of which shard file hold each value), and loading rebuilds the Metadata from that JSON, never
opens `.metadata` (left for DCP's own tools), and reads the non-tensor values with
`weights_only=True`. A checkpoint without `metadata.json` is refused.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from rrhf_fast.errors import UserError

METADATA_JSON = "metadata.json"
_FORMAT = "rrhf-fast-dcp-metadata"


def metadata_to_json(metadata: Metadata) -> dict[str, Any]:
    """DCP's Metadata as JSON-able data (what `metadata_from_json` reads back)."""
    items = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            items[fqn] = {"bytes": True}
            continue
        p = md.properties
        if p.layout != torch.strided or p.memory_format != torch.contiguous_format:
            raise ValueError(f"{fqn}: cannot record a {p.layout} / {p.memory_format} tensor")
        items[fqn] = {"dtype": str(p.dtype).removeprefix("torch."), "requires_grad": p.requires_grad,
                      "size": list(md.size),
                      "chunks": [[list(c.offsets), list(c.sizes)] for c in md.chunks]}  # fmt: skip
    storage = [
        {"fqn": index.fqn, "offset": None if index.offset is None else list(index.offset),
         "index": index.index, "file": info.relative_path, "start": info.offset, "length": info.length,
         "transforms": list(info.transform_descriptors or [])}
        for index, info in (metadata.storage_data or {}).items()
    ]  # fmt: skip
    planner = {fqn: list(path) for fqn, path in (metadata.planner_data or {}).items()}
    return {"format": _FORMAT, "version": metadata.version, "items": items, "planner": planner,
            "storage": storage}  # fmt: skip


def write_metadata(metadata: Metadata, directory: str | Path) -> None:
    text = json.dumps(metadata_to_json(metadata), indent=0)
    (Path(directory) / METADATA_JSON).write_text(text + "\n", encoding="utf-8")


def read_metadata(directory: str | Path) -> Metadata:
    """The Metadata a run wrote as `metadata.json`; anything else is one UserError."""
    file = Path(directory) / METADATA_JSON
    if not file.is_file():
        raise UserError(
            f"{directory}: no {METADATA_JSON} (the sharded optimizer state of an older rrhf-fast or of "
            "another program, whose pickled .metadata could run code); resume from a checkpoint this "
            "version wrote, or start again"
        )
    try:
        return metadata_from_json(json.loads(file.read_text(encoding="utf-8")))
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise UserError(f"{file}: not the sharded-optimizer metadata rrhf-fast writes ({err}); "
                        "delete this checkpoint") from None  # fmt: skip


def metadata_from_json(data: dict[str, Any]) -> Metadata:
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"format is not {_FORMAT}")
    items: dict[str, Any] = {}
    for fqn, md in data["items"].items():
        if md.get("bytes"):
            items[_text(fqn)] = BytesStorageMetadata()
            continue
        props = TensorProperties(dtype=_dtype(md["dtype"]), requires_grad=bool(md["requires_grad"]))
        chunks = [ChunkStorageMetadata(_size(o), _size(s)) for o, s in md["chunks"]]
        items[_text(fqn)] = TensorStorageMetadata(props, _size(md["size"]), chunks)
    storage = {}
    for s in data["storage"]:
        offset = None if s["offset"] is None else _size(s["offset"])
        index = MetadataIndex(_text(s["fqn"]), offset, None if s["index"] is None else _int(s["index"]))
        storage[index] = _StorageInfo(_shard_file(s["file"]), _int(s["start"]), _int(s["length"]),
                                      [_text(t) for t in s["transforms"]] or None)  # fmt: skip
    planner = {_text(k): tuple(_path_part(p) for p in v) for k, v in data["planner"].items()}
    version = data.get("version")
    return Metadata(items, planner_data=planner, storage_data=storage, storage_meta=StorageMeta(),
                    version=None if version is None else _text(version))  # fmt: skip


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata comes from `metadata.json` (read and checked on creation, so
    a bad one is a UserError before any collective), never from the pickle."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.metadata = read_metadata(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner reading non-tensor values (param_groups: floats, tuples, bools) with
    `weights_only=True` instead of a full unpickle; otherwise as its load_bytes."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as err:  # UnpicklingError on anything but plain data
            raise UserError(f"{fqn}: a value of the sharded optimizer state cannot be read safely "
                            f"({type(err).__name__}); delete this checkpoint") from None  # fmt: skip
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _size(values: Any) -> torch.Size:
    return torch.Size([_int(v) for v in values])


def _path_part(value: Any) -> str | int:
    return value if isinstance(value, int) and not isinstance(value, bool) else _text(value)


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, _text(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _shard_file(name: Any) -> str:
    """A shard file name inside the checkpoint directory, never a path out of it."""
    name = _text(name)
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise ValueError(f"shard file {name!r} is not a plain file name")
    return name


def shard_files(directory: str | Path) -> list[str]:
    """The shard files the `metadata.json` in `directory` points into."""
    metadata = read_metadata(directory)
    return sorted({info.relative_path for info in metadata.storage_data.values()})
