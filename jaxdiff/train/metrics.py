"""Observability: TensorBoard scalars and image grids, a progress bar, the run's config and versions.

Every process may call `MetricWriter`; only the main one (`is_main`) writes files or prints, so a
multi-host loop needs no `if process_index == 0` around it.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "grain",
    "tensorflow-datasets",
    "transformers",
    "tensorboardX",
    "jaxdiff",
)


def image_grid(images, columns: int | None = None, gap: int = 2) -> np.ndarray:
    """Tiles [N, H, W, 3] images (float in [0, 1] or uint8) into one uint8 image, black gaps between.

    `columns` defaults to ceil(sqrt(N)) (near square); rows = ceil(N / columns). The grid is
    [rows * H + (rows - 1) * gap, columns * W + (columns - 1) * gap, 3], with no outer border.
    """
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] == 0:
        raise ValueError(f"images must be [N, H, W, 3] with N >= 1, got shape {x.shape}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"images must be float in [0, 1] or uint8, got dtype {x.dtype}")
        # NaN (a diverged model's samples) shows as black rather than breaking the writer.
        x = np.round(np.clip(np.nan_to_num(x.astype(np.float32)), 0.0, 1.0) * 255.0).astype(
            np.uint8
        )
    n, h, w, _ = x.shape
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    cols = min(columns or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = x[i]
    return grid


class _Progress:
    """Smoothed steps/s and examples/s from wall time between updates, shown as a bar or as lines.

    The first update only starts the clock, so compilation does not drag the rates down. Rates are
    ratios of exponential moving averages of the step, example and time increments (as tqdm does).
    """

    def __init__(
        self,
        total: int | None,
        stream: TextIO,
        clock: Callable[[], float],
        log_every_s: float,
        smoothing: float = 0.3,
    ):
        self.total, self.stream, self.clock = total, stream, clock
        self.log_every_s, self.alpha = log_every_s, smoothing
        self.last: tuple[int, float] | None = None  # (step, time) of the previous update
        self.avg: tuple[float, float, float] | None = None  # EMA of (d_steps, d_examples, d_time)
        self.loss: float | None = None
        self.step = 0
        self.printed_at: float | None = None
        self.printed_step: int | None = None
        self.bar = None
        if _isatty(stream):
            fmt = (
                "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}]{postfix}"
                if total
                else "{n_fmt} steps [{elapsed}]{postfix}"
            )
            self.bar = tqdm(total=total, file=stream, bar_format=fmt, dynamic_ncols=True)

    @property
    def rates(self) -> tuple[float | None, float | None]:
        """(steps/s, examples/s); None before two updates."""
        if self.avg is None or self.avg[2] <= 0:
            return None, None
        ds, de, dt = self.avg
        return ds / dt, de / dt

    def update(self, step: int, loss: float | None, examples: int | None) -> None:
        now = self.clock()
        if self.last is not None:
            ds, dt = step - self.last[0], now - self.last[1]
            new = (ds, ds * (examples or 0), dt)
            a = self.alpha
            self.avg = (
                new
                if self.avg is None
                else tuple(a * x + (1 - a) * m for x, m in zip(new, self.avg))
            )
        self.last, self.step = (step, now), step
        if loss is not None:
            self.loss = float(loss)
        if self.bar is not None:
            self.bar.n = step  # absolute: a resumed run starts mid-bar
            self.bar.set_postfix_str(self.summary(with_step=False), refresh=False)
            self.bar.update(0)  # redraws at most every tqdm mininterval
        elif (
            self.printed_at is None
            or now - self.printed_at >= self.log_every_s
            or step == self.total
        ):
            self.print_line(now)

    def print_line(self, now: float) -> None:
        print(self.summary(with_step=True), file=self.stream, flush=True)
        self.printed_at, self.printed_step = now, self.step

    def summary(self, with_step: bool) -> str:
        parts = []
        if with_step:
            pct = f" ({100 * self.step / self.total:.0f}%)" if self.total else ""
            parts.append(f"step {self.step}" + (f"/{self.total}" if self.total else "") + pct)
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        steps_s, examples_s = self.rates
        if steps_s is not None:
            parts.append(f"{steps_s:.3g} steps/s")
            if examples_s:
                parts.append(f"{examples_s:.4g} examples/s")
            if self.total and steps_s > 0:
                eta = int(max(self.total - self.step, 0) / steps_s)
                parts.append(f"eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
        return ", ".join(parts)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()
        elif self.last is not None and self.printed_step != self.step:
            self.print_line(self.clock())


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class MetricWriter:
    """TensorBoard event files (`workdir/tensorboard/`), PNG sample grids (`workdir/samples/`) and console.

    `update_progress(step, loss=, examples=)` takes `examples` as the examples per step (the global
    batch); steps/s and examples/s come from the wall time between calls. `clock`, `stream` and
    `log_every_s` (the line interval when `stream` is not a TTY) exist for tests and logs.
    """

    def __init__(
        self,
        workdir,
        *,
        is_main: bool = True,
        total_steps: int | None = None,
        console: bool = True,
        tensorboard: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_every_s: float = 10.0,
    ):
        self.workdir, self.is_main, self.closed = Path(workdir), is_main, False
        self._tb = self._progress = None
        if not is_main:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            self._tb = _summary_writer(self.workdir / "tensorboard")
        if console:
            self._progress = _Progress(total_steps, stream or sys.stdout, clock, log_every_s)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One TensorBoard scalar per key, and one console line."""
        if not self._live():
            return
        values = {k: float(v) for k, v in scalars.items()}
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, global_step=int(step))
        if self._progress is not None:
            self._progress.write(
                f"step {int(step)}: " + ", ".join(f"{k}={v:.6g}" for k, v in values.items())
            )

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Each [N, H, W, 3] batch as one grid: a TensorBoard image and `samples/step_{step:08d}_{name}.png`."""
        if not self._live():
            return
        grids = {name: image_grid(x) for name, x in images.items()}  # validate all before writing

        samples = self.workdir / "samples"
        samples.mkdir(exist_ok=True)
        for name, grid in grids.items():
            if self._tb is not None:
                self._tb.add_image(name, grid, global_step=int(step), dataformats="HWC")
            buf = io.BytesIO()
            Image.fromarray(grid).save(buf, format="PNG")
            _atomic_write(samples / f"step_{int(step):08d}_{_file_safe(name)}.png", buf.getvalue())

    def log(self, message: str) -> None:
        """A console line that does not break the progress bar."""
        if self._live() and self._progress is not None:
            self._progress.write(message)

    def update_progress(
        self, step: int, *, loss: float | None = None, examples: int | None = None
    ) -> None:
        """Moves the progress bar to `step`; `examples` is the examples per step (global batch)."""
        if self._live() and self._progress is not None:
            self._progress.update(int(step), loss, examples)

    @property
    def rates(self) -> tuple[float | None, float | None]:
        """Smoothed (steps/s, examples/s), None until two progress updates (or off this process)."""
        return self._progress.rates if self._progress is not None else (None, None)

    def flush(self) -> None:
        if self._tb is not None and not self.closed:
            self._tb.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._progress is not None:
            self._progress.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _live(self) -> bool:
        if self.closed:
            raise RuntimeError(f"MetricWriter for {self.workdir} is closed")
        return self.is_main


def _summary_writer(logdir: Path):
    # tensorboardX imports torch (if installed) only to accept torch tensors; we pass numpy, and a
    # JAX training process should not pay for (or load a second CUDA runtime with) torch.
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415 (with torch hidden)
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(logdir=str(logdir), flush_secs=30)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "image"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- run info -------------------------------------------------------------------------------


def write_run_info(workdir, config, *, extra: Mapping | None = None, is_main: bool = True) -> None:
    """Writes `config.json` (the resolved config) and `versions.json` (software, devices, git commit).

    A different earlier file is kept as `config.{n}.json` / `versions.{n}.json` (n = 1, 2, ...,
    oldest first), so a resumed or reused run folder never loses a previous run's record.
    """
    if not is_main:
        return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        config = config.to_dict()
    _write_json_keeping_old(workdir / "config.json", json_safe(config))
    info = versions()
    if extra is not None:
        info["extra"] = json_safe(extra)
    _write_json_keeping_old(workdir / "versions.json", info)


def versions() -> dict:
    """Package versions (None when not installed), platform, devices, processes, git commit."""

    packages = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    devices = jax.devices()
    commit, dirty = _git_commit()
    return {
        "packages": packages,
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def _git_commit() -> tuple[str | None, bool | None]:
    """(HEAD, has uncommitted changes) of the checkout holding this jaxdiff, or (None, None)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args):
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        # An installed jaxdiff may sit inside some other repository: only our own checkout counts.
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None, None
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def json_safe(x):
    """`x` as JSON data: tuples -> lists, numpy/JAX scalars and arrays -> numbers/lists, dtypes -> names."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)  # strict JSON has no NaN / Infinity
    if isinstance(x, Mapping):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted((json_safe(v) for v in x), key=repr)
    if isinstance(x, np.dtype):
        return x.name
    if isinstance(x, np.generic):
        return json_safe(x.item())
    if hasattr(x, "__array__") and hasattr(x, "shape") and not isinstance(x, type):
        return json_safe(np.asarray(x).tolist())  # numpy and jax arrays
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, enum.Enum):
        return x.name
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: json_safe(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if (isinstance(x, type) and issubclass(x, np.generic)) or isinstance(
        getattr(x, "dtype", None), np.dtype
    ):
        return np.dtype(x).name  # scalar types: np.float32, jnp.float32, jnp.bfloat16
    if callable(x) and hasattr(x, "__qualname__"):
        return f"{getattr(x, '__module__', '')}.{x.__qualname__}"
    return str(x)


def _write_json_keeping_old(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    if path.exists():
        old = path.read_bytes()
        try:
            same = json.loads(old) == obj
        except ValueError:
            same = False
        if same:
            return
        taken = [
            int(m.group(1))
            for p in path.parent.glob(f"{path.stem}.*{path.suffix}")
            if (
                m := re.fullmatch(rf"{re.escape(path.stem)}\.(\d+){re.escape(path.suffix)}", p.name)
            )
        ]
        # Copy, then replace: at every moment both records exist on disk.
        _atomic_write(path.with_name(f"{path.stem}.{max(taken, default=0) + 1}{path.suffix}"), old)
    _atomic_write(path, text.encode())
