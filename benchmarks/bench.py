"""Benchmarks against the PyTorch reference, both models running identical weights in one process.

    python benchmarks/bench.py unet --preset sd15 [--batch 2] [--size 64] [--repeats 5] [--dtype float32]
                                 [--no-torch] [--out FILE.json] [--markdown BENCHMARKS.md]
                                 [--xla-flags "..."] [--attention auto|xla|cpu_blocked]
                                 [--profile DIR] [--note "..."]

``unet`` builds diffusers' PyTorch ``UNet2DConditionModel`` from ``unet_config_to_diffusers(preset)`` with
seeded random weights, converts those weights with the production converter
(``convert.diffusers.params_from_state_dict``) and times

* jaxdiff: the jitted forward. ``compile_s`` is the first call, compile included (trace + lower + XLA
  compile + one run, waited on with ``block_until_ready``); then the median over ``--repeats`` calls.
* torch: ``UNet2DConditionModel`` under ``torch.inference_mode()`` on the same inputs in NCHW, one
  warm-up call, then the median over ``--repeats`` calls.

The timed jaxdiff and torch calls alternate (jax, torch, jax, torch, ...) so a load spike from another
process on the machine hits both sides alike; every single time is kept in the JSON, with the CPU
other processes used during each call ("other procs ... cores": anything above ~0.05 means the
number is disturbed; on 2 cores PyTorch's OpenMP threads slow down several-fold under load). Besides
the ratio of the medians the JSON has the median of the back-to-back pair ratios, which is robust to
the machine drifting during the run.

Memory, several separate measures (all in bytes in the JSON, GiB in the table):

* ``params``: the bytes of the jaxdiff params (the torch model holds the same amount).
* ``jaxdiff.xla_memory``: XLA's own buffer assignment of the compiled forward (``memory_analysis()``):
  ``temp_size_in_bytes`` = the activation working set XLA reserves for one call; exact, not sampled.
* ``rss_peak_*``: growth of the process peak resident set (VmHWM, reset through /proc/self/clear_refs
  before each phase, after ``malloc_trim``) over the resident set at the phase's start. This is what
  the OS saw; allocator caching can hide reuse, so read it as "extra memory this phase touched".
  Where VmHWM cannot be reset it falls back to ``resource.getrusage`` max RSS growth, which only
  shows a phase that raised the whole-process peak (``rss_method`` says which was used).
* ``rss_peak_process``: the whole process's peak resident set (``getrusage``), everything included.

XLA CPU flags: by default ``TUNED_CPU_XLA_FLAGS`` is appended to ``$XLA_FLAGS`` before JAX starts its
backend; ``--xla-flags "..."`` appends those instead (``--xla-flags ""``: XLA's own defaults). A
``--xla_force_host_platform_device_count`` (the test suite's fake devices) is dropped: the benchmark is
for one plain CPU device, and 8 fake devices sharing one thread pool cost ~15% on sd15.
``--attention`` picks ``jaxdiff.models.attention.DEFAULT_IMPLEMENTATION`` for the run ('xla' is
``jax.nn.dot_product_attention``'s einsum path, the pre-optimisation behaviour). ``--profile DIR``
traces one more jaxdiff call and prints where its wall time goes by op kind, and torch.profiler's top
ops for one torch call.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path

GiB = 1024**3
# XLA:CPU flags this benchmark applies unless --xla-flags says otherwise. jaxlib 0.10 hands every
# convolution to YNNPACK by default; its 3x3 convolutions took ~1.45x as long as XLA's Eigen ones on a 2-core
# EPYC (all sd15 3x3 convs at batch 2, timed one by one: 8.7 s vs 5.6-6.2 s; torch 6.9-7.2 s), so they go
# back to Eigen. Dots stay on YNNPACK (Eigen or oneDNN dots were no faster).
from jaxdiff.runtime import CPU_XLA_FLAGS as TUNED_CPU_XLA_FLAGS  # noqa: E402

DTYPES = ("float32", "bfloat16")
TABLE_COLUMNS = (
    "date",
    "benchmark",
    "preset",
    "shape",
    "dtype",
    "jaxdiff s/call",
    "torch s/call",
    "ratio",
    "compile s",
    "peak memory",
    "machine",
    "notes",
)


def log(msg: str):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- memory ---------------------------------------------------------------------------------------


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _maxrss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Phase:
    """Peak resident-set growth over one phase (see the module docstring)."""

    def __init__(self, name: str, record: dict):
        self.name, self.record = name, record

    def __enter__(self):
        _trim()
        self.method = "VmHWM"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self.method = "getrusage"
        self.rss0 = _proc_status("VmRSS") or _maxrss()
        self.max0 = _maxrss()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        if self.method == "VmHWM" and _proc_status("VmHWM") is not None:
            peak = _proc_status("VmHWM") - self.rss0
        else:
            peak = max(0, _maxrss() - self.max0)
        self.record[self.name] = {
            "seconds": self.seconds,
            "rss_start": self.rss0,
            "rss_peak_growth": peak,
            "rss_end": _proc_status("VmRSS"),
            "rss_method": self.method,
        }
        return False


# --- machine --------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_string() -> str:
    return f"{_cpu_model()}, {_cores()} cores"


# --- the UNet benchmark ---------------------------------------------------------------------------


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process), both in USER_HZ."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # all but idle and iowait
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return busy, int(own[11]) + int(own[12])
    except (OSError, ValueError, IndexError):
        return 0, 0


def timed(fn) -> tuple[float, float]:
    """(seconds, other processes' CPU use during the call in cores) -- the second flags a disturbed run."""
    b0, o0 = _cpu_ticks()
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    b1, o1 = _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return dt, max(0.0, ((b1 - b0) - (o1 - o0)) / hz / dt)


def _stats(times: list[float]) -> dict:
    if not times:
        return {}
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "mean": statistics.fmean(times),
        "n": len(times),
        "all": times,
    }


