"""`jaxdiff data ...`: build, show and draw the shapes world; `jaxdiff data folder ...` for users' data.

    jaxdiff data build shapes_world --resolution 64 --train 100000 --validation 10000 --heldout 10000 \
        --data-dir DIR
    jaxdiff data show shapes_world --data-dir DIR --split train --index 0 [--png OUT]
    jaxdiff data grid shapes_world --out docs/shapes_world_grid.png
    jaxdiff data folder DIR --resolution 64 [--limit N]   # decode a users' folder as training would
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from jaxdiff.data import folder, shapes_tfds
from jaxdiff.data import shapes_world as sw
from jaxdiff.data.pipeline import DecodeExample


def _resolution(text):
    r = int(text)
    if r not in sw.RESOLUTIONS:
        sizes = ", ".join(map(str, sw.RESOLUTIONS))
        raise argparse.ArgumentTypeError(f"{r}: the shapes world comes in {sizes} px")
    return r


def _count(text):
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n}: must be >= 0")
    return n


def _save_png(image, path, text=None):
    """Write a PNG atomically (temp file in the same folder, then rename)."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would outlive the rename
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _build(args):

    sizes = {"train": args.train, "validation": args.validation, "heldout": args.heldout}
    if not any(sizes.values()):
        sys.exit(
            "jaxdiff data build: every split is empty; pass --train / --validation / --heldout N"
        )
    t = time.perf_counter()
    try:
        builder = shapes_tfds.prepare(
            args.data_dir, args.resolution, sizes, args.seed, args.overwrite
        )
    except FileExistsError as e:
        sys.exit(f"jaxdiff data build: {e}")
    dt = time.perf_counter() - t
    n = sum(sizes.values())
    print(
        f"shapes_world/{args.resolution} in {builder.data_dir}: "
        + ", ".join(f"{s} {k}" for s, k in sizes.items() if k)
        + f" examples; {dt:.1f} s, {n / dt:,.0f} examples/s (seed {args.seed})"
    )
    print(
        f"read it with: tfds.data_source('shapes_world/{args.resolution}', data_dir='{args.data_dir}')"
    )


def _names(ex, n):
    objs = []
    for i in range(n):
        x, y = (float(v) for v in ex["centre"][i])
        objs.append(
            f"  {list(sw.SIZES)[ex['size'][i]]} {list(sw.COLOURS)[ex['colour'][i]]} "
            f"{sw.SHAPES[ex['shape'][i]]} in cell {sw.CELLS[ex['cell'][i]]!r}, "
            f"centre ({x:.3f}, {y:.3f}), extent {float(ex['extent'][i]):.3f} (units of S)"
        )
    return objs


def _show(args):
    if args.data_dir:
        root = Path(args.data_dir) / "shapes_world" / str(args.resolution)
        if not root.is_dir():
            sys.exit(
                f"jaxdiff data show: {root}: no shapes_world build at {args.resolution} px "
                f"(build it with `jaxdiff data build shapes_world --data-dir {args.data_dir}`)"
            )
        source = tfds.data_source(f"shapes_world/{args.resolution}", data_dir=args.data_dir)
        if args.split not in source:
            sys.exit(
                f"jaxdiff data show: split {args.split!r} was not built (built: {sorted(source)})"
            )
        if not 0 <= args.index < len(source[args.split]):
            sys.exit(
                f"jaxdiff data show: index {args.index} out of range: {args.split} has "
                f"{len(source[args.split])} examples"
            )
        ex = dict(source[args.split][args.index])
        ex["caption"] = (
            ex["caption"].decode() if isinstance(ex["caption"], bytes) else ex["caption"]
        )
    else:  # no build needed: an example is a function of (split, index, seed)
        ex = sw.example(args.split, args.index, args.seed, args.resolution)
    print(f"{args.split}[{args.index}]: {ex['caption']!r}")
    print(
        f"  kind {sw.KINDS[ex['kind']]}, background {list(sw.BACKGROUNDS)[ex['background']]}"
        + (f", relation {sw.RELATIONS[ex['relation']]!r}" if ex["relation"] >= 0 else "")
    )
    print("\n".join(_names(ex, int(ex["num_objects"]))))
    if args.png:
        _save_png(np.asarray(ex["image"]), args.png, {"prompt": ex["caption"], "split": args.split})
        print(f"wrote {args.png}")


