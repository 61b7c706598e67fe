"""Input pipeline throughput (examples/s) on this machine, decode to tokenised host batch.

    python benchmarks/throughput.py --source folder:DIR --resolution 64 --batch 64 --steps 50
    python benchmarks/throughput.py --source shapes_world:DATA_DIR --steps 200
    python benchmarks/throughput.py --source synthetic --steps 200      # in-memory decoded arrays
    python benchmarks/throughput.py --make-jpegs DIR --count 3000       # a folder of test photos

Results are merged into `benchmarks/results/data_throughput.json`, one entry per source kind.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_jpeg_folder(folder, count: int = 3000, seed: int = 0) -> Path:
    """`count` JPEGs (crops of scikit-image's sample photos, 160-640 px, varied aspect) + `.txt` captions."""
    import skimage.data
    from PIL import Image

    names = (
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "immunohistochemistry",
        "hubble_deep_field",
        "retina",
        "colorwheel",
        "stereo_motorcycle",
    )
    photos = []
    for n in names:
        x = getattr(skimage.data, n)()
        photos.append((n, (x[0] if isinstance(x, tuple) else x)[..., :3]))
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name, photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(rng.integers(h // 3, h + 1)), int(rng.integers(w // 3, w + 1))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        img = Image.fromarray(np.ascontiguousarray(photo[y : y + ch, x : x + cw]))
        scale = rng.uniform(160, 640) / max(ch, cw)
        img = img.resize(
            (max(8, round(cw * scale)), max(8, round(ch * scale))), Image.Resampling.BILINEAR
        )
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        img.save(sub / f"{i:06d}.jpg", quality=int(rng.integers(75, 96)))
        (sub / f"{i:06d}.txt").write_text(f"a photo of the {name.replace('_', ' ')}, crop {i}")
    return folder


def measure(
    source, resolution: int, batch: int, steps: int, warmup: int, threads: int, tokenize: bool
) -> dict:
    from jaxdiff.data.pipeline import PipelineConfig, make_pipeline

    tokenizer = None
    if tokenize:
        from jaxdiff.tokenizer import Tokenizer, write_clip_tokenizer

        tokenizer = Tokenizer(write_clip_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer"))
    cfg = PipelineConfig(
        resolution=resolution, global_batch=batch, num_threads=threads, shard_index=0, shard_count=1
    )
    pipe = make_pipeline(source, cfg, tokenizer)
    it = iter(pipe.dataset)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        b = next(it)
    seconds = time.perf_counter() - t0
    it.close()
    assert b["image"].shape == (batch, resolution, resolution, 3)
    return {
        "examples_per_s": round(steps * batch / seconds, 1),
        "seconds": round(seconds, 3),
        "records": len(source),
        "skipped": pipe.skips.as_dict(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python benchmarks/throughput.py", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--source", help="folder:DIR | shapes_world:DATA_DIR | synthetic[:N]")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument(
        "--warmup", type=int, default=3, help="batches read before timing (fills the prefetch)"
    )
    ap.add_argument("--threads", type=int, default=4, help="decode threads")
    ap.add_argument("--no-tokenize", action="store_true", help="leave out CLIP tokenisation")
    ap.add_argument("--out", default="benchmarks/results/data_throughput.json")
    ap.add_argument("--make-jpegs", metavar="DIR", help="write a folder of test JPEGs and exit")
    ap.add_argument("--count", type=int, default=3000, help="with --make-jpegs: how many")
    args = ap.parse_args(argv)
    if args.make_jpegs:
        make_jpeg_folder(args.make_jpegs, args.count)
        print(f"wrote {args.count} JPEGs with captions under {args.make_jpegs}")
        return 0
    if not args.source:
        ap.error("--source is required (or --make-jpegs DIR)")
    if min(args.resolution, args.batch, args.steps, args.threads) < 1 or args.warmup < 0:
        ap.error("--resolution, --batch, --steps and --threads must be positive")
    from jaxdiff.data.pipeline import open_source

    try:
        source = open_source(args.source, args.resolution)
    except (OSError, ValueError) as e:
        sys.exit(f"throughput: {e}")
    result = measure(
        source,
        args.resolution,
        args.batch,
        args.steps,
        args.warmup,
        args.threads,
        not args.no_tokenize,
    )
    entry = {
        "source": args.source,
        "resolution": args.resolution,
        "batch": args.batch,
        "steps": args.steps,
        "threads": args.threads,
        "tokenize": not args.no_tokenize,
        **result,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # others share the CPU
        "machine": platform.processor() or platform.machine(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    print(
        f"{args.source}: {result['examples_per_s']:.1f} examples/s ({args.steps} batches of {args.batch} "
        f"at {args.resolution} px, {args.threads} decode threads, {os.cpu_count()} CPUs)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(out.read_text()) if out.exists() else {}
    table[args.source.partition(":")[0]] = entry
    out.write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