def bench_unet(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.convert import diffusers as conv_lib
    from jaxdiff.models import unet as unet_lib

    cfg = unet_lib.PRESETS[args.preset]
    size = args.size or cfg.sample_size
    down = 2 ** (len(cfg.block_out_channels) - 1)
    if size % down:
        raise SystemExit(
            f"--size {size}: the {args.preset} UNet downsamples {down}x; use a multiple of {down}"
        )
    b, seq = args.batch, 77
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    phases: dict = {}
    result: dict = {
        "benchmark": "unet",
        "preset": args.preset,
        "batch": b,
        "size": size,
        "shape": f"{b}x{size}x{size}x{cfg.in_channels}, ctx {b}x{seq}x{cfg.cross_attention_dim}",
        "dtype": args.dtype,
        "repeats": args.repeats,
        "seed": args.seed,
        "attention": args.attention,
        "torch_device": "-" if args.no_torch else args.torch_device,
        "phases": phases,
    }

    rng = np.random.default_rng(args.seed)
    sample = rng.standard_normal((b, size, size, cfg.in_channels), dtype=np.float32)  # NHWC
    timesteps = rng.integers(0, 1000, size=(b,)).astype(np.float32)
    context = rng.standard_normal((b, seq, cfg.cross_attention_dim), dtype=np.float32)
    added = None
    if cfg.addition_embed_type == "text_time":
        n_ids = 6
        added = {
            "text_embeds": rng.standard_normal(
                (
                    b,
                    cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim,
                ),
                dtype=np.float32,
            ),
            "time_ids": np.tile(
                np.array([[size * 8, size * 8, 0, 0, size * 8, size * 8]], np.float32), (b, 1)
            ),
        }

    # 1. The reference model and its weights, converted by the production converter.
    tmodel = None
    if args.no_torch:
        log(f"random jaxdiff {args.preset} params (seed {args.seed}, no torch)")
        with Phase("init_params", phases):
            params = jax.block_until_ready(_random_params(cfg, jdtype, rng))
    else:
        import torch
        from diffusers import UNet2DConditionModel

        log(f"build diffusers UNet2DConditionModel ({args.preset}, seed {args.seed})")
        with Phase("torch_build", phases):
            torch.manual_seed(args.seed)
            dcfg = {
                k: v
                for k, v in conv_lib.unet_config_to_diffusers(cfg).items()
                if not k.startswith("_")
            }
            tmodel = UNet2DConditionModel.from_config(dcfg).eval()
            tmodel.requires_grad_(False)
            if args.dtype != "float32":
                tmodel = tmodel.to(getattr(torch, args.dtype))
        log("convert its weights with convert.diffusers.params_from_state_dict")
        with Phase("convert", phases):
            state = {
                k: (v.float() if args.dtype == "bfloat16" else v).numpy()
                for k, v in tmodel.state_dict().items()
            }  # views of torch's storage (fp32)
            converted = conv_lib.params_from_state_dict("unet", cfg, state, dtype=jdtype)
            del state
            params = _to_device_draining(converted)  # frees each numpy leaf as it goes
            del converted
            jax.block_until_ready(params)
        tmodel = tmodel.to(args.torch_device)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    result["n_params"] = n_params
    result["params_bytes"] = sum(int(x.nbytes) for x in jax.tree.leaves(params))
    log(f"{n_params / 1e6:.1f}M params, {result['params_bytes'] / GiB:.2f} GiB per copy")

    # 2. jaxdiff: trace + lower + compile + first call, then the compiled executable.
    model = unet_lib.UNet(cfg, dtype=jdtype, param_dtype=jdtype)

    def forward(p, x, t, c, a):
        return model.apply({"params": p}, x, t, c, a)

    jargs = jax.device_put((sample, timesteps, context, added))
    log("jaxdiff: trace, lower, compile, first call")
    with Phase("jax_compile", phases):
        t0 = time.perf_counter()
        lowered = jax.jit(forward).lower(params, *jargs)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        jout = compiled(params, *jargs).block_until_ready()
        t3 = time.perf_counter()
    del lowered
    jx = {
        "compile_s": t3 - t0,
        "trace_lower_s": t1 - t0,
        "xla_compile_s": t2 - t1,
        "first_run_s": t3 - t2,
    }
    try:
        ma = compiled.memory_analysis()
        jx["xla_memory"] = {
            k: int(getattr(ma, k))
            for k in (
                "temp_size_in_bytes",
                "argument_size_in_bytes",
                "output_size_in_bytes",
                "alias_size_in_bytes",
                "generated_code_size_in_bytes",
            )
            if hasattr(ma, k)
        }
    except Exception as e:  # noqa: BLE001 -- not every backend reports it; the run goes on
        jx["xla_memory"] = {"error": repr(e)}
    jout_np = np.asarray(jout, dtype=np.float32)
    del jout
    log(
        f"jaxdiff compile+first call {jx['compile_s']:.2f}s (trace+lower {jx['trace_lower_s']:.2f}s, "
        f"XLA compile {jx['xla_compile_s']:.2f}s, run {jx['first_run_s']:.2f}s)"
    )
    with Phase("jax_call", phases):
        compiled(params, *jargs).block_until_ready()

    def run_jax():
        return timed(lambda: compiled(params, *jargs).block_until_ready())

    # 3. torch: same inputs in NCHW, one warm-up call.
    tx: dict = {}
    run_torch = None
    if tmodel is not None:
        import torch

        tdt = getattr(torch, args.dtype)
        dev = torch.device(args.torch_device)
        tin = (
            torch.from_numpy(np.ascontiguousarray(sample.transpose(0, 3, 1, 2))).to(dev, tdt),
            torch.from_numpy(timesteps).to(dev),
            torch.from_numpy(context).to(dev, tdt),
        )
        tadd = {k: torch.from_numpy(v).to(dev, tdt) for k, v in added.items()} if added else None

        def call_torch():
            with torch.inference_mode():
                out = tmodel(*tin, added_cond_kwargs=tadd, return_dict=False)[0]
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)  # CUDA calls return before the kernels finish
            return out

        log("torch: warm-up call")
        with Phase("torch_warmup", phases):
            t0 = time.perf_counter()
            tout = call_torch()
            tx["warmup_s"] = time.perf_counter() - t0
        tout_np = tout.float().cpu().numpy().transpose(0, 2, 3, 1)
        del tout
        with Phase("torch_call", phases):
            call_torch()

        def run_torch():
            return timed(call_torch)

        diff = np.abs(jout_np - tout_np)
        scale = float(np.max(np.abs(tout_np)))
        result["check"] = {
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "max_abs_torch_output": scale,
            "max_abs_diff_relative": float(diff.max()) / max(scale, 1e-30),
            "finite": bool(np.isfinite(jout_np).all() and np.isfinite(tout_np).all()),
        }
        log(
            f"max |jaxdiff - torch| = {diff.max():.3e} (max |torch out| {scale:.3g}, "
            f"relative {result['check']['max_abs_diff_relative']:.2e})"
        )
        del tout_np, diff
    del jout_np

    # 4. Alternating timed calls.
    log(
        f"timing {args.repeats} calls each" + (", alternating jaxdiff / torch" if run_torch else "")
    )
    load0 = os.getloadavg()
    jt, tt, jo, to = [], [], [], []
    for i in range(args.repeats):
        t, o = run_jax()
        jt.append(t), jo.append(o)
        msg = f"  {i + 1}/{args.repeats}: jaxdiff {t:.3f}s (other procs {o:.2f} cores)"
        if run_torch:
            t, o = run_torch()
            tt.append(t), to.append(o)
            msg += f", torch {t:.3f}s (other procs {o:.2f} cores)"
        log(msg)
    result["loadavg_before_after"] = [list(load0), list(os.getloadavg())]
    jx["time_s"] = _stats(jt)
    jx["other_cpu_cores"] = jo
    result["jaxdiff"] = jx
    if run_torch:
        tx["time_s"] = _stats(tt)
        tx["other_cpu_cores"] = to
        result["torch"] = tx
        result["ratio"] = jx["time_s"]["median"] / tx["time_s"]["median"]
        # each jaxdiff call over the torch call right after it: robust to the machine drifting
        pairs = [a / b for a, b in zip(jt, tt)]
        result["ratio_pairs"] = pairs
        result["ratio_pairs_median"] = statistics.median(pairs)
    result["rss_peak_process"] = _maxrss()
    if args.profile:
        log(f"profiling one jaxdiff call into {args.profile}")
        result["profile"] = {"jaxdiff": profile_jax(compiled, (params, *jargs), Path(args.profile))}
        if run_torch:
            result["profile"]["torch"] = profile_torch(call_torch)
    return result  # the models, params and executables go with this frame


