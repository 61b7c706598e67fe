"""The one table between Flax param paths and PyTorch state-dict keys.

Flax modules here mirror the reference modules' names, so a Flax path maps to a PyTorch key by rule:
``down_blocks_0/resnets_1/conv1/kernel`` <-> ``down_blocks.0.resnets.1.conv1.weight``. A trailing
``_N`` is a list index only on the names in ``LIST_NAMES`` (``time_embedding/linear_1`` stays put).
Leaves: ``kernel`` (4-D: OIHW <-> HWIO; 2-D: transposed), ``scale``/``embedding`` <-> ``weight``.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import traverse_util

LIST_NAMES = (
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "transformer_blocks",
    "downsamplers",
    "upsamplers",
    "to_out",
    "net",
    "layers",
)
_LIST_RE = re.compile(rf"^({'|'.join(LIST_NAMES)})_(\d+)$")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_key(path: tuple[str, ...]) -> str:
    """Flax param path -> PyTorch state-dict key."""
    *mods, leaf = path
    parts = []
    for m in mods:
        match = _LIST_RE.match(m)
        parts += [match.group(1), match.group(2)] if match else [m]
    return ".".join(parts + [_LEAF.get(leaf, leaf)])


def to_torch_layout(path, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T
    return value


def to_flax_layout(path, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value.T
    return value


class ConversionError(ValueError):
    pass


def torch_to_flax(
    state_dict: dict[str, np.ndarray],
    abstract_params,
    *,
    prefix: str = "",
    ignore: tuple[str, ...] = (),
    what: str = "model",
    dtype=None,
):
    """Fill every leaf of ``abstract_params`` (shapes, e.g. from ``jax.eval_shape``) from ``state_dict``.

    Every source tensor must be consumed (bar keys matching an ``ignore`` regex) and every param
    filled; otherwise a ConversionError names the keys. A shape mismatch names both shapes.
    """
    flat = traverse_util.flatten_dict(abstract_params)
    wanted = {prefix + torch_key(p): p for p in flat}
    ignore_re = [re.compile(r) for r in ignore]
    unused = sorted(
        k for k in state_dict if k not in wanted and not any(r.search(k) for r in ignore_re)
    )
    missing = sorted(k for k in wanted if k not in state_dict)
    if unused or missing:
        msg = [f"{what}: the checkpoint does not match the model config."]
        if missing:
            msg.append(f"{len(missing)} params have no tensor in the checkpoint: {_show(missing)}")
        if unused:
            msg.append(f"{len(unused)} checkpoint tensors match no param: {_show(unused)}")
        raise ConversionError("\n".join(msg))
    out, bad = {}, []
    for key, path in wanted.items():
        value = to_flax_layout(path, np.asarray(state_dict[key]))
        expect = tuple(flat[path].shape)
        if value.shape != expect:
            bad.append(
                f"{key}: checkpoint {tuple(state_dict[key].shape)} -> {value.shape}, "
                f"model expects {expect}"
            )
            continue
        out[path] = value.astype(dtype or flat[path].dtype)
    if bad:
        raise ConversionError(
            f"{what}: {len(bad)} tensors have the wrong shape:\n  " + "\n  ".join(bad)
        )
    return traverse_util.unflatten_dict(out)


def flax_to_torch(params, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax params -> PyTorch-layout numpy tensors keyed by state-dict names (exact inverse)."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    return {
        prefix + torch_key(p): _contiguous(to_torch_layout(p, np.asarray(v)))
        for p, v in flat.items()
    }


def _contiguous(a: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray turns a 0-d array (CLIP's logit_scale) into shape [1]; keep the shape
    return np.ascontiguousarray(a).reshape(np.shape(a))


def _show(keys, n=8):
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
