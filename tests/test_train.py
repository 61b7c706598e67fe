"""The training engine on 8 CPU devices: sharded init and step, checkpoints across meshes, exact
resume after SIGKILL, SIGTERM, the non-finite guard, frozen params, accumulation, EMA, overfitting."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxdiff import sharding as sh
from jaxdiff.train import loop
from jaxdiff.train.optim import OptimConfig
from jaxdiff.train.step import Task, init_state, make_train_step

# --- a toy task: linear regression with logical axis names, exact to reason about ------------------


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), (sh.EMBED, sh.MLP)),
            (x.shape[-1], 16),
        )
        b = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, (sh.MLP,)), (16,)
        )
        return x @ w + b


def toy_task(nan_at=()):
    model = Linear()

    def loss(params, frozen, batch, key):
        pred = model.apply({"params": params}, batch["x"])
        value = jnp.mean((pred - batch["y"]) ** 2)
        bad = jnp.isin(batch["step"][0], jnp.asarray(nan_at if nan_at else [-1]))
        return jnp.where(bad, jnp.nan, value), {}

    return Task("toy", lambda key: model.init(key, jnp.zeros((1, 8)))["params"], loss)


class ListIterator:
    """Host batches from a seeded generator, with grain's get_state / set_state."""

    def __init__(self, batch=8, seed=0):
        self.i, self.batch, self.seed = 0, batch, seed

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.i])
        x = rng.standard_normal((self.batch, 8)).astype(np.float32)
        out = {
            "x": x,
            "y": np.tanh(x @ np.ones((8, 16), np.float32) / 3),
            "step": np.full((self.batch,), self.i),
        }
        self.i += 1
        return out

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


def _run(mesh, rules, steps, optim=None, task=None, batch=8):
    task = task or toy_task()
    optim = optim or OptimConfig(learning_rate=0.05, total_steps=50)
    state, shardings, tx = init_state(task, optim, mesh, rules, seed=0)
    it = ListIterator(batch)
    step = None
    for _ in range(steps):
        b = jax.device_put({k: v for k, v in next(it).items()}, sh_batch(mesh, rules))
        step = step or make_train_step(
            task, tx, optim, shardings, None, jax.tree.map(lambda x: x.sharding, b)
        )
        state, metrics = step(state, None, b)
    return state, metrics


def sh_batch(mesh, rules):
    from jaxdiff.data.pipeline import batch_sharding

    return batch_sharding(mesh, rules)


def one_device_mesh():
    return sh.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def test_step_on_data2_fsdp4_equals_one_device():
    many, _ = _run(sh.make_mesh((2, 4, 1)), sh.FSDP_RULES, 3)
    one, _ = _run(one_device_mesh(), sh.FSDP_RULES, 3)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
        many.params,
        one.params,
    )
    kernel = many.params["kernel"]  # [8, 16]: EMBED -> fsdp
    assert kernel.sharding.spec[0] == "fsdp"
    assert kernel.addressable_shards[0].data.shape == (2, 16)  # really split 4 ways
    mu = many.opt_state[1][0].mu["kernel"]  # Adam's moment shards like its param
    assert mu.sharding.spec == kernel.sharding.spec


def test_non_finite_steps_are_skipped_then_stop():
    task = toy_task(nan_at=(1,))
    state, _ = _run(one_device_mesh(), sh.DATA_PARALLEL, 3, task=task)
    assert int(state.skipped) == 1 and int(state.bad_steps) == 0 and int(state.step) == 3
    ref, _ = _run(one_device_mesh(), sh.DATA_PARALLEL, 1)
    # a skipped step leaves params as they were: step 0's update, then NaN (skipped), then step 2's
    assert np.all(np.isfinite(np.asarray(state.params["kernel"])))
    assert not np.allclose(state.params["kernel"], ref.params["kernel"])


def test_frozen_params_and_ema():
    optim = OptimConfig(learning_rate=0.05, total_steps=50, frozen=("bias",), ema_decay=0.5)
    state, _ = _run(one_device_mesh(), sh.DATA_PARALLEL, 4, optim=optim)
    init, _, _ = init_state(toy_task(), optim, one_device_mesh(), sh.DATA_PARALLEL, seed=0)
    np.testing.assert_array_equal(state.params["bias"], init.params["bias"])
    assert not np.allclose(state.params["kernel"], init.params["kernel"])
    assert not np.allclose(state.ema["kernel"], state.params["kernel"])  # EMA lags the params
    with pytest.raises(ValueError, match="matches no parameter"):
        _run(one_device_mesh(), sh.DATA_PARALLEL, 1, optim=OptimConfig(frozen=("nope",)))


