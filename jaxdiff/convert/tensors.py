"""Reading and writing tensor files without PyTorch: safetensors (memory-mapped) and sharded indexes.

PyTorch ``.bin`` pickles are read only through ``torch.load(weights_only=True)``, which refuses to run
arbitrary code from the file; nothing here ever unpickles beyond that.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy arrays (views of one read-only memory map)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > os.path.getsize(path) - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n} exceeds the file)")
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write tensors atomically (a temporary file renamed into place: no half-written file remains)."""
    path = Path(path)
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name])).reshape(
            np.shape(tensors[name])
        )  # keeps 0-d
        if a.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
        header[name] = {
            "dtype": _NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)


def read_torch_bin(path) -> dict[str, np.ndarray]:
    """A PyTorch state dict, loaded with ``weights_only=True`` (no arbitrary code runs)."""
    try:
        import torch  # noqa: PLC0415 (optional: only .bin checkpoints need torch)
    except ImportError as e:
        raise ImportError(
            f"{path} is a PyTorch pickle; reading it needs torch installed "
            "(or convert it to .safetensors)"
        ) from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    out = {}
    for k, v in sd.items():
        if hasattr(v, "numpy"):
            out[k] = (
                v.float().numpy().astype(ml_dtypes.bfloat16)
                if v.dtype == torch.bfloat16
                else v.numpy()
            )
    return out


def read_tensors(path) -> dict[str, np.ndarray]:
    """A .safetensors, a .bin/.pt/.ckpt pickle, or a sharded ``*.index.json`` (all shards merged)."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        out = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(read_tensors(path.parent / shard))
        return out
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return read_torch_bin(path)
    raise ValueError(
        f"{path}: unknown weight file type (expected .safetensors, .bin or .index.json)"
    )


def find_weights(folder, stems: tuple[str, ...], variant: str | None = None) -> Path:
    """The weight file of a diffusers/transformers component folder, safetensors preferred."""
    folder = Path(folder)
    suffix = f".{variant}" if variant else ""
    candidates = [
        folder / name
        for stem in stems
        for ext in ("safetensors", "bin")
        for name in (f"{stem}{suffix}.{ext}", f"{stem}.{ext}.index{suffix}.json")
    ]
    for c in candidates:
        if c.exists():
            return c
    raise FileNotFoundError(
        f"{folder}: no weights found; expected one of {[c.name for c in candidates]}"
    )