# --- profiles -------------------------------------------------------------------------------------


def _category(op: str | None) -> str:
    """A UNet op's kind, from the HLO op_name metadata (the Flax module path)."""
    import re

    if op is None:
        return "other"
    if "conv_general_dilated" in op:
        return "convolution"
    if re.search(r"/attn[12]/", op) and not re.search(r"/to_(q|k|v|out_0)/", op):
        return "self-attention core" if "/attn1/" in op else "cross-attention core"
    if re.search(r"/to_(q|k|v|out_0)/", op):
        return "attention q/k/v/out projections"
    if "/ff/" in op:
        return "feed-forward (GEGLU)"
    if re.search(r"(norm\d?|conv_norm_out)/", op):
        return "group/layer norm"
    if "dot_general" in op:
        return "other dense"
    return "other elementwise / copies"


def profile_jax(compiled, args, logdir: Path, top: int = 12) -> dict:
    """Trace one call; split its wall time among op kinds (time shared by concurrently running ops
    is split between them). XLA:CPU's Eigen convolutions run asynchronously and leave no trace
    events, so with them the time when no traced op runs is reported as 'untraced: Eigen
    convolutions + gaps'."""
    import collections
    import re

    import jax
    from jax.profiler import ProfileData

    logdir.mkdir(parents=True, exist_ok=True)
    meta = {}
    for line in compiled.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"", line)
        if m:
            meta[m.group(1)] = m.group(2)
    before = set(logdir.rglob("*.xplane.pb"))
    with jax.profiler.trace(str(logdir)):
        compiled(*args).block_until_ready()
    new = sorted(set(logdir.rglob("*.xplane.pb")) - before)
    if not new:
        return {"error": "no trace written"}
    data = ProfileData.from_file(str(new[-1]))
    events, span = [], None
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name == "ThunkExecutor::Execute (wait for completion)":
                    span = (ev.start_ns, ev.start_ns + ev.duration_ns)
                elif line.name.startswith("tf_XLAEigen") and not ev.name.startswith(
                    ("ThunkExecutor", "SlinkyThreadPool", "end:", "while")
                ):
                    events.append(
                        (ev.start_ns, ev.start_ns + ev.duration_ns, _category(meta.get(ev.name)))
                    )
    if span is None:
        return {"error": "no executor span in the trace"}
    idle = "untraced: Eigen convolutions + gaps"
    points = sorted(
        [(s, 0, i) for i, (s, e, c) in enumerate(events)]
        + [(e, 1, i) for i, (s, e, c) in enumerate(events)]
    )
    active, last, share = set(), span[0], collections.Counter()
    for t, end, i in points:
        t = min(max(t, span[0]), span[1])
        for j in active:
            share[events[j][2]] += (t - last) / len(active)
        if not active:
            share[idle] += t - last
        last = t
        (active.discard if end else active.add)(i)
    share[idle] += span[1] - last
    wall = (span[1] - span[0]) / 1e9
    out = {
        "wall_s": wall,
        "seconds": {k: v / 1e9 for k, v in share.most_common(top)},
        "trace_dir": str(logdir),
    }
    print(f"\njaxdiff profile: one traced call {wall * 1e3:.1f} ms")
    for k, v in out["seconds"].items():
        print(f"  {v * 1e3:9.1f} ms {100 * v / wall:5.1f}%  {k}")
    return out


