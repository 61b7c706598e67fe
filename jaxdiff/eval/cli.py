"""`jaxdiff eval ...`: score generated images.

jaxdiff eval fidelity --images DIR [--json OUT] [--resolution 64]
jaxdiff eval frechet --images DIR --reference DIR|shapes_world:SPLIT [--json OUT]
jaxdiff eval clip --model RUN|DIR [--data shapes_world|folder:DIR] [--split heldout] [--n 1000]
jaxdiff eval clip-score --model RUN|DIR --images DIR [--prompt TEXT]
jaxdiff eval vae --model RUN|DIR [--split validation] [--n 500]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from jaxdiff.convert.runs import load_vae
from jaxdiff.data.shapes_world import RESOLUTIONS, SPLITS
from jaxdiff.eval import clip as ce
from jaxdiff.eval import frechet
from jaxdiff.eval import vae as ve
from jaxdiff.eval.fidelity import IMAGE_SUFFIXES, evaluate_folder, read_folder, write_json


def read_images(folder, size=None, square: bool = True):
    """uint8 [N, S, S, 3] of every image in a folder (resized to `size` if given); with
    ``square=False`` a list of images of any size, as they are."""

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
        if not square:
            out.append(np.asarray(rgb))
            continue
        if rgb.width != rgb.height:
            raise ValueError(f"{p}: not square ({rgb.width} x {rgb.height})")
        size = size or rgb.width
        if rgb.width != size:
            rgb = rgb.resize((size, size), Image.Resampling.BOX)
        out.append(np.asarray(rgb))
    return np.stack(out) if square else out


def _fidelity(args):

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

    try:
        images = read_images(args.images)
        size = images.shape[1]
        if args.reference.startswith("shapes_world:"):
            split = args.reference.split(":", 1)[1]

            if split not in SPLITS:
                raise ValueError(
                    f"unknown split {split!r} in --reference: expected shapes_world:"
                    f"{'|'.join(SPLITS)}"
                )
            res = size if size in RESOLUTIONS else 64
            reference = frechet.reference_images(split, args.num or len(images), res, args.seed)
        else:
            reference = read_images(args.reference)
        d = frechet.frechet(images, reference)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"jaxdiff eval frechet: {e}")
    print(
        f"frechet distance {d:.4f} ({len(images)} images vs {len(reference)} reference, "
        f"{frechet.FEATURE_DIM} fixed features)"
    )
    if args.json:
        write_json(
            {
                "frechet": d,
                "images": args.images,
                "reference": args.reference,
                "n_images": len(images),
                "n_reference": len(reference),
            },
            args.json,
        )
        print(f"wrote {args.json}")


def _clip(args):

    if args.n < 2:
        sys.exit(f"jaxdiff eval clip: --n {args.n}: need at least 2 examples")
    try:
        if args.data != "shapes_world" and not args.data.startswith(("folder:", "shapes_world:")):
            raise ValueError(f"--data {args.data!r}: expected shapes_world or folder:DIR")
        model = ce.load(args.model)
        if args.data == "shapes_world":
            report = ce.shapes_world_report(model, args.split, args.n, args.seed)
        else:
            report = ce.folder_report(model, args.data, args.n)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"jaxdiff eval clip: {e}")
    report["model"] = str(args.model)
    print(ce.format_report(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")


def _clip_score(args):

    try:
        if args.prompt is not None:
            images = read_images(args.images, square=False)
            captions = [args.prompt] * len(images)
        else:
            images, captions, _, _ = read_folder(args.images, shapes_world=False)
        model = ce.load(args.model)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"jaxdiff eval clip-score: {e}")
    scores = ce.clip_score(model.embed_images(images), model.embed_texts(captions))
    print(
        f"CLIP score {scores.mean():.2f} (mean of {len(scores)} images; min {scores.min():.2f}, "
        f"max {scores.max():.2f})"
    )
    out = args.json or str(Path(args.images) / "clip_score.json")
    write_json(
        {
            "clip_score": float(scores.mean()),
            "per_image": [float(v) for v in scores],
            "captions": captions,
            "model": str(args.model),
        },
        out,
    )
    print(f"wrote {out}")


def _vae(args):

    try:
        cfg, params = load_vae(args.model)
        report = ve.shapes_world_psnr(cfg, params, args.split, args.n, args.resolution)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"jaxdiff eval vae: {e}")
    print(
        f"reconstruction PSNR on {report['n']} {report['split']} images at {report['resolution']} px: "
        f"mean {report['psnr_mean']:.2f} dB, median {report['psnr_median']:.2f}, min {report['psnr_min']:.2f}"
    )
    attrs = ", ".join(
        f"{k} {100 * v:.1f} %" for k, v in report["fidelity_by_attribute"].items() if v is not None
    )
    print(
        f"prompt fidelity of the reconstructions (the ceiling for a latent diffusion model on this VAE): "
        f"{100 * report['fidelity']:.1f} % ({attrs})"
    )
    if args.json:
        write_json(dict(report, model=str(args.model)), args.json)
        print(f"wrote {args.json}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="jaxdiff eval", description="Score generated images.")
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser(
        "fidelity", help="prompt fidelity on the shapes world (per the spec's Scoring)"
    )
    f.add_argument(
        "--images",
        required=True,
        help="PNGs with the prompt in PNG text 'prompt', a same-named .txt, or captions.jsonl",
    )
    f.add_argument("--json", help="report path (default: IMAGES/fidelity.json)")
    f.add_argument("--resolution", type=int, help="resize images to this side first (64 or above)")
    r = sub.add_parser("frechet", help="Frechet distance on fixed shapes-world features")
    r.add_argument("--images", required=True)
    r.add_argument("--reference", required=True, help="a folder, or shapes_world:SPLIT (rendered)")
    r.add_argument(
        "--num",
        type=int,
        help="reference examples for shapes_world:SPLIT (default: as many as images)",
    )
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json")
    c = sub.add_parser("clip", help="CLIP zero-shot accuracy and retrieval recall@k")
    c.add_argument(
        "--model",
        required=True,
        help="a `jaxdiff train` CLIP workdir or a transformers CLIPModel folder",
    )
    c.add_argument(
        "--data",
        default="shapes_world",
        help="shapes_world (rendered; zero-shot colour and shape + retrieval) or folder:DIR (retrieval)",
    )
    c.add_argument(
        "--split", default="heldout", help="shapes-world split: train, validation or heldout"
    )
    c.add_argument(
        "--n", type=int, default=1000, help="examples (retrieval ranks among all of them)"
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", help="write the report here")
    s = sub.add_parser("clip-score", help="mean CLIP score of images against their prompts")
    s.add_argument("--model", required=True)
    s.add_argument(
        "--images",
        required=True,
        help="images with prompts (PNG text 'prompt', NAME.txt or "
        "captions.jsonl), e.g. `jaxdiff txt2img` output",
    )
    s.add_argument("--prompt", help="score every image against this prompt instead")
    s.add_argument("--json", help="report path (default: IMAGES/clip_score.json)")
    v = sub.add_parser(
        "vae", help="VAE reconstruction PSNR and prompt fidelity on rendered shapes-world images"
    )
    v.add_argument(
        "--model", required=True, help="a `jaxdiff train` VAE run, a diffusers folder or its vae/"
    )
    v.add_argument("--split", default="validation")
    v.add_argument("--n", type=int, default=500)
    v.add_argument("--resolution", type=int, default=64)
    v.add_argument("--json")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    {
        "fidelity": _fidelity,
        "frechet": _frechet,
        "clip": _clip,
        "clip-score": _clip_score,
        "vae": _vae,
    }[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