def test_ema_warmup():
    """The EMA's decay ramps as (1 + t) / (10 + t) up to ema_decay, so a short run's EMA forgets the init."""
    from jaxdiff.train.optim import ema_decay_at

    cfg = OptimConfig(ema_decay=0.999)
    np.testing.assert_allclose(
        [float(ema_decay_at(cfg, t)) for t in (0, 10, 990, 20000)],
        [0.1, 11 / 20, 0.991, 0.999],
        rtol=1e-6,
    )
    assert float(ema_decay_at(OptimConfig(ema_decay=0.999, ema_warmup=False), 0)) == np.float32(
        0.999
    )
    # after the first update the warm EMA holds 0.9 of the params (it would hold 0.001 without warm-up)
    optim = OptimConfig(learning_rate=0.05, total_steps=50, ema_decay=0.999)
    init, _, _ = init_state(toy_task(), optim, one_device_mesh(), sh.DATA_PARALLEL, seed=0)
    state, _ = _run(one_device_mesh(), sh.DATA_PARALLEL, 1, optim=optim)
    np.testing.assert_allclose(
        state.ema["kernel"],
        0.1 * init.params["kernel"] + 0.9 * state.params["kernel"],
        rtol=1e-5,
        atol=1e-7,
    )


def test_accumulation_equals_the_big_batch():
    """2 micro-batches of 8 with accumulate=2 = one batch of 16 (the toy loss is a batch mean)."""
    small, _ = _run(
        one_device_mesh(), sh.DATA_PARALLEL, 2, optim=OptimConfig(learning_rate=0.05, accumulate=2)
    )

    class Pairs(ListIterator):
        def __next__(self):
            a, b = ListIterator.__next__(self), ListIterator.__next__(self)
            return {k: np.concatenate([a[k], b[k]]) for k in a}

    task = toy_task()
    optim = OptimConfig(learning_rate=0.05)
    mesh = one_device_mesh()
    state, shardings, tx = init_state(task, optim, mesh, sh.DATA_PARALLEL, seed=0)
    b = jax.device_put(next(Pairs()), sh_batch(mesh, sh.DATA_PARALLEL))
    big, _ = make_train_step(
        task, tx, optim, shardings, None, jax.tree.map(lambda x: x.sharding, b)
    )(state, None, b)
    np.testing.assert_allclose(small.params["kernel"], big.params["kernel"], rtol=1e-5, atol=1e-6)


def _loop(workdir, mesh, steps, on_step=None, every=5, fingerprint=None, overwrite=False):
    it = ListIterator()
    rules = sh.FSDP_RULES
    return loop.train(
        toy_task(),
        OptimConfig(learning_rate=0.05, total_steps=50),
        loop.LoopConfig(steps=steps, log_every=100, checkpoint_every=every),
        mesh,
        rules,
        workdir,
        it,
        lambda b: jax.device_put(b, sh_batch(mesh, rules)),
        fingerprint=fingerprint or {"run": 1},
        overwrite=overwrite,
        on_step=on_step,
    )


def test_checkpoint_restores_on_another_mesh(tmp_path):
    a = _loop(tmp_path, sh.make_mesh((2, 4, 1)), 5)
    b = _loop(tmp_path, one_device_mesh(), 5)  # already at step 5: restore only
    assert int(b.step) == 5
    np.testing.assert_array_equal(np.asarray(a.params["kernel"]), np.asarray(b.params["kernel"]))
    assert b.params["kernel"].sharding.mesh.size == 1


def test_workdir_of_another_run_is_refused(tmp_path):
    _loop(tmp_path, one_device_mesh(), 5, fingerprint={"run": 1})
    with pytest.raises(loop.TrainingError, match="another run"):
        _loop(tmp_path, one_device_mesh(), 5, fingerprint={"run": 2})
    fresh = _loop(tmp_path, one_device_mesh(), 2, fingerprint={"run": 2}, overwrite=True)
    assert int(fresh.step) == 2


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    import test_train as T
    from jaxdiff import sharding as sh
    kill_at, sig = int(sys.argv[2]), sys.argv[3]
    def hook(step, state, metrics):
        if step == kill_at:
            os.kill(os.getpid(), getattr(signal, sig))
    state = T._loop(sys.argv[1], sh.make_mesh((2, 4, 1)), 20, on_step=hook)
    np.save(os.path.join(sys.argv[1], "final.npy"), np.asarray(state.params["kernel"]))
    print("STEP", int(state.step))
