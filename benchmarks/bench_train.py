"""Training-step throughput of the LDM task: examples/s, compile time and XLA's FLOPs per step.

    python benchmarks/bench.py train --preset tiny [--size 32] [--batch 8] [--devices 1,8] [--repeats 5]
                                  [--rules data_parallel|fsdp|fsdp_tensor] [--remat] [--dtype bfloat16]

The UNet preset trains against frozen VAE and text-encoder presets of the same name (seeded random
weights: the time does not depend on the values), on a fixed synthetic batch, with the production
step (``jaxdiff.train.step``: AdamW, clipping, the non-finite guard). Each device count is a
data-parallel mesh over that many of the process's devices, in one process, so the 1-device
number shares XLA:CPU's thread pool with 7 idle fake devices. ``flops`` is XLA's cost analysis of
the compiled step (one device's share, times the device count): divide by the step time and the chip's peak for MFU on a GPU or TPU.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import bench as B
import numpy as np

COLUMNS = (
    "date",
    "benchmark",
    "preset",
    "shape",
    "devices",
    "examples/s",
    "s/step",
    "compile s",
    "GFLOP/step",
    "machine",
    "notes",
)


def bench_train(args) -> dict:
    import jax
    from flax import linen as nn

    from jaxdiff import sharding as sh
    from jaxdiff.convert.diffusers import COMPONENTS
    from jaxdiff.models import text as T
    from jaxdiff.models import unet as U
    from jaxdiff.models import vae as V
    from jaxdiff.train import ldm
    from jaxdiff.train.optim import OptimConfig
    from jaxdiff.train.step import init_state, make_train_step

    ucfg, vcfg = U.PRESETS[args.preset], V.PRESETS[args.preset]
    tcfg = dataclasses.replace(
        T.PRESETS["sd15" if args.preset == "sd15" else "tiny"], vocab_size=49408
    )

    def rand(kind, cfg, seed):
        m = COMPONENTS[kind].module(cfg)
        return jax.jit(
            lambda k: nn.unbox(m.init(k, *COMPONENTS[kind].dummy_inputs(cfg))["params"])
        )(jax.random.key(seed))

    frozen = {"vae": rand("vae", vcfg, 1), "text_encoder": rand("text_encoder", tcfg, 2)}
    ids = np.full((77,), 49407, np.int32)
    ids[0] = 49406
    task = ldm.ldm_task(
        ldm.LDMConfig(compute_dtype=args.dtype, remat=args.remat), ucfg, vcfg, tcfg, frozen, ids
    )
    optim = OptimConfig(learning_rate=1e-4, total_steps=1000)
    rng = np.random.default_rng(0)
    host = {
        "image": rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32),
        "tokens": np.tile(ids, (args.batch, 1)),
    }
    result = {
        "benchmark": "train",
        "preset": args.preset,
        "size": args.size,
        "batch": args.batch,
        "dtype": args.dtype,
        "rules": args.rules,
        "remat": args.remat,
        "runs": [],
    }
    for n in [int(d) for d in args.devices.split(",")]:
        if n > jax.device_count() or args.batch % n:
            raise SystemExit(
                f"--devices {n}: needs {n} devices (have {jax.device_count()}) and a batch divisible by it"
            )
        mesh = sh.make_mesh(
            (n, 1, 1) if args.rules == "data_parallel" else (1, n, 1), devices=jax.devices()[:n]
        )
        rules = sh.RULE_SETS[args.rules]
        state, shardings, tx = init_state(task, optim, mesh, rules, seed=0)
        from jaxdiff.data.pipeline import batch_sharding

        batch = jax.device_put(host, batch_sharding(mesh, rules))
        fz = jax.device_put(frozen, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        step = make_train_step(
            task,
            tx,
            optim,
            shardings,
            jax.tree.map(lambda x: x.sharding, fz),
            jax.tree.map(lambda x: x.sharding, batch),
        )
        B.log(f"{n} device(s): compile")
        t0 = time.perf_counter()
        compiled = step.lower(state, fz, batch).compile()
        t1 = time.perf_counter()
        state, m = compiled(state, fz, batch)
        jax.block_until_ready(m)
        t2 = time.perf_counter()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        times, other, box = [], [], {"s": state}

        def run(box=box, fn=compiled, fz=fz, batch=batch):
            box["s"], box["m"] = fn(box["s"], fz, batch)
            jax.block_until_ready(box["m"])

        for _ in range(args.repeats):
            t, o = B.timed(run)
            times.append(t), other.append(o)
        med = statistics.median(times)
        run = {
            "devices": n,
            "compile_s": t1 - t0,
            "first_step_s": t2 - t1,
            "time_s": B._stats(times),
            "other_cpu_cores": other,
            "examples_per_s": args.batch / med,
            # XLA's cost analysis of an SPMD program counts one device's share: times n for the step
            "flops_per_step": float(cost.get("flops", float("nan"))) * n if cost else None,
            "loss": float(m["loss"]),
        }
        B.log(
            f"{n} device(s): {med:.3f} s/step, {args.batch / med:.1f} examples/s, compile {t1 - t0:.1f} s, "
            f"{(run['flops_per_step'] or 0) / 1e9:.1f} GFLOP/step"
        )
        result["runs"].append(run)
        state = compiled = step = box = None  # free this mesh's buffers before the next
    result["rss_peak_process"] = B._maxrss()
    return result


def table_rows(r: dict) -> list[dict]:
    return [
        {
            "date": r["date"],
            "benchmark": "train",
            "preset": r["preset"],
            "shape": f"batch {r['batch']} x {r['size']}px, {r['dtype']}, {r['rules']}"
            + (", remat" if r["remat"] else ""),
            "devices": str(x["devices"]),
            "examples/s": f"{x['examples_per_s']:.2f}",
            "s/step": f"{x['time_s']['median']:.3f} ({x['time_s']['min']:.3f}-{x['time_s']['max']:.3f})",
            "compile s": f"{x['compile_s']:.1f}",
            "GFLOP/step": f"{(x['flops_per_step'] or 0) / 1e9:.1f}",
            "machine": r["env"]["machine"],
            "notes": r.get("note") or "LDM task, AdamW, fixed synthetic batch",
        }
        for x in r["runs"]
    ]


def add_parser(sub):
    t = sub.add_parser("train", help="LDM training-step throughput, 1 vs N devices")
    t.add_argument("--preset", default="tiny", choices=["tiny", "sd15"])
    t.add_argument("--size", type=int, default=32, help="image side in pixels")
    t.add_argument("--batch", type=int, default=8, help="global batch")
    t.add_argument("--devices", default="1,8")
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    t.add_argument(
        "--rules", default="data_parallel", choices=["data_parallel", "fsdp", "fsdp_tensor"]
    )
    t.add_argument("--remat", action="store_true", help="nn.remat per UNet block")
    t.add_argument("--out", default=None)
    t.add_argument("--markdown", default="BENCHMARKS.md")
    t.add_argument("--xla-flags", default=None)
    t.add_argument("--note", default="")
    return t