def profile_torch(call, top: int = 8) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    out = {e.key: e.self_cpu_time_total / 1e6 for e in rows}
    print("torch profile: one call, top ops by self CPU time")
    for k, v in out.items():
        print(f"  {v * 1e3:9.1f} ms  {k}")
    return out


def _random_params(cfg, dtype, rng):
    """Seeded random params of the right shapes without compiling ``init``: kernels ~ N(0, 1/fan_in),
    norm scales 1, biases 0 (the timing does not depend on the values, only on their being finite)."""
    import jax
    import numpy as np
    from flax import linen as nn
    from flax import traverse_util

    from jaxdiff.convert import diffusers as conv_lib

    flat = traverse_util.flatten_dict(nn.unbox(conv_lib.abstract_params("unet", cfg)))
    out = {}
    for path, leaf in flat.items():
        shape = tuple(leaf.shape)
        if path[-1] == "kernel":
            v = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(np.prod(shape[:-1]))
        elif path[-1] == "scale":
            v = np.ones(shape, np.float32)
        else:
            v = np.zeros(shape, np.float32)
        out[path] = jax.device_put(v.astype(dtype))
    return traverse_util.unflatten_dict(out)


def _to_device_draining(tree):
    """device_put a nested dict of numpy arrays leaf by leaf, dropping each numpy leaf once placed."""
    import jax

    out = {}
    for k in list(tree):
        v = tree.pop(k)
        out[k] = _to_device_draining(v) if isinstance(v, dict) else jax.device_put(v)
        del v
    return out


