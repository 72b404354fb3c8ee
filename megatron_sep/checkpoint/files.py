"""The small files of a checkpoint, read as data and never as code (DESIGN.md principle 14).

- `meta.json`: step, data position, layout, the newest step known to train on; checked against a schema.
- `rng_<rank>.safetensors`: the RNG states, tensors plus JSON in the safetensors header.
- DCP's `.metadata` is a pickle: `SafeReader` reads it through an allow-list of DCP's own metadata classes,
  refuses storage paths that leave the folder, and refuses DCP's byte items (a plain `torch.load`).
Checkpoints written before this format (`meta.pt`, `rng_<rank>.pt`) are read with `weights_only=True`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import importlib
import io
import json
import pathlib
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_meta
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import LoadItemType

META, LEGACY_META = "meta.json", "meta.pt"
FORMAT = 2
LATEST = "latest"  # the file naming the newest complete step folder
STEP_NAME = re.compile(r"step_\d{8}")


class CheckpointError(RuntimeError):
    pass


def is_complete(path: Path) -> bool:
    """A checkpoint folder is complete once its metadata is in place (written last, inside a renamed folder)."""
    return (path / META).is_file() or (path / LEGACY_META).is_file()


def list_checkpoints(root: Path) -> list[str]:
    """The complete step_* folders in root, oldest first."""
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.glob("step_*") if STEP_NAME.fullmatch(p.name) and is_complete(p)
    )


# ---- meta ---------------------------------------------------------------------------------------
def write_meta(folder: Path, meta: dict) -> None:
    (folder / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=1) + "\n")


def _nonneg_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def point_latest(root: Path, name: str) -> str:
    """The shell command that makes `latest` in root name the step folder `name`."""
    return f"echo {name} > {root / LATEST}"


def _earlier_fix(path: Path) -> str:
    """The fix for a step folder whose meta cannot be used: the newest complete step before it."""
    earlier = [n for n in list_checkpoints(path.parent) if n < path.name]
    if earlier:
        return (
            f"Fix: resume from the earlier {earlier[-1]} ({point_latest(path.parent, earlier[-1])}), "
            "or copy this checkpoint again from its source"
        )
    return "Fix: copy this checkpoint again from its source (no earlier complete step_* folder is beside it)"


def read_meta(path: Path) -> dict:
    """The checkpoint's meta as a checked dict: step and consumed_samples are ints >= 0."""
    if (path / META).is_file():
        f = path / META
        try:
            meta = json.loads(f.read_bytes().decode("utf-8"))
        except (ValueError, OSError) as e:
            raise CheckpointError(
                f"{f} is empty or corrupt ({type(e).__name__}). {_earlier_fix(path)}"
            ) from None
    else:
        f = path / LEGACY_META
        # plain ints and strings: the weights-only unpickler runs no code; empty, truncated, or holding
        # objects raise EOFError, UnpicklingError, ...
        try:
            meta = torch.load(f, weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"{f} is empty or corrupt, or holds more than numbers and strings "
                f"({type(e).__name__}). {_earlier_fix(path)}"
            ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{f} holds a {type(meta).__name__}, not a mapping. {_earlier_fix(path)}"
        )
    # a missing data position would replay the corpus from its start
    for key in ("step", "consumed_samples"):
        if not _nonneg_int(meta.get(key)):
            raise CheckpointError(
                f"{f}: {key} is {meta.get(key)!r}, not a whole number >= 0. {_earlier_fix(path)}"
            )
    good = meta.get("verified_step")
    if good is not None and not _nonneg_int(good):
        raise CheckpointError(
            f"{f}: verified_step is {good!r}, not a whole number >= 0 or null. {_earlier_fix(path)}"
        )
    return meta


# ---- RNG states -----------------------------------------------------------------------------------
def rng_state() -> dict:
    st = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def save_rng(path: Path) -> None:
    from safetensors.torch import save_file

    st = rng_state()
    name, key, pos, has_gauss, gauss = st["numpy"]
    tensors = {"torch": st["torch"], "numpy_key": torch.from_numpy(key.astype(np.int64))}
    tensors.update({f"cuda_{i}": s for i, s in enumerate(st.get("cuda", []))})
    header = {
        "python": json.dumps([st["python"][0], list(st["python"][1]), st["python"][2]]),
        "numpy": json.dumps([name, int(pos), int(has_gauss), float(gauss)]),
    }
    save_file(tensors, str(path), metadata=header)


