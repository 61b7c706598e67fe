"""The shapes-world Stable Diffusion study: prompt fidelity and Frechet distance per guidance weight,
and SDEdit recolouring per strength.

    python -m jaxdiff.eval.study --model models/shapes_sd --out docs/shapes_sd [--n 500 --heldout 300]
    python -m jaxdiff.eval.study --model models/shapes_sd --quick [--kind relation] [--n 200 --heldout 100]

``--quick`` is the short check docs/shapes_sd.md quotes between studies: one guidance weight (``--guidance``,
default 3), no Frechet or SDEdit, the first n captions of validation (of one scene kind with ``--kind``: the
first 200 relation captions are "relation 200") and of heldout; printed, and written with ``--json``.

Prompts are the captions of validation (and held-out) examples 0 .. n-1; image i uses seed i; the
Frechet reference is the renders of those same examples. Writes study.json, study.md (the tables)
and study.svg (the plot) into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from jaxdiff.data import shapes_world as sw
from jaxdiff.data.shapes_world import KINDS
from jaxdiff.eval import fidelity, frechet
from jaxdiff.eval.fidelity import write_json
from jaxdiff.pipelines.params import SamplingError, SamplingParams, parse_interval
from jaxdiff.pipelines.stable_diffusion import Pipeline
from jaxdiff.runtime import tune_cpu

GUIDANCE = (
    0.0,
    1.0,
    2.0,
    3.0,
    5.0,
    7.5,
)  # the grid, plus w = 2 (the shapes-world model's best)
STRENGTHS = (0.3, 0.6, 0.9)


def generate(pipe, prompts, guidance, steps, sampler, seed=0, batch=125, image=None, **settings):
    """uint8 images for ``prompts`` (image i: seed + i), in fixed-size batches (one compile); ``settings``:
    the other SamplingParams fields (guidance_rescale, guidance_interval, strength for ``image``)."""
    params = SamplingParams(guidance=guidance, steps=steps, sampler=sampler, **settings)
    out = []
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i : i + batch])
        pad = batch - len(chunk)
        kw = dict(params=params, seed=seed + i)
        if image is None:
            imgs = pipe.txt2img(chunk + chunk[-1:] * pad, **kw)
        else:
            part = image[i : i + batch]
            part = np.concatenate([part, np.repeat(part[-1:], pad, 0)])
            imgs = pipe.img2img(part.astype(np.float32) / 255.0, chunk + chunk[-1:] * pad, **kw)
        out.append(np.clip(np.round(np.asarray(imgs)[: len(chunk)] * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def captions_of(split: str, n: int, kind: str | None = None) -> list[str]:
    """The captions of the first n examples of ``split`` (of scene kind ``kind`` if given)."""

    if kind is not None and kind not in sw.KINDS:
        raise ValueError(f"unknown scene kind {kind!r}: expected one of {list(sw.KINDS)}")
    out, i = [], 0
    while len(out) < n:
        scene = sw.sample_scene(split, i)
        if kind is None or scene.kind == kind:
            out.append(scene.caption)
        i += 1
    return out


def quick_check(
    pipe, n_val, n_heldout, guidance=3.0, kind=None, steps=25, sampler="ddim", log=print, **guide
) -> list:
    """Fidelity at one guidance weight on the first captions of each split (of one kind if given)."""

    rows = []
    for split, n in (("validation", n_val), ("heldout", n_heldout)):
        if not n:
            continue
        t = time.perf_counter()
        prompts = captions_of(split, n, kind)
        rep = fidelity.evaluate(generate(pipe, prompts, guidance, steps, sampler, **guide), prompts)
        rows.append(
            {
                "split": split,
                "kind": kind,
                "n": n,
                "guidance": guidance,
                "fidelity": rep["overall"]["accuracy"],
                "by_kind": {k: v["accuracy"] for k, v in rep["by_kind"].items()},
                "by_attribute": {k: v["accuracy"] for k, v in rep["by_attribute"].items()},
                "diagnostics": rep["diagnostics"],
                "seconds": time.perf_counter() - t,
            }
        )
        order = rep["diagnostics"].get("relation_order") or {}
        log(
            f"{split:10s} {kind or 'all kinds'} ({n}) w={guidance:g}: fidelity {100 * rows[-1]['fidelity']:5.1f} %"
            + "".join(
                f", {k} {100 * v:.1f} %" for k, v in rows[-1]["by_kind"].items() if v is not None
            )
            + (
                f"; relation order named / reversed / neither {order.get('named')} / {order.get('reversed')} / "
                f"{order.get('neither')} of {order.get('both_drawn')} with both objects"
                if order
                else ""
            )
            + f" ({rows[-1]['seconds']:.0f} s)"
        )
    return rows


def recolour(scene, rng):
    """(edited caption, new colour) for a one-object scene: the same words with another colour."""

    p = sw.parse_caption(scene.caption)
    o = p.objects[0]
    new = rng.choice([c for c in sw.COLOURS if c != o.colour])
    text = sw.object_phrase(new, o.shape, o.size)
    if o.cell is not None:
        text += " " + sw.POSITION_PHRASES[o.cell]
    if p.background is not None:
        text += f" on a {p.background} background"
    return text


def guidance_study(pipe, n_val, n_heldout, steps, sampler, weights=GUIDANCE, log=print, **guide):

    rows = []
    for split, n in (("validation", n_val), ("heldout", n_heldout)):
        if not n:
            continue
        scenes = [sw.sample_scene(split, i) for i in range(n)]
        prompts = [s.caption for s in scenes]
        real = np.stack([sw.render(s, 64) for s in scenes])
        for w in weights:
            t = time.perf_counter()
            images = generate(pipe, prompts, w, steps, sampler, **guide)
            rep = fidelity.evaluate(images, prompts)
            row = {
                "split": split,
                "guidance": w,
                "n": n,
                "fidelity": rep["overall"]["accuracy"],
                "by_kind": {k: v["accuracy"] for k, v in rep["by_kind"].items()},
                "by_attribute": {k: v["accuracy"] for k, v in rep["by_attribute"].items()},
                "frechet": frechet.frechet(images, real),
                "diagnostics": rep["diagnostics"],
                "seconds": time.perf_counter() - t,
            }
            rows.append(row)
            log(
                f"{split:10s} w={w:<4} fidelity {100 * row['fidelity']:5.1f} %  frechet {row['frechet']:7.2f}  "
                f"({row['seconds']:.0f} s)"
            )
    return rows


def sdedit_study(pipe, n, steps, sampler, guidance, strengths=STRENGTHS, log=print, **guide):
    """Recolour the object of n one-object validation scenes (real renders) at each strength."""

    rng = np.random.default_rng(0)
    scenes, i = [], 0
    while len(scenes) < n:
        s = sw.sample_scene("validation", i)
        if s.kind in ("single", "background"):
            scenes.append(s)
        i += 1
    edits = [recolour(s, rng) for s in scenes]
    real = np.stack([sw.render(s, 64) for s in scenes])
    original = fidelity.evaluate(real, edits)["overall"][
        "accuracy"
    ]  # ~0: the edit is not there yet
    rows = [
        {
            "strength": 0.0,
            "n": n,
            "edit_fidelity": original,
            "kept_original": fidelity.evaluate(real, [s.caption for s in scenes])["overall"][
                "accuracy"
            ],
        }
    ]
    for st in strengths:
        images = generate(pipe, edits, guidance, steps, sampler, image=real, strength=st, **guide)
        rows.append(
            {
                "strength": st,
                "n": n,
                "edit_fidelity": fidelity.evaluate(images, edits)["overall"]["accuracy"],
                "kept_original": fidelity.evaluate(images, [s.caption for s in scenes])["overall"][
                    "accuracy"
                ],
            }
        )
        log(
            f"SDEdit strength {st}: edited prompt {100 * rows[-1]['edit_fidelity']:5.1f} %, "
            f"original prompt {100 * rows[-1]['kept_original']:5.1f} %"
        )
    return rows


def markdown(result) -> str:

    g, e = result["guidance"], result["sdedit"]
    rescale, interval = result.get("guidance_rescale", 0.0), result.get("guidance_interval")
    lines = [
        f"Model `{result['model']}`, {result['sampler']} {result['steps']} steps"
        + (f", guidance rescale {rescale:g}" if rescale else "")
        + (
            f", guidance only for t / T in [{interval[0]:g}, {interval[1]:g}] (the conditional model alone "
            "elsewhere)"
            if interval
            else ""
        )
        + ", image i seeded with i.",
        "",
        "| split | w | fidelity | " + " | ".join(KINDS) + " | Frechet |",
        "|---|---|---|" + "---|" * len(KINDS) + "---|",
    ]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    for r in g:
        lines.append(
            f"| {r['split']} ({r['n']}) | {r['guidance']:g} | **{pct(r['fidelity'])}** | "
            + " | ".join(pct(r["by_kind"][k]) for k in KINDS)
            + f" | {r['frechet']:.2f} |"
        )
    attrs = [
        a
        for a in ("object", "size", "position", "relation", "count", "background")
        if any(r["by_attribute"].get(a) is not None for r in g)
    ]
    lines += [
        "",
        "Per attribute (of the prompts that name it):",
        "",
        "| split | w | " + " | ".join(attrs) + " |",
        "|---|---|" + "---|" * len(attrs),
    ]
    for r in g:
        lines.append(
            f"| {r['split']} | {r['guidance']:g} | "
            + " | ".join(pct(r["by_attribute"].get(a)) for a in attrs)
            + " |"
        )
    if all(
        "diagnostics" in r for r in g
    ):  # studies written before the evaluator reported them lack it
        lines += [
            "",
            "Why relations and counts fail: of the relation prompts with both objects drawn, how many "
            "hold the named order, the reversed one, or share a row / column; and how many of the named "
            "object the count prompts' images hold:",
            "",
            '| split | w | both drawn | named order | reversed | same row / column | objects drawn for "two" '
            '| for "three" |',
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in g:
            o, c = r["diagnostics"]["relation_order"], r["diagnostics"]["count_drawn"]
            hist = lambda k, c=c: ", ".join(f"{n}: {v}" for n, v in c.get(k, {}).items()) or "-"
            lines.append(
                f"| {r['split']} | {r['guidance']:g} | {o['both_drawn']} | {o['named']} | {o['reversed']} | "
                f"{o['neither']} | {hist('2')} | {hist('3')} |"
            )
    lines += [
        "",
        f"SDEdit: {e[0]['n']} one-object validation renders, prompt with the object recoloured, "
        f"guidance {result['sdedit_guidance']:g}:",
        "",
        "| strength | edited prompt correct | original prompt still correct |",
        "|---|---|---|",
    ]
    for r in e:
        lines.append(
            f"| {r['strength']:g} | {pct(r['edit_fidelity'])} | {pct(r['kept_original'])} |"
        )
    return "\n".join(lines) + "\n"


def svg_plot(rows) -> str:
    """Fidelity (%) against guidance weight, one line per split: a small self-contained SVG."""
    W, H, L, B = 420, 260, 50, 40
    xs = sorted({r["guidance"] for r in rows})
    X = lambda w: L + (W - L - 20) * (w - xs[0]) / max(xs[-1] - xs[0], 1e-9)  # noqa: E731
    Y = lambda v: H - B - (H - B - 20) * v  # noqa: E731
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<line x1="{L}" y1="{Y(0)}" x2="{W - 20}" y2="{Y(0)}" stroke="black"/>',
        f'<line x1="{L}" y1="{Y(0)}" x2="{L}" y2="{Y(1)}" stroke="black"/>',
    ]
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<text x="{L - 6}" y="{Y(v) + 4}" text-anchor="end">{int(100 * v)}%</text>')
        out.append(f'<line x1="{L}" y1="{Y(v)}" x2="{W - 20}" y2="{Y(v)}" stroke="#ddd"/>')
    for w in xs:
        out.append(f'<text x="{X(w)}" y="{H - B + 15}" text-anchor="middle">{w:g}</text>')
    out.append(f'<text x="{(L + W) / 2}" y="{H - 5}" text-anchor="middle">guidance weight w</text>')
    for i, (split, colour) in enumerate((("validation", "#1f77b4"), ("heldout", "#d62728"))):
        pts = [(X(r["guidance"]), Y(r["fidelity"])) for r in rows if r["split"] == split]
        if not pts:
            continue
        out.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
            + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            + '"/>'
        )
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in pts]
        out.append(
            f'<text x="{L + 10}" y="{20 + 14 * i}" fill="{colour}">{split} prompt fidelity</text>'
        )
    return "\n".join(out + ["</svg>"]) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m jaxdiff.eval.study", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--model", default="models/shapes_sd")
    ap.add_argument("--out", help="the study's folder (not with --quick)")
    ap.add_argument("--n", type=int, help="validation prompts (default 500; --quick: 200)")
    ap.add_argument("--heldout", type=int, help="held-out prompts (default 300; --quick: 100)")
    ap.add_argument(
        "--quick", action="store_true", help="one guidance weight, fidelity only (see above)"
    )
    ap.add_argument(
        "--kind",
        help="--quick: only captions of this scene kind (single, relation, count, background)",
    )
    ap.add_argument("--guidance", type=float, default=3.0, help="--quick: the guidance weight")
    ap.add_argument(
        "--weights",
        default=",".join(f"{w:g}" for w in GUIDANCE),
        help="the study's guidance weights, comma-separated (default %(default)s)",
    )
    ap.add_argument("--json", help="--quick: write the rows here")
    ap.add_argument("--sdedit", type=int, default=200, help="images recoloured per strength")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--sdedit-guidance", type=float, default=5.0)
    ap.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        help="Lin et al.'s CFG rescale (0.7 for zero-terminal-SNR models; 0: plain CFG)",
    )
    ap.add_argument(
        "--guidance-interval",
        metavar="LO,HI",
        help="guide only the steps with LO <= t/T <= HI, the conditional model alone on the others "
        "(Kynkaanniemi et al. 2024; default: every step)",
    )
    args = ap.parse_args(argv)
    if args.quick == bool(args.out):
        ap.error("give --out DIR for the study, or --quick for the short check")
    if not args.quick and (args.kind or args.json):
        ap.error("--kind and --json belong to --quick")
    try:
        captions_of("validation", 0, args.kind)  # checks the kind
    except ValueError as e:
        ap.error(f"--kind: {e}")
    n_val = args.n if args.n is not None else (200 if args.quick else 500)
    n_held = args.heldout if args.heldout is not None else (100 if args.quick else 300)
    if n_val < 0 or n_held < 0 or n_val + n_held == 0:
        ap.error("--n and --heldout must be >= 0, and not both 0")
    try:
        weights = tuple(float(w) for w in args.weights.split(","))
    except ValueError:
        ap.error(f"--weights: expected numbers separated by commas, got {args.weights!r}")
    if not all(np.isfinite(w) and w >= 0 for w in weights):
        ap.error(f"--weights must be finite and >= 0, got {args.weights!r}")
    if args.json and not Path(args.json).parent.is_dir():
        ap.error(f"--json: folder {Path(args.json).parent} does not exist")

    guide = {"guidance_rescale": args.guidance_rescale}
    try:
        if args.guidance_interval:
            guide["guidance_interval"] = list(parse_interval(args.guidance_interval))
        # checked before anything is loaded
        SamplingParams(steps=args.steps, sampler=args.sampler, **guide)
    except SamplingError as e:
        ap.error(f"--{e.field.replace('_', '-')}: {e}")
    if args.quick:
        pipe = Pipeline.from_pretrained(args.model)
        rows = quick_check(
            pipe, n_val, n_held, args.guidance, args.kind, args.steps, args.sampler, **guide
        )
        if args.json:
            write_json(
                {
                    "model": args.model,
                    "steps": args.steps,
                    "sampler": args.sampler,
                    **guide,
                    "rows": rows,
                },
                args.json,
            )
            print(f"wrote {args.json}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_pretrained(args.model)
    t = time.perf_counter()
    result = {
        "model": args.model,
        "steps": args.steps,
        "sampler": args.sampler,
        "sdedit_guidance": args.sdedit_guidance,
        **guide,
        "guidance": guidance_study(pipe, n_val, n_held, args.steps, args.sampler, weights, **guide),
        "sdedit": sdedit_study(
            pipe, args.sdedit, args.steps, args.sampler, args.sdedit_guidance, **guide
        ),
    }
    result["seconds"] = time.perf_counter() - t
    for name, text in (
        ("study.json", json.dumps(result, indent=1)),
        ("study.md", markdown(result)),
        ("study.svg", svg_plot(result["guidance"])),
    ):
        tmp = out / f".{name}.tmp"  # written whole, then moved over the old file
        tmp.write_text(text)
        tmp.replace(out / name)
    print(f"wrote {out / 'study.json'}, study.md, study.svg ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    tune_cpu()
    sys.exit(main())
