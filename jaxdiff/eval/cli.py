"""`jaxdiff eval ...`: score generated images.

    jaxdiff eval fidelity --images DIR [--json OUT] [--resolution 64]
    jaxdiff eval frechet --images DIR --reference DIR|shapes_world:SPLIT [--json OUT]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np


def read_images(folder, size=None):
    """uint8 [N, S, S, 3] of every image in a folder (resized to `size` if given)."""
    from PIL import Image

    from jaxdiff.eval.fidelity import IMAGE_SUFFIXES

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                rgb = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported by name
            raise ValueError(f"{p}: unreadable image ({e})") from None
        if rgb.width != rgb.height:
            raise ValueError(f"{p}: not square ({rgb.width} x {rgb.height})")
        size = size or rgb.width
        if rgb.width != size:
            rgb = rgb.resize((size, size), Image.Resampling.BOX)
        out.append(np.asarray(rgb))
    return np.stack(out)


def _fidelity(args):
    from jaxdiff.eval.fidelity import evaluate_folder

    if args.resolution is not None and args.resolution < 16:
        sys.exit(f"jaxdiff eval fidelity: --resolution {args.resolution}: score at 64 px or above")
    out = args.json or str(Path(args.images) / "fidelity.json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        try:
            report = evaluate_folder(args.images, json_out=out, resolution=args.resolution)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"jaxdiff eval fidelity: {e}")
    print(f"wrote {out} ({report['overall']['n']} images)")


def _frechet(args):
    from jaxdiff.eval import frechet
    from jaxdiff.eval.fidelity import write_json

    try:
        images = read_images(args.images)
        size = images.shape[1]
        if args.reference.startswith("shapes_world:"):
            split = args.reference.split(":", 1)[1]
            from jaxdiff.data.shapes_world import RESOLUTIONS, SPLITS
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r} in --reference: expected shapes_world:"
                                 f"{'|'.join(SPLITS)}")
            res = size if size in RESOLUTIONS else 64
            reference = frechet.reference_images(split, args.num or len(images), res, args.seed)
        else:
            reference = read_images(args.reference)
        d = frechet.frechet(images, reference)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"jaxdiff eval frechet: {e}")
    print(f"frechet distance {d:.4f} ({len(images)} images vs {len(reference)} reference, "
          f"{frechet.FEATURE_DIM} fixed features)")
    if args.json:
        write_json({"frechet": d, "images": args.images, "reference": args.reference,
                    "n_images": len(images), "n_reference": len(reference)}, args.json)
        print(f"wrote {args.json}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="jaxdiff eval", description="Score generated images.")
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fidelity", help="prompt fidelity on the shapes world (per the spec's Scoring)")
    f.add_argument("--images", required=True, help="PNGs with the prompt in PNG text 'prompt', a "
                   "same-named .txt, or captions.jsonl")
    f.add_argument("--json", help="report path (default: IMAGES/fidelity.json)")
    f.add_argument("--resolution", type=int, help="resize images to this side first (64 or above)")
    r = sub.add_parser("frechet", help="Frechet distance on fixed shapes-world features")
    r.add_argument("--images", required=True)
    r.add_argument("--reference", required=True, help="a folder, or shapes_world:SPLIT (rendered)")
    r.add_argument("--num", type=int,
                   help="reference examples for shapes_world:SPLIT (default: as many as images)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    {"fidelity": _fidelity, "frechet": _frechet}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