# --- reporting ------------------------------------------------------------------------------------


def _gib(n) -> str:
    return f"{n / GiB:.2f}" if n is not None else "-"


def environment() -> dict:
    import jax
    import jaxlib

    env = {
        "machine": machine_string(),
        "cores": _cores(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_default_matmul_precision": str(
            getattr(jax.config, "jax_default_matmul_precision", None)
        ),
        "xla_cpu_threads": _cores(),  # XLA:CPU's intra-op pool uses one thread per available core
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        import torch

        env.update(
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
            torch_interop_threads=torch.get_num_interop_threads(),
            torch_mkldnn=bool(torch.backends.mkldnn.is_available()),
        )
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return env


def peak_memory_cell(r: dict) -> str:
    """The table's memory column: XLA temporaries and RSS growth of one call, per side."""
    ph = r["phases"]
    xla = r["jaxdiff"].get("xla_memory", {}).get("temp_size_in_bytes")
    parts = [f"params {_gib(r['params_bytes'])}"]
    if xla is not None:
        parts.append(f"jax temp {_gib(xla)}")
    if "jax_compile" in ph:
        parts.append(f"jax compile+call +{_gib(ph['jax_compile']['rss_peak_growth'])}")
    if "torch_warmup" in ph:
        parts.append(f"torch call +{_gib(ph['torch_warmup']['rss_peak_growth'])}")
    parts.append(f"process {_gib(r['rss_peak_process'])}")
    return "; ".join(parts) + " GiB"


def table_row(r: dict) -> dict:
    jt = r["jaxdiff"]["time_s"]
    tt = r.get("torch", {}).get("time_s")
    spread = lambda s: f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"
    return {
        "date": r["date"],
        "benchmark": r["benchmark"],
        "preset": r["preset"],
        "shape": f"{r['batch']}x{r['size']}x{r['size']}",
        "dtype": r["dtype"],
        "jaxdiff s/call": spread(jt),
        "torch s/call": spread(tt) if tt else "-",
        "ratio": (
            f"{r['ratio']:.2f} (pairs {r['ratio_pairs_median']:.2f})" if "ratio" in r else "-"
        ),
        "compile s": f"{r['jaxdiff']['compile_s']:.1f}",
        "peak memory": peak_memory_cell(r),
        "machine": _machine_cell(r),
        "notes": r.get("note") or _auto_note(r),
    }


def _machine_cell(r: dict) -> str:
    env = r["env"]
    if env.get("platform", "cpu") == "cpu" and r.get("torch_device", "cpu") in ("cpu", "-"):
        return env["machine"]
    return f"jax on {env.get('device_kind', env.get('device'))}, torch on {r.get('torch_device', 'cpu')}"


def _auto_note(r: dict) -> str:
    flags = r["env"]["xla_flags"]
    return f"attention={r.get('attention', 'auto')}; XLA_FLAGS={flags or '(none)'}"


def update_markdown(path: Path, row: dict, columns=TABLE_COLUMNS):
    """Append the row to BENCHMARKS.md's table, replacing a row of the same day, benchmark, preset,
    shape, dtype, machine and notes."""
    header = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    line = "| " + " | ".join(str(row[c]).replace("|", "/") for c in columns) + " |"
    key_cols = tuple(
        c
        for c in ("date", "benchmark", "preset", "shape", "dtype", "devices", "machine", "notes")
        if c in columns
    )
    key = tuple(row[c] for c in key_cols)
    if path.exists():
        lines = path.read_text().splitlines()
    else:
        lines = [
            "# Benchmarks",
            "",
            "Written by `python benchmarks/bench.py` (see its docstring for what each number measures).",
            "Times are the median seconds per call over the repeats, (min-max) in brackets; ratio is the",
            "jaxdiff / torch medians (below 1: jaxdiff is faster), 'pairs' the median of back-to-back",
            "call ratios. Both sides run the same converted weights in one process. Peak memory:",
            "params = one copy of the weights; jax temp = XLA's buffer assignment for one call's",
            "temporaries; `+` = peak resident-set growth during the first jaxdiff call (compile",
            "included) and torch's warm-up call; process = the whole process's peak resident set",
            "(torch model, jax params and everything else).",
            "",
        ]
    try:
        start = lines.index(header)
    except ValueError:
        lines += ["", header, sep] if lines and lines[-1] else [header, sep]
        start = len(lines) - 2
    end = start + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    rows = lines[start + 2 : end]
    for i, old in enumerate(rows):
        cells = [c.strip() for c in old.strip().strip("|").split("|")]
        if len(cells) == len(columns) and tuple(cells[columns.index(c)] for c in key_cols) == tuple(
            str(k) for k in key
        ):
            rows[i] = line
            break
    else:
        rows.append(line)
    lines[start + 2 : end] = rows
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines).rstrip("\n") + "\n")
    os.replace(tmp, path)