""")


def _child(workdir, kill_at, sig):
    code = CHILD.format(tests=os.path.dirname(__file__))
    return subprocess.run(
        [sys.executable, "-c", code, str(workdir), str(kill_at), sig],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    straight = _child(tmp_path / "a", -1, "SIGKILL")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _child(tmp_path / "b", 13, "SIGKILL")
    assert killed.returncode == -signal.SIGKILL
    resumed = _child(tmp_path / "b", -1, "SIGKILL")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # the step-10 save may still have been in flight (async) when the kill came: then step 5 is the
    # newest complete checkpoint, and orbax discards the unfinished one
    assert "resumed from step 10" in resumed.stdout or "resumed from step 5" in resumed.stdout
    np.testing.assert_array_equal(
        np.load(tmp_path / "a" / "final.npy"), np.load(tmp_path / "b" / "final.npy")
    )


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    out = _child(tmp_path, 7, "SIGTERM")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SIGTERM: saved step 7" in out.stdout and "STEP 7" in out.stdout
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 7
    resumed = _child(tmp_path, -1, "SIGTERM")
    assert "resumed from step 7" in resumed.stdout and "STEP 20" in resumed.stdout
    assert json.loads((tmp_path / "run.json").read_text()) == {"run": 1}


def test_tiny_ldm_overfits_one_batch():
    """Wiring check: a tiny LDM UNet on one fixed batch drives its loss down by an order of magnitude."""
    from jaxdiff.models import text as T
    from jaxdiff.models import unet as U
    from jaxdiff.models import vae as V
    from jaxdiff.train import ldm

    tcfg = dataclasses.replace(T.PRESETS["tiny"], vocab_size=49408)
    mk = lambda m, cfg, seed: nn.unbox(
        m.init(
            jax.random.key(seed),
            *(  # noqa: E731
                __import__("jaxdiff.convert.diffusers", fromlist=["x"])
                .COMPONENTS[cfg[0]]
                .dummy_inputs(cfg[1])
            ),
        )["params"]
    )
    frozen = {
        "vae": mk(V.AutoencoderKL(V.PRESETS["tiny"]), ("vae", V.PRESETS["tiny"]), 1),
        "text_encoder": mk(T.TextTransformer(tcfg), ("text_encoder", tcfg), 2),
    }
    ids = np.full((77,), 49407, np.int32)
    ids[0] = 49406
    task = ldm.ldm_task(
        ldm.LDMConfig(cond_dropout=0.0, beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
        U.PRESETS["tiny"],
        V.PRESETS["tiny"],
        tcfg,
        frozen,
        ids,
    )
    optim = OptimConfig(learning_rate=3e-3, total_steps=260, warmup_steps=10, weight_decay=0.0)
    mesh = one_device_mesh()
    state, shardings, tx = init_state(task, optim, mesh, sh.DATA_PARALLEL, seed=0)
    rng = np.random.default_rng(0)
    batch = {
        "image": np.clip(rng.standard_normal((4, 16, 16, 3)), -1, 1).astype(np.float32),
        "tokens": np.tile(ids, (4, 1)),
    }
    b = jax.device_put(batch, sh_batch(mesh, sh.DATA_PARALLEL))
    frozen_d = jax.device_put(task.frozen)
    step = make_train_step(
        task,
        tx,
        optim,
        shardings,
        jax.tree.map(lambda x: x.sharding, frozen_d),
        jax.tree.map(lambda x: x.sharding, b),
    )
    losses = []
    for _ in range(260):
        state, m = step(state, frozen_d, b)
        losses.append(float(m["loss"]))
    first, last = np.mean(losses[:10]), np.mean(losses[-20:])
    assert last < first / 10, (first, last)


def _tiny_ldm_parts():
    from jaxdiff.convert.diffusers import COMPONENTS
    from jaxdiff.models import text as T
    from jaxdiff.models import vae as V

    tcfg = dataclasses.replace(T.PRESETS["tiny"], vocab_size=49408)
    mk = lambda m, kind, cfg, seed: nn.unbox(
        m.init(jax.random.key(seed), *COMPONENTS[kind].dummy_inputs(cfg))["params"]
    )  # noqa: E731
    frozen = {
        "vae": mk(V.AutoencoderKL(V.PRESETS["tiny"]), "vae", V.PRESETS["tiny"], 1),
        "text_encoder": mk(T.TextTransformer(tcfg), "text_encoder", tcfg, 2),
    }
    ids = np.full((77,), 49407, np.int32)
    ids[0] = 49406
    return frozen, tcfg, ids


def test_remat_gives_the_same_gradients():
    """nn.remat per block recomputes activations in the backward pass; the numbers must not change."""
    from jaxdiff.models import unet as U

    cfg = U.PRESETS["tiny"]
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, cfg.cross_attention_dim))
    params = nn.unbox(U.UNet(cfg).init(jax.random.key(2), x, jnp.zeros((2,)), ctx)["params"])

    def grads(remat):
        f = lambda p: jnp.mean(
            U.UNet(cfg, remat=remat).apply({"params": p}, x, jnp.array([3.0, 500.0]), ctx) ** 2
        )  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(params)

    (l0, g0), (l1, g1) = grads(False), grads(True)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g0, g1)


def test_text_token_ce_decodes_each_prompt_token_up_to_the_end_token():
    from jaxdiff.models.text import PRESETS
    from jaxdiff.train.ldm import text_token_ce

    tcfg = dataclasses.replace(PRESETS["tiny"], vocab_size=7, eos_token_id=6)
    rng = np.random.default_rng(0)
    states, emb = rng.standard_normal((2, 5, 3)), rng.standard_normal((7, 3))
    ids = np.array(
        [[5, 1, 2, 6, 6], [5, 6, 6, 6, 6]], np.int32
    )  # BOS a b EOS pad / BOS EOS pad ...
    logits = states @ emb.T
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.mean(
        [logp[0, 0, 5], logp[0, 1, 1], logp[0, 2, 2], logp[0, 3, 6], logp[1, 0, 5], logp[1, 1, 6]]
    )
    got = text_token_ce(jnp.asarray(states), jnp.asarray(ids), jnp.asarray(emb), tcfg)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_text_token_loss_adds_its_weighted_term_and_needs_a_trained_text_encoder():
    from jaxdiff.models import unet as U
    from jaxdiff.models import vae as V
    from jaxdiff.train import ldm

    frozen, tcfg, ids = _tiny_ldm_parts()
    with pytest.raises(ValueError, match="text_token_loss .* train_text_encoder"):
        ldm.ldm_task(ldm.LDMConfig(text_token_loss=0.1), None, None, tcfg, frozen, ids)
    mk = lambda w: ldm.ldm_task(
        ldm.LDMConfig(cond_dropout=0.0, train_text_encoder=True, text_token_loss=w),  # noqa: E731
        U.PRESETS["tiny"],
        V.PRESETS["tiny"],
        tcfg,
        frozen,
        ids,
    )
    plain, aux = mk(0.0), mk(0.5)
    params = nn.unbox(plain.init(jax.random.key(0)))
    tokens = np.tile(ids, (2, 1))
    tokens[:, 1:3] = [[320, 321], [322, 323]]
    tokens[:, 3] = 49407
    batch = {"image": np.zeros((2, 16, 16, 3), np.float32), "tokens": tokens}
    l0, m0 = plain.loss(params, frozen, batch, jax.random.key(1))
    l1, m1 = aux.loss(params, frozen, batch, jax.random.key(1))
    assert (
        "text_token_ce" not in m0 and float(m1["text_token_ce"]) > 1.0
    )  # random tower: far from decoding
    np.testing.assert_allclose(float(l1), float(l0) + 0.5 * float(m1["text_token_ce"]), rtol=1e-5)
    key = jax.random.key(1)
    g = jax.grad(
        lambda p: aux.loss(p, frozen, batch, key)[0] - plain.loss(p, frozen, batch, key)[0]
    )(params)
    assert float(jnp.abs(g["text_encoder"]["embeddings"]["token_embedding"]["embedding"]).sum()) > 0
    assert all(
        float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g["unet"])
    )  # the UNet's loss is unchanged


def test_timestep_bias_draws_the_noisiest_steps_more_often():
    from jaxdiff.train.ldm import LDMConfig, ldm_task, sample_timesteps

    key, n = jax.random.key(0), 20000
    plain = sample_timesteps(key, n, LDMConfig())
    np.testing.assert_array_equal(
        plain, jax.random.randint(key, (n,), 0, 1000)
    )  # off: the old stream
    late = np.asarray(
        sample_timesteps(key, n, LDMConfig(timestep_bias_portion=0.5, timestep_bias_begin=850))
    )
    assert late.min() >= 0 and late.max() <= 999
    assert np.mean(late >= 850) == pytest.approx(
        0.5 + 0.5 * 0.15, abs=0.015
    )  # 57.5 % instead of 15 %
    assert np.mean(late < 425) == pytest.approx(0.5 * 0.425, abs=0.015)  # the rest stays uniform
    for bad in (
        dict(timestep_bias_portion=1.5),
        dict(timestep_bias_portion=0.5, timestep_bias_begin=1000),
    ):
        with pytest.raises(ValueError, match="timestep_bias"):
            ldm_task(LDMConfig(**bad), None, None, None, {}, np.zeros(4))
