"""Prompt fidelity on the shapes world: does an image show what its caption says? (spec: Scoring).

Detection, per image of side S (all pixel thresholds scale with S):
1. Background: border pixels (2 px at 64) take the nearest of the 11 world colours; the background
   is the most common background colour among them. Its measured RGB (their median) is the
   reference below; objects are unmixed along lines from the background's *nominal* colour to each
   palette colour, so a global colour shift (which moves background and objects alike) cancels.
2. Objects: pixels farther than 45 (RGB distance, after a 0.5 px Gaussian smoothing against noise)
   from the background form 8-connected components; components under 0.2 % of the image are specks.
   A component's colour is the palette colour whose background-to-colour line passes closest to the
   mean of its core pixels (those at least 60 % as far from the background as its 90th percentile):
   anti-aliased and blurred pixels lie on that line. Core pixels straying more than 40 from it on
   average (noise, textures) make it no object; a component whose core is split between two palette
   colours (touching objects) is divided between them.
3. Shape: the coverage map alpha (each pixel's position along that line) gives the object's mass
   and centroid, which blur and zero-mean noise leave unchanged. For each of the 6 shapes, the extent
   that explains the mass and the centre that explains the centroid define a template (the world's
   own geometry, 4x supersampled); it is compared with alpha after a Gaussian blur of 0 to 1.4 px,
   and the smallest normalised squared error wins. A component that fits no shape within 0.35 is an
   object of no shape (it never matches a caption).
4. Size: the fitted extent below 0.24 S is small; cell: the centroid against the 0.35 / 0.65 bands.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from jaxdiff.data import shapes_world as sw

PALETTE = np.array(list(sw.COLOURS.values()), np.float32)  # [8, 3]
WORLD = np.concatenate([PALETTE, np.array(list(sw.BACKGROUNDS.values()), np.float32)])  # [11, 3]
FG_DISTANCE = 45.0  # RGB distance from the background that makes a pixel foreground
CORE_FRACTION = 0.6
SPECK_FRACTION = 0.002  # of S^2
MAX_FIT_ERROR = 0.35
MAX_LINE_RESID = 40.0  # mean RGB distance of core pixels from their colour's line (noise 12: ~15)
BLURS = (0.0, 0.5, 0.8, 1.1, 1.4)  # px at 64, scaled with S


@dataclasses.dataclass(frozen=True)
class Detected:
    """An object found in an image; geometry in units of S. shape None: no shape fits."""

    colour: str
    shape: str | None
    extent: float
    centroid: tuple[float, float]
    fit_error: float

    @property
    def size(self):
        return "small" if self.extent < sw.SIZE_THRESHOLD else "large"

    @property
    def column(self):
        return _band(self.centroid[0])

    @property
    def row(self):
        return _band(self.centroid[1])

    @property
    def cell(self):
        return 3 * self.row + self.column


def _band(v):
    return 0 if v < sw.BANDS[0] else (1 if v <= sw.BANDS[1] else 2)


def _nearest(pixels, colours):
    d = ((pixels[..., None, :] - colours) ** 2).sum(-1)
    return d.argmin(-1)


def _background(img):
    """(name or None, measured RGB, nominal RGB) of the most common background colour on the border."""
    s = img.shape[0]
    b = max(1, s // 32)
    border = np.concatenate(
        [
            img[:b].reshape(-1, 3),
            img[-b:].reshape(-1, 3),
            img[b:-b, :b].reshape(-1, 3),
            img[b:-b, -b:].reshape(-1, 3),
        ]
    )
    lab = _nearest(border, WORLD)
    counts = np.bincount(lab, minlength=len(WORLD))[len(PALETTE) :]
    if counts.max() == 0:
        m = np.median(border, 0)
        return None, m, m
    k = int(counts.argmax())
    return (
        list(sw.BACKGROUNDS)[k],
        np.median(border[lab == len(PALETTE) + k], 0),
        WORLD[len(PALETTE) + k],
    )


def _unmix(d, lines):
    """Pixels minus background d [..., 3] as alpha * line: (alpha, residual distance), each [..., 8]."""
    alpha = (d @ lines.T) / (lines * lines).sum(-1)
    resid = np.sqrt(((d[..., None, :] - alpha[..., None] * lines) ** 2).sum(-1))
    return alpha, resid


def _line_label(d, lines):
    """Palette colour whose background-to-colour line explains each pixel best (coverage >= 0.25)."""
    alpha, resid = _unmix(d, lines)
    return np.where(alpha >= 0.25, resid, np.inf).argmin(-1), np.where(
        alpha >= 0.25, resid, np.inf
    ).min(-1)


def _fit_shape(alpha, ox, oy, s):
    """Best shape for a soft coverage map alpha [h, w] whose top-left pixel is (ox, oy)."""
    mass = float(alpha.sum())
    if mass <= 1.0:
        return None, 0.0, (0.0, 0.0), np.inf
    h, w = alpha.shape
    ys, xs = np.mgrid[0:h, 0:w]
    cx = ox + float((alpha * (xs + 0.5)).sum()) / mass
    cy = oy + float((alpha * (ys + 0.5)).sum()) / mass
    best = (None, 0.0, np.inf)
    for shape in sw.SHAPES:
        e = np.sqrt(mass / sw.SHAPE_AREA[shape])
        t = sw.coverage(shape, cx, cy - sw.SHAPE_CENTROID_DY.get(shape, 0.0) * e, e, ox, oy, w, h)
        norm = float((t * t).sum())
        if norm <= 0:  # the template covers no pixel sample of this crop (seen on model outputs)
            continue
        for sigma in BLURS:
            tb = ndimage.gaussian_filter(t, sigma * s / 64, mode="constant") if sigma else t
            err = float(((alpha - tb) ** 2).sum()) / norm
            if err < best[2]:
                best = (shape, e, err)
    shape, e, err = best
    return (shape if err <= MAX_FIT_ERROR else None), e, (cx, cy), err


def _parts(d, comp, core, lines):
    """Split one component by the palette colours of its core pixels: [(palette index or None,
    territory mask over the ROI)]; one part unless a second colour holds a quarter of the core."""
    lab, _ = _line_label(d[core], lines)
    counts = np.bincount(lab, minlength=len(PALETTE))
    if counts.max() >= 0.75 * counts.sum():
        return [(None, np.ones_like(comp))]
    keep = [int(k) for k in np.flatnonzero(counts >= 0.25 * counts.sum())]
    core_lab = np.full(comp.shape, -1)
    core_lab[core] = lab
    # Every ROI pixel goes to the nearest core pixel of a kept colour.
    _, (iy, ix) = ndimage.distance_transform_edt(~np.isin(core_lab, keep), return_indices=True)
    owner = core_lab[iy, ix]
    return [(k, owner == k) for k in keep]


def detect(image) -> tuple[str | None, list[Detected]]:
    """(background name or None, objects) of a uint8 [S, S, 3] image."""
    img = _check_image(image).astype(np.float32)
    s = img.shape[0]
    bg_name, bg, bg_nominal = _background(img)
    # A global colour shift moves the background and the objects alike: measuring the background
    # and unmixing along nominal colour lines cancels it.
    lines = PALETTE - bg_nominal  # [8, 3]
    smooth = ndimage.gaussian_filter(img, (0.5 * s / 64, 0.5 * s / 64, 0))
    dist = np.sqrt(((smooth - bg) ** 2).sum(-1))
    labels, _ = ndimage.label(dist > FG_DISTANCE, structure=np.ones((3, 3)))
    # Each background pixel belongs to its nearest component: the shape fit sees that territory only.
    _, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    territory = labels[iy, ix]
    min_area = max(4, SPECK_FRACTION * s * s)
    pad = max(3, round(3 * s / 64))
    found = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        y0, y1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, s)
        x0, x1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, s)
        comp = labels[y0:y1, x0:x1] == i
        if comp.sum() < min_area:
            continue
        d = dist[y0:y1, x0:x1]
        core = comp & (d >= CORE_FRACTION * np.percentile(d[comp], 90))
        diff = img[y0:y1, x0:x1] - bg  # [h, w, 3]
        mine = territory[y0:y1, x0:x1] == i
        for k, part in _parts(smooth[y0:y1, x0:x1] - bg, comp, core, lines):
            part_core = part & core
            if (part & comp).sum() < min_area or part_core.sum() < 2:
                continue
            label, resid = _line_label(diff[part_core].mean(0), lines)
            colour = int(label) if k is None else k
            stray = _unmix(diff[part_core], lines[colour : colour + 1])[1].mean()
            if not np.isfinite(resid) or stray > MAX_LINE_RESID:
                continue  # not a flat-coloured object: its pixels stray from the colour's line
            v = lines[colour]
            alpha = np.where(mine & part, (diff @ v) / float(v @ v), 0.0)
            shape, e, (cx, cy), err = _fit_shape(alpha, x0, y0, s)
            found.append(
                Detected(
                    list(sw.COLOURS)[colour], shape, float(e / s), (cx / s, cy / s), float(err)
                )
            )
    return bg_name, found


def _check_image(image):
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] != a.shape[1] or a.dtype != np.uint8:
        raise ValueError(f"expected a square uint8 RGB image [S, S, 3], got {a.dtype} {a.shape}")
    if a.shape[0] < 64:
        warnings.warn(
            f"scoring at {a.shape[0]} px: the spec scores at 64 px or above (a small star "
            "at 32 px is ~6 px wide); these numbers are for fast tests only",
            stacklevel=3,
        )
    return a


def _relation_holds(a: Detected, b: Detected, relation):
    return {
        "to the left of": a.column < b.column,
        "to the right of": a.column > b.column,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[relation]


INVERSE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


def score(image, caption) -> dict:
    """Per-attribute results for one image and its caption (a str or a parsed `Prompt`), and `correct`.

    Attributes the caption does not name are absent. For single / background captions, `size` and
    `position` say whether some object of the named colour and shape has them; `correct` needs one
    object that has everything named.
    """
    prompt = caption if isinstance(caption, sw.Prompt) else sw.parse_caption(caption)
    bg, objects = detect(image)
    want = prompt.objects[0]
    first = [o for o in objects if (o.colour, o.shape) == (want.colour, want.shape)]
    out = {"caption": prompt.text, "kind": prompt.kind}
    if prompt.kind == "relation":
        b = prompt.objects[1]
        second = [o for o in objects if (o.colour, o.shape) == (b.colour, b.shape)]
        out["object"] = bool(first) and bool(second)
        out["relation"] = any(
            _relation_holds(x, y, prompt.relation) for x in first for y in second if x is not y
        )
        joint = out["relation"]
        # diagnostic, not an attribute: with both objects drawn, did the image put them the named way
        # round, the other way round, or in one row / column (neither)?
        if out["object"]:
            reversed_ = any(
                _relation_holds(x, y, INVERSE[prompt.relation])
                for x in first
                for y in second
                if x is not y
            )
            out["relation_order"] = (
                "named" if out["relation"] else ("reversed" if reversed_ else "neither")
            )
    elif prompt.kind == "count":
        out["object"] = bool(first)
        out["count"] = len(first) == prompt.count
        out["count_named"], out["count_drawn"] = (
            prompt.count,
            len(first),
        )  # diagnostic: how many were drawn
        joint = out["count"]
    else:
        out["object"] = bool(first)
        checks = []
        if want.size is not None:
            checks.append(lambda o: o.size == want.size)
            out["size"] = any(o.size == want.size for o in first)
        if want.cell is not None:
            checks.append(lambda o: o.cell == want.cell)
            out["position"] = any(o.cell == want.cell for o in first)
        joint = any(all(c(o) for c in checks) for o in first)
        if prompt.background is not None:
            out["background"] = bg == prompt.background
            joint = joint and out["background"]
    out["correct"] = bool(joint and out["object"])
    out["detected_background"] = bg
    out["detected"] = [
        dataclasses.asdict(o) | {"size": o.size, "cell": sw.CELLS[o.cell]} for o in objects
    ]
    return out


ATTRIBUTES = ("object", "size", "position", "relation", "count", "background")


def _acc(results):
    n = len(results)
    return {"n": n, "accuracy": sum(r["correct"] for r in results) / n if n else None}


def evaluate(images, captions, splits=None) -> dict:
    """Accuracy over prompts: overall, per scene kind, per split (held-out separately), per attribute."""
    if len(images) != len(captions) or (splits is not None and len(splits) != len(captions)):
        raise ValueError(
            f"got {len(images)} images, {len(captions)} captions"
            + (f", {len(splits)} splits" if splits is not None else "")
        )
    prompts = [sw.parse_caption(c) for c in captions]  # every caption checked before any scoring
    results = [score(im, p) for im, p in zip(images, prompts)]
    splits = list(splits) if splits is not None else [None] * len(results)
    for r, sp in zip(results, splits):
        r["split"] = sp
    report = {
        "overall": _acc(results),
        "by_kind": {k: _acc([r for r in results if r["kind"] == k]) for k in sw.KINDS},
        "by_split": {
            sp: _acc([r for r in results if r["split"] == sp])
            for sp in dict.fromkeys(s for s in splits if s is not None)
        },
        "by_attribute": {},
        "results": results,
    }
    for a in ATTRIBUTES:
        vals = [r[a] for r in results if a in r]
        report["by_attribute"][a] = {
            "n": len(vals),
            "accuracy": sum(vals) / len(vals) if vals else None,
        }
    report["heldout"] = report["by_split"].get("heldout")
    report["diagnostics"] = diagnostics(results)
    return report


def diagnostics(results) -> dict:
    """Why relation and count prompts fail. ``relation_order``: of the relation prompts whose two objects
    were both drawn, how many put them the named way round, the other way round (``reversed``: the model
    drew both but ignored the relation word) or in one row / column (``neither``). ``count_drawn``: per
    named count, how many objects of the named colour and shape the images hold ({"2": {"1": 3, ...}})."""
    order = [r["relation_order"] for r in results if "relation_order" in r]
    counts: dict = {}
    for r in results:
        if "count_drawn" in r:
            drawn = counts.setdefault(str(r["count_named"]), {})
            drawn[str(r["count_drawn"])] = drawn.get(str(r["count_drawn"]), 0) + 1
    return {
        "relation_order": {
            "both_drawn": len(order),
            **{k: order.count(k) for k in ("named", "reversed", "neither")},
        },
        "count_drawn": {
            k: dict(sorted(v.items(), key=lambda kv: int(kv[0]))) for k, v in sorted(counts.items())
        },
    }


def format_report(report) -> str:
    rows = [("overall", report["overall"])] + [
        (f"kind: {k}", v) for k, v in report["by_kind"].items()
    ]
    rows += [(f"split: {k}", v) for k, v in report["by_split"].items()]
    rows += [(f"attribute: {k}", v) for k, v in report["by_attribute"].items()]
    lines = [f"{'':24s} {'n':>6s} {'accuracy':>9s}"]
    for name, v in rows:
        if v["n"]:
            lines.append(f"{name:24s} {v['n']:6d} {100 * v['accuracy']:8.1f}%")
    diag = report.get("diagnostics") or {}
    order = diag.get("relation_order") or {}
    if order.get("both_drawn"):
        lines.append(
            f"relations with both objects drawn: {order['both_drawn']} (named order {order['named']}, "
            f"reversed {order['reversed']}, same row / column {order['neither']})"
        )
    for want, drawn in (diag.get("count_drawn") or {}).items():
        lines.append(
            f"count {want}: images holding " + ", ".join(f"{k}: {v}" for k, v in drawn.items())
        )
    return "\n".join(lines)


# ---- Folders of images ---------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_folder(folder, resolution=None, shapes_world: bool = True):
    """(images, captions, splits, names) of a folder; captions from PNG text `prompt`, a same-named
    `.txt`, or `captions.jsonl`; checked (captions parsed, images read) before any scoring.
    ``shapes_world=False``: any caption, any image size (CLIP score)."""

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    jsonl = {}
    if (folder / "captions.jsonl").is_file():
        for n, line in enumerate((folder / "captions.jsonl").read_text().splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                    jsonl[rec["file"]] = (rec["caption"], rec.get("split"))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(
                        f"{folder / 'captions.jsonl'} line {n}: expected "
                        f'{{"file": ..., "caption": ..., "split": ...}}: {e}'
                    ) from None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    images, captions, splits, problems = [], [], [], []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                meta = getattr(im, "text", {}) or {}
                rgb = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported by name
            problems.append(f"{p.name}: unreadable image ({e})")
            continue
        caption, split = meta.get("prompt"), meta.get("split")
        if caption is None and p.with_suffix(".txt").is_file():
            caption = p.with_suffix(".txt").read_text()
        if caption is None and p.name in jsonl:
            caption, split = jsonl[p.name][0], split or jsonl[p.name][1]
        if caption is None:
            problems.append(
                f"{p.name}: no caption (PNG text 'prompt', {p.stem}.txt or captions.jsonl)"
            )
            continue
        try:
            if shapes_world:
                sw.parse_caption(caption)
        except ValueError as e:
            problems.append(f"{p.name}: {e}")
            continue
        if rgb.width != rgb.height and resolution is None and shapes_world:
            problems.append(
                f"{p.name}: not square ({rgb.width} x {rgb.height}); pass a resolution to resize"
            )
            continue
        if resolution is not None and rgb.size != (resolution, resolution):
            rgb = rgb.resize((resolution, resolution), Image.Resampling.BOX)
        images.append(np.asarray(rgb))
        captions.append(caption.strip())
        splits.append(split)
    if problems:
        more = f"\n... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(
            f"{folder}: {len(problems)} of {len(files)} images can't be scored:\n"
            + "\n".join(problems[:10])
            + more
        )
    return images, captions, splits, [p.name for p in files]


def write_json(obj, path):
    """Write JSON atomically (a temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would outlive the rename
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def evaluate_folder(folder, json_out=None, resolution=None, quiet=False) -> dict:
    """Score every image of a folder against its caption; print the table, optionally write JSON."""
    if resolution is not None and resolution < 64:
        warnings.warn(f"resolution {resolution}: the spec scores at 64 px or above", stacklevel=2)
    images, captions, splits, names = read_folder(folder, resolution)
    report = evaluate(images, captions, [s for s in splits] if any(splits) else None)
    for r, name in zip(report["results"], names):
        r["file"] = name
    report["folder"] = str(folder)
    if not quiet:
        print(format_report(report))
    if json_out is not None:
        write_json(report, json_out)
    return report


def degrade(image, rng, blur=1.0, noise=12 / 255, shift=20.0):
    """The validation degradations: Gaussian blur (sigma px), then a per-channel colour shift uniform
    in +-shift, then Gaussian noise (sigma, fraction of 255); uint8 in and out."""
    x = np.asarray(image, np.float32)
    if blur:
        x = ndimage.gaussian_filter(x, (blur, blur, 0))
    x = x + rng.uniform(-shift, shift, 3).astype(np.float32) + rng.normal(0, noise * 255, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