def print_summary(r: dict):
    jt = r["jaxdiff"]["time_s"]
    rows = [
        (
            "jaxdiff s/call (median, min-max)",
            f"{jt['median']:.3f}  ({jt['min']:.3f}-{jt['max']:.3f})",
        )
    ]
    if "torch" in r:
        tt = r["torch"]["time_s"]
        rows += [
            (
                "torch s/call (median, min-max)",
                f"{tt['median']:.3f}  ({tt['min']:.3f}-{tt['max']:.3f})",
            ),
            ("ratio jaxdiff/torch (medians)", f"{r['ratio']:.3f}"),
            (
                "ratio, median of back-to-back pairs",
                (
                    f"{r['ratio_pairs_median']:.3f}  "
                    f"({min(r['ratio_pairs']):.3f}-{max(r['ratio_pairs']):.3f})"
                ),
            ),
            (
                "max |jaxdiff - torch|",
                (
                    f"{r['check']['max_abs_diff']:.3e}  (relative to max |out| "
                    f"{r['check']['max_abs_diff_relative']:.2e})"
                ),
            ),
        ]
    jx = r["jaxdiff"]
    rows += [
        (
            "jaxdiff compile + first call s",
            f"{jx['compile_s']:.2f}  (XLA compile {jx['xla_compile_s']:.2f})",
        ),
        ("params GiB", _gib(r["params_bytes"])),
    ]
    xm = jx.get("xla_memory", {})
    if "temp_size_in_bytes" in xm:
        rows.append(("jaxdiff XLA temporaries GiB", _gib(xm["temp_size_in_bytes"])))
    for name, label in (
        ("jax_compile", "jaxdiff compile+1st call RSS peak +GiB"),
        ("jax_call", "jaxdiff call RSS peak +GiB"),
        ("torch_warmup", "torch warm-up call RSS peak +GiB"),
        ("torch_call", "torch call RSS peak +GiB"),
    ):
        if name in r["phases"]:
            rows.append((label, _gib(r["phases"][name]["rss_peak_growth"])))
    rows.append(("process peak RSS GiB", _gib(r["rss_peak_process"])))
    w = max(len(a) for a, _ in rows)
    print(
        f"\nunet {r['preset']}  {r['shape']}  {r['dtype']}  on {r['env']['machine']}; "
        f"attention={r['attention']}, XLA_FLAGS={r['env']['xla_flags']!r}"
    )
    for a, v in rows:
        print(f"  {a:<{w}}  {v}")


