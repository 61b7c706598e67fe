"""The train state, its shardings, and the one jitted train step every task shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff import sharding as sh
from jaxdiff.convert.diffusers import COMPONENTS
from jaxdiff.train.optim import OptimConfig, ema_decay_at, ema_update, make_optimizer, schedule


@dataclasses.dataclass(frozen=True)
class Task:
    """What a model brings to the loop: its params, its loss, and what stays fixed.

    init(key) -> params, boxed with logical axis names (a linen ``init``'s "params").
    loss(params, frozen, batch, key) -> (scalar loss, dict of scalar metrics).
    frozen: arrays the loss reads but never trains (e.g. the VAE and text encoder of an LDM).
    """

    name: str
    init: Callable
    loss: Callable
    frozen: Any = None
    sample: Callable | None = None  # (params, frozen, key) -> images [N, H, W, 3] in [0, 1]
    uses_step: bool = False  # loss(..., key, step): for schedules inside the loss (GAN warm-up)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32, train steps taken (skipped ones included)
    params: Any
    opt_state: Any
    ema: Any  # EMA of params, or None
    key: jax.Array  # uint32 key data; the step's key is fold_in(key, step)
    bad_steps: jax.Array  # int32, non-finite steps in a row
    skipped: jax.Array  # int32, non-finite steps in all


def _replicated(mesh):
    return NamedSharding(mesh, P())


def init_state(task: Task, optim: OptimConfig, mesh: Mesh, rules, seed: int):
    """Params and optimiser state born sharded: eval_shape -> shardings -> jit(init, out_shardings)."""
    boxed = jax.eval_shape(task.init, jax.random.key(seed))
    param_sh = sh.param_shardings(boxed, mesh, rules)
    abstract_params = nn.unbox(boxed)
    tx = make_optimizer(optim, abstract_params)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = _like_params(abstract_opt, abstract_params, param_sh, _replicated(mesh))
    rep = _replicated(mesh)
    shardings = TrainState(
        step=rep,
        params=param_sh,
        opt_state=opt_sh,
        ema=param_sh if optim.ema_decay > 0 else None,
        key=rep,
        bad_steps=rep,
        skipped=rep,
    )

    def init(seed_key):
        params = nn.unbox(task.init(seed_key))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema=params if optim.ema_decay > 0 else None,
            key=jax.random.key_data(jax.random.fold_in(seed_key, 1)),
            bad_steps=jnp.zeros((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
        )

    state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return state, shardings, tx


def _keys(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _like_params(tree, params, param_sh, default):
    """Shardings for an optimiser state: a leaf whose path ends with a param's path and has its shape
    (Adam's moments, EMA-like copies, under any wrapper) shards like that param; the rest (counters)
    take ``default``."""
    by_path = {}
    for (path, p), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_sh)):
        by_path[_keys(path)] = (p.shape, s)

    def pick(path, leaf):
        keys = _keys(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)


def make_train_step(
    task: Task, tx, optim: OptimConfig, state_shardings, frozen_shardings, batch_sharding
):
    """The jitted step: (state, frozen, batch) -> (state, metrics); the state is donated."""
    lr_at = schedule(optim)

    def step(state: TrainState, frozen, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        extra = (state.step,) if task.uses_step else ()
        (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(
            state.params, frozen, batch, key, *extra
        )
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        ema = None
        if state.ema is not None:
            ema = keep(ema_update(state.ema, params, ema_decay_at(optim, state.step)), state.ema)
        new = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema=ema,
            bad_steps=jnp.where(ok, 0, state.bad_steps + 1),
            skipped=state.skipped + (~ok).astype(jnp.int32),
        )
        out = dict(
            metrics,
            loss=loss,
            grad_norm=grad_norm,
            finite=ok.astype(jnp.float32),
            lr=lr_at(state.step // max(optim.accumulate, 1)),
        )
        return new, out

    return jax.jit(
        step,
        in_shardings=(state_shardings, frozen_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


def abstract_with_shardings(state, shardings):
    """ShapeDtypeStructs carrying the target shardings: what orbax restores into (any mesh)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def init_like(module, kind, config, key, init_params=None):
    """Boxed params (logical axis names) from a smallest-input init, or ``init_params`` in those boxes."""

    return boxed_like(
        module.init(key, *COMPONENTS[kind].dummy_inputs(config))["params"], init_params
    )


def boxed_like(boxed, init_params=None):
    """``init_params`` placed in the boxes (logical axis names) of a fresh init; the init itself if None."""
    if init_params is None:
        return boxed
    return jax.tree.map(
        lambda b, p: b.replace_boxed(jnp.asarray(p, b.value.dtype)),
        boxed,
        init_params,
        is_leaf=lambda b: hasattr(b, "replace_boxed"),
    )


def compute_dtype(name):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
