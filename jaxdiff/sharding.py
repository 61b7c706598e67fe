"""Sharding, declared once: mesh axes, logical axis names, and the rule sets that map one to the other.

Models annotate params (``nn.with_logical_partitioning``) and key activations
(``nn.with_logical_constraint``) with the logical names below; a rule set turns them into mesh axes.
``tests/test_sharding.py`` proves every name a model uses is covered by every rule set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Mesh axes.
DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# Logical axis names.
BATCH = "batch"  # examples
LENGTH = "length"  # tokens, or flattened pixels
HEIGHT, WIDTH = "height", "width"
EMBED = "embed"  # a layer's input width (model / channel dimension)
MLP = "mlp"  # a layer's output or hidden width
HEADS = "heads"  # attention heads
KV = "kv"  # per-head features
VOCAB = "vocab"  # token vocabulary
CONV_H, CONV_W = "conv_h", "conv_w"  # a convolution kernel's spatial taps
NORM = "norm"  # norm scales and biases

LOGICAL_NAMES = (BATCH, LENGTH, HEIGHT, WIDTH, EMBED, MLP, HEADS, KV, VOCAB, CONV_H, CONV_W, NORM)

_replicated = tuple((name, None) for name in LOGICAL_NAMES if name != BATCH)

# Pure data parallelism: the batch splits over every data-like axis, params are replicated.
DATA_PARALLEL = ((BATCH, (DATA, FSDP)),) + _replicated
# FSDP (ZeRO-3 style): params additionally split along their input width.
FSDP_RULES = ((BATCH, (DATA, FSDP)), (EMBED, FSDP)) + tuple(
    (n, None) for n in LOGICAL_NAMES if n not in (BATCH, EMBED)
)
# FSDP + tensor parallelism: output widths, heads and the vocabulary split over `tensor`.
FSDP_TENSOR = (
    (BATCH, (DATA, FSDP)),
    (EMBED, FSDP),
    (MLP, TENSOR),
    (HEADS, TENSOR),
    (VOCAB, TENSOR),
) + tuple((n, None) for n in LOGICAL_NAMES if n not in (BATCH, EMBED, MLP, HEADS, VOCAB))

RULE_SETS = {"data_parallel": DATA_PARALLEL, "fsdp": FSDP_RULES, "fsdp_tensor": FSDP_TENSOR}


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one entry may be -1 and is filled from the device count."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape needs 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh {tuple(shape)} needs {math.prod(shape)} devices, have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_specs(abstract_variables):
    """Logical PartitionSpecs of a (boxed) variable tree, e.g. from ``jax.eval_shape(model.init, ...)``."""
    return nn.get_partition_spec(abstract_variables)


def _fit(spec: P, shape, mesh: Mesh) -> P:
    # A dim that the mesh axes do not divide stays replicated (e.g. a UNet's 4 input channels on 8 devices).
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if names and dim % size == 0 else None)
    return P(*out)


def param_shardings(abstract_variables, mesh: Mesh, rules):
    """NamedShardings for every leaf of a boxed abstract tree under ``rules`` (unboxed structure)."""
    specs = nn.logical_to_mesh(logical_specs(abstract_variables), rules)
    shapes = nn.unbox(abstract_variables)
    return jax.tree.map(
        lambda s, x: NamedSharding(mesh, _fit(s, x.shape, mesh)),
        specs,
        shapes,
        is_leaf=lambda s: isinstance(s, P),
    )


def logical_names_used(abstract_variables) -> set[str]:
    """Every logical axis name that appears in a boxed variable tree."""
    names: set[str] = set()
    for spec in jax.tree.leaves(
        logical_specs(abstract_variables), is_leaf=lambda s: isinstance(s, P)
    ):
        for axes in spec:
            names.update((axes,) if isinstance(axes, str) else tuple(axes or ()))
    return names