def load_rng(path: Path) -> None:
    """Restore this rank's RNG states; a damaged file is one CheckpointError naming it."""
    try:
        st = _read_rng(path)
        random.setstate(st["python"])
        np.random.set_state(st["numpy"])
        torch.set_rng_state(st["torch"])
        if "cuda" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda"])
    except Exception as e:  # empty, truncated, wrong fields or sizes: each raises its own type
        raise CheckpointError(
            f"{path} holds no usable RNG state ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:120] if str(e).strip() else 'empty'}). Fix: delete "
            "it to resume without restoring this rank's random state (dropout and sampling "
            "then differ from an uninterrupted run)"
        ) from None


def _read_rng(path: Path) -> dict:
    if path.suffix == ".pt":  # the format before meta.json: numpy's state is an ndarray
        allowed = [
            np._core.multiarray._reconstruct,
            np.ndarray,
            np.dtype,
            type(np.dtype(np.uint32)),
        ]
        with torch.serialization.safe_globals(allowed):
            st = torch.load(path, weights_only=True)
        return st
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    version, internal, gauss = json.loads(header["python"])
    name, pos, has_gauss, cached = json.loads(header["numpy"])
    cuda = [tensors[f"cuda_{i}"] for i in range(sum(k.startswith("cuda_") for k in tensors))]
    st = {
        "python": (version, tuple(internal), gauss),
        "numpy": (name, tensors["numpy_key"].numpy().astype(np.uint32), pos, has_gauss, cached),
        "torch": tensors["torch"],
    }
    return {**st, "cuda": cuda} if cuda else st


def rng_file(path: Path, rank: int) -> Path | None:
    for name in (f"rng_{rank}.safetensors", f"rng_{rank}.pt"):
        if (path / name).is_file():
            return path / name
    return None


# ---- DCP's tensor index ---------------------------------------------------------------------------
_DCP_CLASSES = {
    "Metadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "TensorProperties",
    "ChunkStorageMetadata",
    "MetadataIndex",
    "StorageMeta",
    "_MEM_FORMAT_ENCODING",
}
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{
        ("pathlib", n): getattr(pathlib, n)
        for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
    },
    **{("torch.distributed.checkpoint.metadata", n): getattr(dcp_meta, n) for n in _DCP_CLASSES},
}


_DCP_DATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
)


class _IndexUnpickler(pickle.Unpickler):
    """Only DCP's metadata dataclasses, torch.Size, dtypes, layouts and paths: nothing that runs code."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        # planner data (Megatron-Core's saves keep their SavePlan): plain records
        if module in _DCP_DATA_MODULES:
            cls = getattr(importlib.import_module(module), name, None)
            if isinstance(cls, type) and (
                dataclasses.is_dataclass(cls) or issubclass(cls, enum.Enum)
            ):
                return cls
        raise pickle.UnpicklingError(f"{module}.{name} is not a class of DCP's metadata")


def is_plain_name(name: object) -> bool:
    """A file or folder name beside the file that named it: no separator, no `..`, nothing absolute. Every
    name read from a received file (DCP's index, an HF index, a `latest`) must be one."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
    )


class SafeReader(FileSystemReader):
    """DCP's file-system reader with the index read through an allow-list. Its errors are CheckpointError."""

    def read_metadata(self, *args, **kwargs) -> dcp_meta.Metadata:
        index = Path(self.path) / ".metadata"
        try:
            with open(index, "rb") as f:
                md = _IndexUnpickler(io.BytesIO(f.read())).load()
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            OSError,
        ) as e:
            raise CheckpointError(
                f"{index} cannot be read as DCP's tensor index ({type(e).__name__}: "
                f"{str(e)[:160]}): it is damaged, or holds objects other than DCP's metadata, "
                "which are never unpickled here. Fix: copy the checkpoint again from its "
                "source, or resume from an earlier step_* folder"
            ) from None
        if not isinstance(md, dcp_meta.Metadata) or not isinstance(md.storage_data, dict):
            raise CheckpointError(
                f"{index} holds a {type(md).__name__}, not DCP's Metadata. Fix: copy the "
                "checkpoint again"
            )
        bad = [
            info
            for info in md.storage_data.values()
            if not isinstance(info, _StorageInfo) or not is_plain_name(info.relative_path)
        ]
        if bad:
            where = getattr(bad[0], "relative_path", bad[0])
            raise CheckpointError(
                f"{index} names the data file {where!r}, outside {self.path}. Fix: use a "
                "checkpoint from a source you trust; this one is refused"
            )
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_meta.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan, planner):
        # DCP unpickles those in full
        if any(item.type == LoadItemType.BYTE_IO for item in plan.items):
            names = sorted(
                {item.dest_index.fqn for item in plan.items if item.type == LoadItemType.BYTE_IO}
            )
            raise CheckpointError(
                f"{self.path} stores {names[0]} as a pickled object, not a tensor, and pickles "
                "are never loaded here. Fix: use a checkpoint saved by this project"
            )
        return super().read_data(plan, planner)