def grid_image(split="train", resolution=64, per_kind=6, seed=0, scale=2):
    """uint8 grid: one row per scene kind, `per_kind` real examples each, captions under the tiles."""

    rows = {k: [] for k in sw.KINDS}
    i = 0
    while any(len(v) < per_kind for v in rows.values()):
        scene = sw.sample_scene(split, i, seed)
        if len(rows[scene.kind]) < per_kind:
            rows[scene.kind].append((i, scene))
        i += 1
    tile, text_h, label_w = resolution * scale, 40, 90
    width = max(tile, 150)
    canvas = Image.new(
        "RGB", (label_w + per_kind * width, len(rows) * (tile + text_h) + 1), "white"
    )
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for r, (kind, items) in enumerate(rows.items()):
        y = r * (tile + text_h) + 1
        draw.text((6, y + tile // 2), kind, fill="black", font=font)
        for c, (_, scene) in enumerate(items):
            x = label_w + c * width
            img = Image.fromarray(sw.render(scene, resolution)).resize(
                (tile, tile), Image.Resampling.NEAREST
            )
            x0 = x + (width - tile) // 2
            canvas.paste(img, (x0, y))
            draw.rectangle((x0 - 1, y - 1, x0 + tile, y + tile), outline=(160, 160, 160))
            words, lines = scene.caption.split(), [""]
            for w in words:  # wrap to the tile width
                if draw.textlength(f"{lines[-1]} {w}".strip(), font=font) > width - 6:
                    lines.append("")
                lines[-1] = f"{lines[-1]} {w}".strip()
            draw.multiline_text(
                (x + 3, y + tile + 2), "\n".join(lines[:3]), fill="black", font=font, spacing=1
            )
    return np.asarray(canvas)


def _grid(args):
    _save_png(grid_image(args.split, args.resolution, args.per_kind, args.seed), args.out)
    print(f"wrote {args.out}")


def _stats_row(label: str, values) -> str:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return f"  {label:<26}-"
    return (
        f"  {label:<26}min {v.min():.0f}  median {np.median(v):.0f}  mean {v.mean():.1f}  "
        f"max {v.max():.0f}"
    )


def format_summary(summary: dict) -> str:
    """The table `jaxdiff data folder` prints."""
    checked = (
        ""
        if summary["checked"] == summary["records"]
        else f"  (checked the first {summary['checked']})"
    )
    lines = [
        f"{summary['root']}  ({summary['layout']} layout)",
        f"  {'found':<26}{summary['records'] + summary['skipped_open']}",
        f"  {'image-caption records':<26}{summary['records']}{checked}",
        f"  {'used':<26}{summary['used']}",
        f"  {'skipped':<26}{summary['skipped_open'] + summary['skipped_decode']}",
    ]
    for reason, row in {**summary["skipped_at_open"], **summary["skipped_at_decode"]}.items():
        lines.append(f"    {reason:<32}{row['count']:>7}   e.g. {', '.join(row['examples'])}")
    lines.append(_stats_row("caption length (words)", summary["caption_words"]))
    lines.append(_stats_row("caption length (chars)", summary["caption_chars"]))
    lines.append(f"  {'empty captions':<26}{summary['empty_captions']}")
    return "\n".join(lines)


def scan(source, resolution: int, limit: int | None = None, num_threads: int = 4) -> dict:
    """Decode (and crop) every record of `source` as the pipeline would; counts and caption stats."""
    decode = DecodeExample(resolution)
    n = len(source) if limit is None else min(limit, len(source))
    words, chars = [], []
    with ThreadPoolExecutor(num_threads) as pool:
        for out in pool.map(lambda i: decode(source[i]), range(n), chunksize=16):
            if out is not None:
                words.append(len(out["caption"].split()))
                chars.append(len(out["caption"]))
    open_skips = source.skips.as_dict() if hasattr(source, "skips") else {}
    return {
        "root": str(getattr(source, "root", "")),
        "layout": getattr(source, "layout", "?"),
        "records": len(source),
        "checked": n,
        "used": len(words),
        "skipped_open": sum(r["count"] for r in open_skips.values()),
        "skipped_decode": decode.skips.total,
        "skipped_at_open": open_skips,
        "skipped_at_decode": decode.skips.as_dict(),
        "caption_words": words,
        "caption_chars": chars,
        "empty_captions": sum(c == 0 for c in chars),
        "resolution": resolution,
    }


def folder_main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="jaxdiff data folder",
        description="Check a folder of image-caption data: decode every image as "
        "training would, count what is used and skipped.",
    )
    ap.add_argument(
        "folder", help="images + .txt captions, a captions.jsonl, or img2dataset .tar shards"
    )
    ap.add_argument("--resolution", type=int, default=64, help="training resolution (default 64)")
    ap.add_argument("--limit", type=int, default=None, help="check only the first N records")
    ap.add_argument("--threads", type=int, default=4, help="decoding threads (default 4)")
    ap.add_argument(
        "--json", default=None, help="also write the summary (without per-caption lists) here"
    )
    args = ap.parse_args(argv)
    if args.resolution < 1 or (args.limit is not None and args.limit < 1):
        ap.error("--resolution and --limit must be positive")
    try:
        source = folder.open_folder(args.folder)
    except (OSError, ValueError) as e:
        sys.exit(f"jaxdiff data folder: {e}")
    summary = scan(source, args.resolution, args.limit, args.threads)
    print(format_summary(summary))
    if args.json:
        slim = {k: v for k, v in summary.items() if k not in ("caption_words", "caption_chars")}
        Path(args.json).write_text(json.dumps(slim, indent=2))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "folder":
        return folder_main(argv[1:])
    ap = argparse.ArgumentParser(prog="jaxdiff data", description="Build and inspect data sets.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "folder", help="users' own image-caption folders (see `jaxdiff data folder --help`)"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("dataset", choices=["shapes_world"])
    common.add_argument("--resolution", type=_resolution, default=64)
    common.add_argument("--seed", type=_count, default=0)

    b = sub.add_parser(
        "build", parents=[common], help="build the shapes_world TFDS data set (array_record)"
    )
    b.add_argument("--data-dir", required=True)
    b.add_argument("--train", type=_count, default=100_000)
    b.add_argument("--validation", type=_count, default=10_000)
    b.add_argument("--heldout", type=_count, default=10_000)
    b.add_argument(
        "--overwrite", action="store_true", help="replace a build with other sizes or seed"
    )

    s = sub.add_parser("show", parents=[common], help="print one example's caption and labels")
    s.add_argument(
        "--data-dir", help="read the built TFDS record (default: generate the example directly)"
    )
    s.add_argument("--split", choices=list(sw.SPLITS), default="train")
    s.add_argument("--index", type=_count, default=0)
    s.add_argument("--png", help="also write the image here (caption in the PNG text 'prompt')")

    g = sub.add_parser(
        "grid", parents=[common], help="a PNG grid of real examples, one row per scene kind"
    )
    g.add_argument("--out", required=True)
    g.add_argument("--split", choices=list(sw.SPLITS), default="train")
    g.add_argument("--per-kind", type=int, default=6)

    args = ap.parse_args(argv)
    {"build": _build, "show": _show, "grid": _grid}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
