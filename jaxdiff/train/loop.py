"""The one training loop: sharded state, jitted step, orbax checkpoints, exact resume, preemption.

Every model trains through ``train(task, ...)``; a task only supplies its init and loss. The loop
owns the mesh placement, the step, the data iterator's position, checkpoints (async, keep K, the
iterator state saved beside the train state), the non-finite-step guard, SIGTERM handling and logs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff.train.optim import OptimConfig
from jaxdiff.train.step import (
    Task,
    TrainState,
    abstract_with_shardings,
    init_state,
    make_train_step,
)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int = 1000  # total train steps (micro-batches when accumulating)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    sample_every: int = 0  # > 0: a sample image grid (the task's `sample`) to TensorBoard


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite losses, a workdir that belongs to another run ...)."""


class _Preemption:
    """SIGTERM (a TPU preemption or maintenance event) asks the loop to save and stop at the next step."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def check_workdir(workdir, fingerprint: dict, overwrite: bool = False, resumable=()) -> bool:
    """True if workdir holds this run's checkpoints (resume); an error if it holds another run's.
    ``workdir`` may be local or a bucket (``gs://...``: etils.epath, with gcsfs installed).
    ``resumable``: keys that may change on resumption, ignored where a run saved them."""
    workdir = epath.Path(workdir)
    ckpt, run = workdir / "checkpoints", workdir / "run.json"
    has_ckpt = ckpt.exists() and any(ckpt.iterdir())
    saved = (
        {k: v for k, v in json.loads(run.read_text()).items() if k not in resumable}
        if has_ckpt and run.exists()
        else None
    )
    if saved is not None and saved != fingerprint and not overwrite:
        diff = sorted(
            k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k)
        )
        raise TrainingError(
            f"{workdir} holds checkpoints of another run (differs in {diff}); use another "
            "--workdir, or --overwrite to start this one there"
        )
    if has_ckpt and overwrite and saved != fingerprint:
        if jax.process_index() == 0:
            ckpt.rmtree()
        has_ckpt = False
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = run.parent / (run.name + ".tmp")
        tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True, default=str))
        tmp.replace(run)
    return has_ckpt


def _single_process_array_writes():
    """With one process every replica of a replicated array is on this host, so orbax's replica-parallel
    writing (each replica writes a slice, for hosts to share the work) only cuts each array into one eager
    slice per device: one XLA compile per slice shape and a dispatch per piece (25 s of a 90 s smoke run on 8
    CPU devices). One process writes each shard once instead; several processes keep orbax's default."""
    if jax.process_count() == 1 and getattr(
        ocp.type_handlers.get_type_handler(jax.Array), "_use_replica_parallel", False
    ):
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
        )


def _manager(workdir, cfg: LoopConfig) -> ocp.CheckpointManager:
    _single_process_array_writes()
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints,
        save_interval_steps=cfg.checkpoint_every,
        enable_async_checkpointing=cfg.async_checkpoints,
        create=True,
    )
    ckpt = workdir / "checkpoints"
    ckpt = ckpt if "://" in str(workdir) else epath.Path(os.path.abspath(ckpt))
    return ocp.CheckpointManager(ckpt, options=opts, item_names=("state", "data"))