# --- command line ---------------------------------------------------------------------------------


def _presets():
    # Importing jaxdiff.models.unet pulls in jax but does not start a backend: XLA_FLAGS can still be set.
    from jaxdiff.models.unet import PRESETS

    return PRESETS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/bench.py", description=__doc__.split("\n\n")[0]
    )
    sub = p.add_subparsers(dest="benchmark", required=True)
    u = sub.add_parser(
        "unet", help="jaxdiff UNet vs diffusers' UNet2DConditionModel (same weights)"
    )
    u.add_argument("--preset", default="sd15", help="a jaxdiff.models.unet.PRESETS name")
    u.add_argument("--batch", type=int, default=2)
    u.add_argument(
        "--size", type=int, default=None, help="latent height = width (default: the preset's)"
    )
    u.add_argument("--repeats", type=int, default=5)
    u.add_argument("--dtype", default="float32", choices=DTYPES)
    u.add_argument("--seed", type=int, default=0)
    u.add_argument(
        "--no-torch", action="store_true", help="time jaxdiff alone (random jax init weights)"
    )
    u.add_argument(
        "--torch-device",
        default="cpu",
        help="where the PyTorch model runs: cpu (default) or cuda "
        "(on a GPU machine, beside jaxdiff on JAX's default device)",
    )
    u.add_argument(
        "--out", default=None, help="JSON file (default benchmarks/results/unet_<preset>.json)"
    )
    u.add_argument("--markdown", default="BENCHMARKS.md", help="table to update ('' to skip)")
    u.add_argument(
        "--xla-flags",
        default=None,
        help="appended to $XLA_FLAGS before the backend starts (default: TUNED_CPU_XLA_FLAGS, "
        f"i.e. {TUNED_CPU_XLA_FLAGS!r}; pass '' for XLA's own defaults)",
    )
    u.add_argument(
        "--attention",
        default="auto",
        choices=("auto", "xla", "cpu_blocked"),
        help="jaxdiff.models.attention.DEFAULT_IMPLEMENTATION for this run (auto: per platform)",
    )
    u.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="also trace one jaxdiff call with jax.profiler into DIR and print where its wall "
        "time goes, and torch.profiler's top ops for one torch call",
    )
    u.add_argument("--note", default="", help="free text for the table's notes column")
    import bench_pipeline
    import bench_train

    bench_pipeline.add_parser(sub)
    bench_train.add_parser(sub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    presets = _presets()
    if args.benchmark == "unet" and args.preset not in presets:
        raise SystemExit(
            f"unknown preset {args.preset!r}: choose one of {', '.join(sorted(presets))}"
        )
    if args.repeats < 1 or getattr(args, "batch", 1) < 1:
        raise SystemExit("--repeats and --batch must be at least 1")
    flags = TUNED_CPU_XLA_FLAGS if args.xla_flags is None else args.xla_flags
    if flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    forced = re.search(
        r"--xla_force_host_platform_device_count=\S*", os.environ.get("XLA_FLAGS", "")
    )
    if forced:  # e.g. the Makefile's test setting: 8 fake devices on one thread pool cost ~15% here
        os.environ["XLA_FLAGS"] = os.environ["XLA_FLAGS"].replace(forced.group(0), "").strip()
        log(f"dropped {forced.group(0)} from XLA_FLAGS: the benchmark runs on one plain CPU device")
    from jaxdiff.models import attention

    attention.DEFAULT_IMPLEMENTATION = (
        None if getattr(args, "attention", "auto") == "auto" else args.attention
    )
    if args.benchmark == "train":  # compares 1 and N devices of one process: N fake CPU devices
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_force_host_platform_device_count="
            + str(max(int(d) for d in args.devices.split(",")))
        ).strip()
    env = environment()  # starts the JAX backend
    log(
        f"{env['machine']}; jax {env['jax']} on {env['device']}, XLA_FLAGS={env['xla_flags']!r}"
        + (f"; torch {env['torch']} with {env['torch_threads']} threads" if "torch" in env else "")
    )
    started = _dt.datetime.now()
    if args.benchmark == "train":
        import bench_train

        r = bench_train.bench_train(args)
    elif args.benchmark == "txt2img":
        import bench_pipeline

        r = bench_pipeline.bench_txt2img(args)
    else:
        r = bench_unet(args)
    _trim()
    r.update(
        env=env,
        date=started.strftime("%Y-%m-%d"),
        started=started.isoformat(timespec="seconds"),
        note=args.note,
        command="python benchmarks/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    out = Path(args.out or f"benchmarks/results/{args.benchmark}_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    if args.benchmark == "train":
        if args.markdown:
            for row in bench_train.table_rows(r):
                update_markdown(Path(args.markdown), row, bench_train.COLUMNS)
        print(
            json.dumps(
                [
                    {k: x[k] for k in ("devices", "examples_per_s", "compile_s", "flops_per_step")}
                    for x in r["runs"]
                ],
                indent=1,
            )
        )
    elif args.benchmark == "txt2img":
        if args.markdown:
            update_markdown(
                Path(args.markdown), bench_pipeline.table_row(r), bench_pipeline.COLUMNS
            )
        print(
            json.dumps(
                {k: r[k] for k in ("jaxdiff", "torch", "ratio", "check") if k in r},
                indent=1,
                default=str,
            )
        )
    else:
        if args.markdown:
            update_markdown(Path(args.markdown), table_row(r))
        print_summary(r)
    log(f"wrote {out}" + (f" and updated {args.markdown}" if args.markdown else ""))
    return r


if __name__ == "__main__":
    main()
