"""MetricWriter, image_grid and write_run_info: event files read back, PNGs, rates from a fake clock."""

import io
import json
import struct
import sys

import numpy as np
import pytest
from PIL import Image

from jaxdiff.train.metrics import MetricWriter, image_grid, write_run_info


def read_events(logdir):
    """Every Event in the TFRecord files under `logdir`, checking the framing and both CRCs."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked(data):
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    events = []
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    for path in files:
        buf, pos = path.read_bytes(), 0
        while pos < len(buf):
            header = buf[pos : pos + 8]
            (n,) = struct.unpack("<Q", header)
            (len_crc,) = struct.unpack("<I", buf[pos + 8 : pos + 12])
            data = buf[pos + 12 : pos + 12 + n]
            (data_crc,) = struct.unpack("<I", buf[pos + 12 + n : pos + 16 + n])
            assert len_crc == masked(header) and data_crc == masked(data)
            events.append(Event.FromString(data))
            pos += 16 + n
    return events


def summaries(events):
    """[(step, tag, value)] for every summary value."""
    return [(e.step, v.tag, v) for e in events if e.HasField("summary") for v in e.summary.value]


def test_scalars_and_images_round_trip(tmp_path):
    torch_before = "torch" in sys.modules
    rng = np.random.default_rng(0)
    floats = rng.random((5, 6, 7, 3)).astype(np.float32)  # 3 x 2 tiles
    with MetricWriter(tmp_path, total_steps=10, stream=io.StringIO()) as w:
        w.write_scalars(1, {"loss": 0.5, "lr": np.float32(1e-4)})
        w.write_scalars(2, {"loss": 0.25})
        w.write_images(2, {"samples/cfg": floats, "uint8": (floats[:1] * 255).astype(np.uint8)})
    assert torch_before or "torch" not in sys.modules  # the writer does not drag torch in

    values = summaries(read_events(tmp_path / "tensorboard"))
    scalars = {(s, t): v.simple_value for s, t, v in values if v.HasField("simple_value")}
    assert scalars == {(1, "loss"): 0.5, (1, "lr"): pytest.approx(1e-4), (2, "loss"): 0.25}
    images = {t: v.image for s, t, v in values if v.HasField("image") and s == 2}
    assert set(images) == {"samples/cfg", "uint8"}
    grid = image_grid(floats)
    assert (images["samples/cfg"].height, images["samples/cfg"].width) == (2 * 6 + 2, 3 * 7 + 2 * 2)
    assert (images["uint8"].height, images["uint8"].width) == (6, 7)
    decoded = np.asarray(
        Image.open(io.BytesIO(images["samples/cfg"].encoded_image_string)).convert("RGB")
    )
    np.testing.assert_array_equal(decoded, grid)

    png = tmp_path / "samples" / "step_00000002_samples_cfg.png"
    np.testing.assert_array_equal(np.asarray(Image.open(png)), grid)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step_00000002_samples_cfg.png",
        "step_00000002_uint8.png",
    ]  # no temporary files left


def test_non_main_process_writes_and_prints_nothing(tmp_path):
    out = io.StringIO()
    w = MetricWriter(tmp_path / "run", is_main=False, total_steps=5, stream=out)
    w.write_scalars(1, {"loss": 1.0})
    w.write_images(1, {"x": np.zeros((1, 4, 4, 3), np.uint8)})
    w.update_progress(1, loss=1.0, examples=8)
    w.log("hello")
    w.flush()
    w.close()
    write_run_info(tmp_path / "run", {"a": 1}, is_main=False)
    assert not (tmp_path / "run").exists() and out.getvalue() == ""
    assert w.rates == (None, None)


def test_bad_images_are_rejected_with_their_shape(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False, console=False) as w:
        with pytest.raises(ValueError, match=r"\[N, H, W, 3\].*\(4, 4, 3\)"):
            w.write_images(0, {"x": np.zeros((4, 4, 3))})
        with pytest.raises(ValueError, match="dtype int32"):
            image_grid(np.zeros((1, 2, 2, 3), np.int32))
    assert not (tmp_path / "samples").exists() or not any((tmp_path / "samples").iterdir())
    with pytest.raises(RuntimeError, match="closed"):
        w.write_scalars(1, {"loss": 1.0})


@pytest.mark.parametrize(
    "n, columns, rows, cols",
    [
        (1, None, 1, 1),
        (4, None, 2, 2),
        (5, None, 2, 3),
        (10, None, 3, 4),
        (3, 1, 3, 1),
        (3, 8, 1, 3),
    ],
)
def test_grid_geometry(n, columns, rows, cols):
    h, w, gap = 3, 5, 2
    tiles = np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, h, w, 3), np.uint8
    )
    grid = image_grid(tiles, columns=columns, gap=gap)
    assert grid.dtype == np.uint8 and grid.shape == (
        rows * h + (rows - 1) * gap,
        cols * w + (cols - 1) * gap,
        3,
    )
    expected = np.zeros_like(grid)  # black gaps; tile i at row i // cols, column i % cols
    for i in range(n):
        r, c = divmod(i, cols)
        expected[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = i + 1
    np.testing.assert_array_equal(grid, expected)


def test_grid_float_conversion():
    x = np.array([0.0, 0.5, 1.0, 2.0, -1.0, np.nan], np.float32).reshape(1, 1, 6, 1).repeat(3, -1)
    np.testing.assert_array_equal(image_grid(x)[0, :, 0], [0, 128, 255, 255, 0, 0])


def test_write_run_info_and_rotation(tmp_path):
    import jax
    import jax.numpy as jnp
    import ml_collections

    cfg = ml_collections.ConfigDict(
        {
            "model": {"channels": (32, 64), "dtype": jnp.bfloat16},
            "lr": np.float32(0.5),
            "steps": np.int64(7),
            "name": "tiny",
        }
    )
    write_run_info(tmp_path, cfg, extra={"mesh": (2, 4)})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {
        "model": {"channels": [32, 64], "dtype": "bfloat16"},
        "lr": 0.5,
        "steps": 7,
        "name": "tiny",
    }
    info = json.loads((tmp_path / "versions.json").read_text())
    assert (
        info["packages"]["jax"] == jax.__version__ and info["packages"]["numpy"] == np.__version__
    )
    assert set(info["packages"]) >= {
        "python",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorflow-datasets",
        "transformers",
        "jaxdiff",
    }
    assert info["device_count"] == jax.device_count() and info["process_count"] == 1
    assert info["device_kind"] == jax.devices()[0].device_kind and info["extra"] == {"mesh": [2, 4]}
    assert info["git_commit"] is None or len(info["git_commit"]) == 40

    write_run_info(tmp_path, cfg, extra={"mesh": (2, 4)})  # same content: nothing rotated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "versions.json"]
    write_run_info(tmp_path, {"lr": 0.1})
    write_run_info(tmp_path, {"lr": 0.2})
    assert json.loads((tmp_path / "config.1.json").read_text()) == config
    assert json.loads((tmp_path / "config.2.json").read_text()) == {"lr": 0.1}
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 0.2}
    assert json.loads((tmp_path / "versions.1.json").read_text())["extra"] == {"mesh": [2, 4]}
    assert not list(tmp_path.glob(".*"))  # no temporary files left


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_rates_from_injected_clock(tmp_path):
    clock, out = FakeClock(), io.StringIO()  # StringIO is not a TTY: compact lines, no bar
    w = MetricWriter(
        tmp_path, total_steps=100, tensorboard=False, stream=out, clock=clock, log_every_s=5
    )
    w.update_progress(0, loss=2.0, examples=32)  # starts the clock (step 0 included compilation)
    assert w.rates == (None, None)
    clock.t = 101.0
    w.update_progress(10, loss=1.5, examples=32)  # 10 steps in 1 s
    assert w.rates == pytest.approx((10.0, 320.0))
    clock.t = 103.0
    w.update_progress(20, loss=1.25, examples=32)  # 10 steps in 2 s; EMA(0.3) of increments
    steps_s = (0.3 * 10 + 0.7 * 10) / (0.3 * 2 + 0.7 * 1)
    assert w.rates == pytest.approx((steps_s, 32 * steps_s))
    clock.t = 106.0
    w.update_progress(30, loss=1.0, examples=32)  # 6 s since the last line: prints
    w.write_scalars(30, {"loss": 1.0})
    w.log("saved step 30")
    w.close()
    lines = out.getvalue().splitlines()
    ema_steps, ema_t = 0.3 * 10 + 0.7 * 10, 0.3 * 3 + 0.7 * 1.3
    rate = ema_steps / ema_t
    eta = int(70 / rate)
    assert lines == [
        "step 0/100 (0%), loss 2",
        f"step 30/100 (30%), loss 1, {rate:.3g} steps/s, {32 * rate:.4g} examples/s, eta 0:{eta // 60:02d}:{eta % 60:02d}",
        "step 30: loss=1",
        "saved step 30",
    ]


def test_progress_bar_on_a_tty(tmp_path):
    class TTY(io.StringIO):
        def isatty(self):
            return True

    clock, out = FakeClock(), TTY()
    with MetricWriter(tmp_path, total_steps=50, tensorboard=False, stream=out, clock=clock) as w:
        w.update_progress(10, loss=0.5, examples=4)
        clock.t += 2.0
        w.update_progress(20, loss=0.25, examples=4)
    text = out.getvalue()
    assert (
        "20/50" in text and "loss 0.25" in text and "5 steps/s" in text and "20 examples/s" in text
    )