def train(
    task: Task,
    optim: OptimConfig,
    cfg: LoopConfig,
    mesh: Mesh,
    rules,
    workdir,
    batches: Iterator,
    to_global,
    *,
    fingerprint: dict | None = None,
    resumable=(),
    overwrite: bool = False,
    writer: Any = None,
    on_step=None,
    examples_per_step: int | None = None,
) -> TrainState:
    """Train ``task`` for ``cfg.steps`` steps; resume from workdir's latest checkpoint if it has one.

    batches: a host-batch iterator with get_state()/set_state() (grain's DatasetIterator).
    to_global(host_batch) -> the batch as global jax.Arrays on ``mesh``.
    on_step(step, state, metrics): called after every step (tests use it to kill the process).
    """
    workdir = epath.Path(workdir)
    resume = check_workdir(workdir, fingerprint or {}, overwrite, resumable)
    state, shardings, tx = init_state(task, optim, mesh, rules, cfg.seed)
    rep = NamedSharding(mesh, P())
    frozen = jax.device_put(task.frozen, rep) if task.frozen is not None else None
    frozen_sh = jax.tree.map(lambda _: rep, frozen) if frozen is not None else None
    mngr = _manager(workdir, cfg)
    if resume and mngr.latest_step() is not None:
        step0 = mngr.latest_step()
        restored = mngr.restore(
            step0,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_with_shardings(state, shardings)),
                data=ocp.args.JsonRestore(),
            ),
        )
        state = restored["state"]
        batches.set_state(restored["data"])
        _log(writer, f"resumed from step {step0} in {workdir / 'checkpoints'}")
    train_step = sampler = None
    step = int(state.step)
    t_last, n_last = time.perf_counter(), step
    try:
        with _Preemption() as preempt:
            while step < cfg.steps:
                host = next(batches)
                batch = to_global({k: v for k, v in host.items() if isinstance(v, np.ndarray)})
                if train_step is None:
                    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
                    train_step = make_train_step(task, tx, optim, shardings, frozen_sh, batch_sh)
                state, metrics = train_step(state, frozen, batch)
                step += 1
                if int(state.bad_steps) >= cfg.max_bad_steps:
                    raise TrainingError(
                        f"{cfg.max_bad_steps} non-finite steps in a row (loss or gradients "
                        f"NaN/Inf) up to step {step}; stopping. Lower the learning rate or "
                        "check the data; the last good checkpoint is kept"
                    )
                if on_step is not None:
                    on_step(step, state, metrics)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    m["steps_per_s"] = (step - n_last) / max(now - t_last, 1e-9)
                    t_last, n_last = now, step
                    _scalars(writer, step, m)
                    if writer is not None:
                        writer.update_progress(step, loss=m["loss"], examples=examples_per_step)
                if (
                    cfg.sample_every
                    and task.sample is not None
                    and writer is not None
                    and (step % cfg.sample_every == 0 or step == cfg.steps)
                ):
                    if sampler is None:
                        sampler = jax.jit(task.sample, out_shardings=rep)
                    key = jax.random.fold_in(
                        jax.random.key(cfg.seed), 10_000_019
                    )  # the same noise every time
                    images = sampler(
                        state.ema if state.ema is not None else state.params, frozen, key
                    )
                    writer.write_images(step, {"samples": np.asarray(images)})
                if _stop_requested(preempt, step):
                    _save(mngr, step, state, batches, force=True)
                    mngr.wait_until_finished()
                    _log(
                        writer,
                        f"SIGTERM: saved step {step} and stopped; run the same command to resume",
                    )
                    return state
                _save(mngr, step, state, batches, force=step == cfg.steps)
    finally:
        mngr.wait_until_finished()
        mngr.close()
    return state


def _stop_requested(preempt, step) -> bool:
    """One process: our SIGTERM flag. Several: JAX's preemption service (started by
    jax.distributed.initialize) makes every process agree on the same step to stop at."""
    if jax.process_count() == 1:
        return preempt.requested

    return bool(multihost_utils.reached_preemption_sync_point(step))


def _save(mngr, step, state, batches, force=False):
    if force or mngr.should_save(step):
        data = json.loads(json.dumps(batches.get_state()))  # the iterator's position, JSON-safe
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)
            ),
            force=force,
        )


def _log(writer, msg):
    if writer is not None:
        writer.log(msg)
    elif jax.process_index() == 0:
        print(msg, flush=True)


def _scalars(writer, step, m):
    if writer is not None:
        writer.write_scalars(step, m)
    elif jax.process_index() == 0:
        print(
            f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(m.items())), flush=True
        )
