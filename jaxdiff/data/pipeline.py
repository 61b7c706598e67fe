"""The input pipeline: any random-access source -> host batches -> global `jax.Array`s on the mesh.

    pipe = make_pipeline(open_source("folder:/data/pets"), PipelineConfig(resolution=64, global_batch=256),
                         tokenizer=Tokenizer("sd15/tokenizer"))
    it = iter(pipe.dataset)                       # a grain DatasetIterator
    batch = next(it)                              # {"image": f32 [B, S, S, 3] in [-1, 1], "tokens": i32 [B, 77],
                                                  #  "caption": list[str]}, B = global_batch / hosts
    arrays = to_global(batch, mesh)               # "image", "tokens" as jax.Arrays split over (data, fsdp)
    blob = state_to_bytes(it); ...; restore_state(it, blob)   # exact resume

Built on grain's Dataset API (`MapDataset` -> `IterDataset`): the per-host shard, the shuffle and the
epochs are index arithmetic on the `MapDataset`, so the iterator's whole state is one element index
(`{"next_index": i}`): checkpoints are tiny and resuming is exact, skipped records included.
"""

from __future__ import annotations

import atexit
import dataclasses
import io
import json
import multiprocessing
import os
import sys
import warnings
import weakref
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageOps
from tqdm import tqdm

from jaxdiff import sharding as sh
from jaxdiff.data import shapes_tfds  # noqa: F401  (registers the shapes_world builder with tfds)
from jaxdiff.data import shapes_world as sw
from jaxdiff.data.folder import SkipLog, open_folder
from jaxdiff.tokenizer import Tokenizer

STATE_VERSION = 1


# --- decoding: raw record -> {"image": uint8 [S, S, 3], "caption": str} -----------------------------


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` and crop the centre square, as one resample of the centre box."""
    w, h = img.size
    side = min(w, h)
    if w == h == size:
        return img
    left, top = (w - side) / 2, (h - side) / 2
    return img.resize(
        (size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
    )


def load_image(image, size: int) -> np.ndarray:
    """Encoded bytes (JPEG, PNG, WebP, ...) or a uint8 array -> uint8 [size, size, 3], EXIF-upright."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8, got {image.dtype}")
        if image.shape == (size, size, 3):
            return image  # already at the training resolution (e.g. a shapes_world TFDS split)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        img = Image.fromarray(image)
    else:
        img = Image.open(io.BytesIO(bytes(image)))
        img.draft(
            "RGB", (size, size)
        )  # JPEG: let libjpeg decode at 1/2, 1/4, 1/8 scale, never below size
        img = ImageOps.exif_transpose(img)  # loads the pixels; raises on corrupt or truncated data
    return np.asarray(center_crop_resize(img.convert("RGB"), size))


def caption_text(caption) -> str:
    if isinstance(caption, np.ndarray):
        caption = caption.item()
    if isinstance(caption, bytes):
        return caption.decode("utf-8", errors="replace")
    if isinstance(caption, str):
        return caption
    raise TypeError(f"captions must be str or bytes, got {type(caption).__name__}")


def _skip_reason(err: Exception) -> str:
    msg = str(err)
    if isinstance(err, Image.DecompressionBombError):
        return "image too large (decompression bomb guard)"
    if "truncated" in msg:
        return "truncated image"
    if isinstance(err, Image.UnidentifiedImageError):
        return "not a decodable image"
    return f"corrupt image ({type(err).__name__})"


class DecodeExample:
    """grain map op: record -> {"image", "caption"}, or None (counted in `skips`) when it will not decode.

    `at(index, record)` is the `map_with_index` form: a record that failed once is skipped unread
    in later epochs, and counts once.
    """

    def __init__(
        self,
        resolution: int,
        skips: SkipLog | None = None,
        records: int | None = None,
        reachable: int | None = None,
    ):
        self.resolution = resolution
        self.skips = skips if skips is not None else SkipLog()
        self.records = records  # source length: indices wrap per epoch
        self.reachable = reachable or records  # records this host reads (its shard)

    def __call__(self, record: dict) -> dict | None:
        return self.at(None, record)

    def at(self, index: int | None, record: dict) -> dict | None:
        key = None if index is None or self.records is None else index % self.records
        if key is not None and key in self.skips.keys:
            return self._none()
        name = str(record.get("name") or f"record {key}")
        if record.get("image") is None:
            self.skips.add(record.get("error", "no image"), name, key)
            return self._none()
        try:
            image = load_image(record["image"], self.resolution)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # PIL reports corrupt data as OSError / ValueError / SyntaxError, depending on the format.
            self.skips.add(_skip_reason(e), name, key)
            return self._none()
        return {"image": image, "caption": caption_text(record.get("caption", ""))}

    def _none(self):
        # With every record of the source bad, an endless repeat would spin forever: stop instead.
        if self.reachable is not None and len(self.skips.keys) >= self.reachable:
            raise RuntimeError(
                f"none of the {self.reachable} records of this host decodes: {self.skips.as_dict()}"
            )
        return None


class Collate:
    """grain batch_fn: examples -> {"image": [B, S, S, 3], "caption": list[str], "tokens": int32 [B, L]}."""

    def __init__(self, tokenizer=None, image_dtype: str = "float32"):
        self.tokenizer = tokenizer
        self.image_dtype = image_dtype
        self.truncated = 0  # captions longer than the tokenizer's context (warned about once)

    def __call__(self, examples) -> dict:
        return self.from_arrays(
            np.stack([e["image"] for e in examples]), [e["caption"] for e in examples]
        )

    def from_arrays(self, images: np.ndarray, captions: list[str]) -> dict:
        """uint8 [B, S, S, 3] images and their captions -> the batch."""
        if self.image_dtype == "float32":
            images = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # [-1, 1]
        batch = {"image": images, "caption": list(captions)}
        if self.tokenizer is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                batch["tokens"] = self.tokenizer(batch["caption"])
            n = sum("truncated" in str(w.message) for w in caught)
            if n and not self.truncated:
                warnings.warn(
                    f"captions longer than {self.tokenizer.max_length} tokens are truncated "
                    f"(counted in Collate.truncated; first: {caught[0].message})",
                    stacklevel=2,
                )
            self.truncated += n
        return batch


# --- the pipeline ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    resolution: int = 64
    global_batch: int = 64  # over all hosts; each host makes global_batch / shard_count
    seed: int = 0  # shuffle seed; epochs reshuffle as a function of (seed, epoch)
    num_epochs: int | None = None  # None: repeat forever
    shuffle: bool = True
    image_dtype: str = "float32"  # "float32": [-1, 1]; "uint8": [0, 255]
    shard_index: int | None = None  # default jax.process_index()
    shard_count: int | None = None  # default jax.process_count()
    num_threads: int = 4  # decode threads (PIL releases the GIL while decoding and resizing)
    prefetch_examples: int = 256  # decoded examples read ahead
    prefetch_batches: int = 2  # collated (tokenised) batches read ahead, in one more thread
    workers: int = 0  # > 0: decode in that many processes (grain mp_prefetch) instead


@dataclasses.dataclass(frozen=True)
class Pipeline:
    dataset: Any  # iter() it for a checkpointable iterator (grain's DatasetIterator,
    # or the array path's, for an ArraySource)
    per_host_batch: int
    shard: tuple[int, int]  # (index, count)
    shard_records: int  # records this host reads per epoch
    skips: SkipLog  # records that would not decode, per reason (this process only)
    collate: Collate


def _shard_bounds(n: int, index: int, count: int) -> tuple[int, int]:
    # Contiguous, equal shards: every host has the same epoch length; the last n % count records drop.
    per = n // count
    return index * per, (index + 1) * per


def _shuffle_seed(seed: int) -> int:
    # grain reseeds epoch e with seed + e; hashing the user seed keeps seed s epoch 1 != seed s+1 epoch 0.
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def make_pipeline(source, config: PipelineConfig = PipelineConfig(), tokenizer=None) -> Pipeline:
    """Host-sharded, shuffled, decoded, batched and tokenised examples from a random-access `source`."""

    cfg = config
    if cfg.image_dtype not in ("float32", "uint8"):
        raise ValueError(f"image_dtype must be 'float32' or 'uint8', got {cfg.image_dtype!r}")
    if cfg.resolution < 1 or cfg.global_batch < 1:
        raise ValueError(
            f"resolution and global_batch must be positive, got {cfg.resolution}, "
            f"{cfg.global_batch}"
        )
    if cfg.num_epochs is not None and cfg.num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {cfg.num_epochs}")
    count = jax.process_count() if cfg.shard_count is None else cfg.shard_count
    index = jax.process_index() if cfg.shard_index is None else cfg.shard_index
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1} (shard_count {count})")
    if cfg.global_batch % count:
        raise ValueError(
            f"global batch {cfg.global_batch} does not split over {count} hosts: "
            f"make it a multiple of {count}"
        )
    n = len(source)
    if n == 0:
        raise ValueError("the data source is empty")
    lo, hi = _shard_bounds(n, index, count)
    if hi == lo:
        raise ValueError(f"{n} records cannot be shared by {count} hosts (each needs at least one)")
    if isinstance(tokenizer, (str, bytes)) or hasattr(tokenizer, "__fspath__"):
        tokenizer = Tokenizer(tokenizer)

    skips = SkipLog()
    per_host = cfg.global_batch // count
    collate = Collate(tokenizer, cfg.image_dtype)
    array_path = (
        isinstance(source, ArraySource)
        and source.images.shape[1:3] == (cfg.resolution, cfg.resolution)
        and cfg.workers == 0
    )
    if array_path:
        fingerprint = {
            "version": STATE_VERSION,
            "records": n,
            "shard": [index, count],
            "seed": cfg.seed,
            "shuffle": cfg.shuffle,
            "workers": 0,
            "path": "array",
        }
        ds = _ArrayDataset(source, lo, hi, per_host, cfg, collate, fingerprint)
        return Pipeline(ds, per_host, (index, count), hi - lo, skips, collate)
    # Decoding is lazy, so mapping it before the shard and shuffle (index arithmetic) costs nothing
    # and lets it see each record's source index.
    ds = grain.MapDataset.source(source).map_with_index(
        DecodeExample(cfg.resolution, skips, n, hi - lo).at
    )
    ds = ds[lo:hi]
    if cfg.shuffle:
        ds = ds.shuffle(seed=_shuffle_seed(cfg.seed))
    ds = ds.repeat(cfg.num_epochs)
    if cfg.workers > 0:  # each worker process decodes every workers-th example
        if not flags.FLAGS.is_parsed():
            # grain 0.2.18's mp_prefetch reads an absl flag, which raises unless flags were parsed
            # (google/grain#1355, fixed after 0.2.18): defaults are what we want.
            flags.FLAGS.mark_as_parsed()
        it = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        ).mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers))
    else:
        it = ds.to_iter_dataset(
            grain.ReadOptions(
                num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_examples
            )
        )
    it = it.batch(per_host, drop_remainder=True, batch_fn=collate)
    if cfg.prefetch_batches > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(
            it, prefetch_buffer_size=cfg.prefetch_batches
        )
    fingerprint = {
        "version": STATE_VERSION,
        "records": n,
        "shard": [index, count],
        "seed": cfg.seed,
        "shuffle": cfg.shuffle,
        "workers": cfg.workers,
    }
    return Pipeline(
        _Fingerprinted(it, fingerprint), per_host, (index, count), hi - lo, skips, collate
    )


class _Fingerprinted(grain.IterDataset):
    """Stamps the iterator state with what the position means, so a mismatched restore is an error."""

    def __init__(self, parent: grain.IterDataset, fingerprint: dict):
        super().__init__(parent)
        self._fingerprint = fingerprint

    def __iter__(self):
        return _FingerprintedIterator(self._parent.__iter__(), self._fingerprint)


class _FingerprintedIterator(grain.DatasetIterator):
    def __init__(self, parent, fingerprint: dict):
        super().__init__(parent)
        self._fingerprint = fingerprint
        _LIVE.add(self)

    def close(self) -> None:
        super().close()
        # Let the closed grain iterators go now: grain 0.2.18's prefetch iterators print errors when
        # first collected during interpreter teardown.
        self._parents = ()

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return {"pipeline": dict(self._fingerprint), "position": self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        _check_fingerprint(state, self._fingerprint)
        self._parent.set_state(state["position"])


def _check_fingerprint(state, fingerprint: dict) -> None:
    saved = state.get("pipeline") if isinstance(state, dict) else None
    if saved is None or "position" not in state:
        raise ValueError("not a jaxdiff input pipeline state (no 'pipeline' / 'position' keys)")
    diff = {
        k: (saved.get(k), fingerprint.get(k))
        for k in {**saved, **fingerprint}
        if saved.get(k) != fingerprint.get(k)
    }
    if diff:
        said = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"the saved data position belongs to a different pipeline ({said}); "
            "resume with the same data, seed and host count, or start the data afresh"
        )


# --- in-memory arrays: whole batches by one gather ------------------------------------------------


class ArraySource:
    """Decoded images in one uint8 array [N, S, S, 3] with their captions.

    A random-access source like any other (`src[i]` -> {"image", "caption"}), and `make_pipeline`
    batches it without per-example work: each batch is one gather from the array (its shuffle is
    its own, not grain's; the state is again one element index, so resuming is exact).
    """

    def __init__(self, images: np.ndarray, captions):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"ArraySource images must be uint8 [N, S, S, 3], got {images.dtype} {images.shape}"
            )
        captions = [caption_text(c) for c in captions]
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.images, self.captions = images, captions

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i) -> dict:
        return {"image": self.images[i], "caption": self.captions[i]}


class _ArrayDataset:
    def __init__(
        self,
        source: ArraySource,
        lo: int,
        hi: int,
        per_host: int,
        cfg: PipelineConfig,
        collate: Collate,
        fingerprint: dict,
    ):
        self.source, self.lo, self.n, self.batch = source, lo, hi - lo, per_host
        self.cfg, self.collate, self.fingerprint = cfg, collate, fingerprint

    def __iter__(self):
        return _ArrayIterator(self)


class _ArrayIterator:
    """Element position p -> epoch p // n, the (seed, epoch) permutation's entry p % n of this host's
    shard. A batch is positions p .. p + B - 1 (an epoch boundary may fall inside it, as in grain's
    repeat-then-batch); `prefetch_batches` of them are built ahead in two threads."""

    def __init__(self, ds: _ArrayDataset):
        self.ds, self.pos, self._perms = ds, 0, {}
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="jaxdiff-array-batches")
        self._ahead: list = []  # (position, future) of the batches read ahead, in order
        _LIVE.add(self)

    def __iter__(self):
        return self

    def _perm(self, epoch: int) -> np.ndarray:
        # A pure function of (seed, epoch), cached for the epoch before and this one. Two threads build
        # batches, so the cache is replaced whole (never mutated) and the local result returned.
        perm = self._perms.get(epoch)
        if perm is None:
            n = self.ds.n
            perm = (
                np.random.default_rng([_shuffle_seed(self.ds.cfg.seed), epoch]).permutation(n)
                if self.ds.cfg.shuffle
                else np.arange(n)
            )
            self._perms = {**{e: p for e, p in self._perms.items() if e >= epoch - 1}, epoch: perm}
        return perm

    def _indices(self, pos: int) -> np.ndarray:
        epochs, offs = np.divmod(np.arange(pos, pos + self.ds.batch), self.ds.n)
        return self.ds.lo + np.concatenate(
            [self._perm(int(e))[offs[epochs == e]] for e in np.unique(epochs)]
        )

    def _make(self, pos: int) -> dict:
        idx = self._indices(pos)
        return self.ds.collate.from_arrays(
            self.ds.source.images[idx], [self.ds.source.captions[i] for i in idx]
        )

    def _exhausted(self, pos: int) -> bool:
        epochs = self.ds.cfg.num_epochs
        return epochs is not None and pos + self.ds.batch > epochs * self.ds.n

    def _fill(self):
        depth = max(1, self.ds.cfg.prefetch_batches)
        nxt = self._ahead[-1][0] + self.ds.batch if self._ahead else self.pos
        while len(self._ahead) < depth and not self._exhausted(nxt):
            self._ahead.append((nxt, self._pool.submit(self._make, nxt)))
            nxt += self.ds.batch

    def __next__(self) -> dict:
        self._fill()
        if not self._ahead:
            raise StopIteration
        pos, fut = self._ahead.pop(0)
        batch = fut.result()
        self.pos = pos + self.ds.batch
        self._fill()
        return batch

    def get_state(self) -> dict:
        return {"pipeline": dict(self.ds.fingerprint), "position": {"next_index": self.pos}}

    def set_state(self, state: dict) -> None:
        _check_fingerprint(state, self.ds.fingerprint)
        for _, fut in self._ahead:
            fut.cancel()
        self._ahead = []
        self.pos = int(state["position"]["next_index"])

    def close(self) -> None:
        self._ahead = []
        self._pool.shutdown(wait=False, cancel_futures=True)


_LIVE: weakref.WeakSet = weakref.WeakSet()
atexit.register(lambda: [it.close() for it in list(_LIVE)])


def state_to_bytes(iterator) -> bytes:
    """The iterator's position as JSON bytes (store it beside the model checkpoint)."""
    return json.dumps(iterator.get_state(), sort_keys=True).encode()


def restore_state(iterator, state: bytes | str | dict) -> None:
    """Move `iterator` to a position from `state_to_bytes` (or `get_state()`)."""
    iterator.set_state(json.loads(state) if isinstance(state, (bytes, str)) else state)


# --- sources --------------------------------------------------------------------------------------


def synthetic_source(n: int = 1024, resolution: int = 64, seed: int = 0) -> list[dict]:
    """In-memory decoded uint8 arrays with captions (tests and throughput)."""
    rng = np.random.default_rng(seed)
    words = ("red", "blue", "small", "large", "circle", "square", "on the left", "at the top")
    return [
        {
            "image": rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8),
            "caption": " ".join(rng.choice(words, 4)),
        }
        for _ in range(n)
    ]


def _shapes_chunk(args) -> tuple[np.ndarray, list[str]]:
    """Examples ``indices`` of a split, rendered."""
    split, indices, seed, resolution, canonical, shared = args
    scenes = [sw.sample_scene(split, int(i), seed, canonical, shared) for i in indices]
    return np.stack([sw.render(s, resolution) for s in scenes]), [s.caption for s in scenes]


def kind_quotas(n: int, mix: dict[str, float]) -> dict[str, int]:
    """How many of n examples each scene kind gets: the named kinds their fractions of n, the others
    an equal share of what is left (rounded so that the quotas add up to n)."""
    bad = sorted(set(mix) - set(sw.KINDS))
    if bad:
        raise ValueError(f"unknown scene kind(s) {bad}: expected some of {list(sw.KINDS)}")
    if any(not 0 <= f <= 1 for f in mix.values()) or sum(mix.values()) > 1 + 1e-9:
        raise ValueError(f"kind fractions must lie in [0, 1] and add up to at most 1, got {mix}")
    rest = [k for k in sw.KINDS if k not in mix]
    if not rest and abs(sum(mix.values()) - 1) > 1e-6:
        raise ValueError(f"kind fractions name every kind, so they must add up to 1, got {mix}")
    share = (1 - sum(mix.values())) / len(rest) if rest else 0.0
    frac = {k: mix.get(k, share) for k in sw.KINDS}
    quotas = {k: int(n * f) for k, f in frac.items()}
    for k in sorted(frac, key=lambda k: n * frac[k] - quotas[k], reverse=True)[
        : n - sum(quotas.values())
    ]:
        quotas[k] += 1  # largest remainders first
    return quotas


def _indices_by_kind(split: str, n: int, seed: int, mix: dict[str, float]) -> np.ndarray:
    """The first examples of `split`, in index order, that fill each kind's quota (see `kind_quotas`)."""
    left = kind_quotas(n, mix)
    out, i = [], 0
    while len(out) < n:
        kind = sw.sample_scene(split, i, seed).kind
        if left[kind] > 0:
            left[kind] -= 1
            out.append(i)
        i += 1
    return np.asarray(out, np.int64)


def shapes_world_memory(
    n: int,
    resolution: int = 64,
    split: str = "train",
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    kinds: dict[str, float] | None = None,
    canonical: bool = False,
    shared: float = 0.0,
) -> ArraySource:
    """Examples 0..n-1 of a shapes_world split rendered into memory, in processes: no TFDS build needed.

    Record i equals record i of a TFDS build with the same seed (`jaxdiff data build`), whose default
    is 0. 100,000 examples at 64 px take 1.2 GB and ~1 ms of one core each.

    `kinds` ({"relation": 0.5, ...}) changes the mix of scene kinds (equal by default): the source holds
    the split's first examples of each kind, in index order, up to the kind's share of n (kinds not
    named share the rest equally), so record i is no longer example i.

    `canonical`: relation scenes drawn in their canonical layout (`A above B`: A in the top row, B in
    the bottom one; `shapes_world.sample_scene`), still true to their captions: what the relation
    fine-tune of docs/shapes_sd.md (attempt 15) trains on.

    `shared` (in [0, 1]): that fraction of relation scenes has B redrawn to share A's colour or shape
    (`shapes_world.sample_scene`; their captions name the new B), the pairs whose attributes a model swaps
    or copies most often (docs/shapes_sd.md, attempt 18).
    """

    if n < 1:
        raise ValueError(f"shapes_world_memory needs n >= 1 examples, got {n}")
    if split not in sw.SPLITS or resolution not in sw.RESOLUTIONS:
        raise ValueError(
            f"split must be one of {sorted(sw.SPLITS)} and resolution one of {sw.RESOLUTIONS}, "
            f"got {split!r}, {resolution}"
        )
    if not 0 <= shared <= 1:
        raise ValueError(f"shapes_world_memory: shared must lie in [0, 1], got {shared}")
    workers = workers or max(1, min(32, (os.cpu_count() or 1) - 1))
    indices = _indices_by_kind(split, n, seed, kinds) if kinds else np.arange(n)
    step = max(1, min(2000, -(-n // (4 * workers))))
    chunks = [
        (split, indices[lo : lo + step], seed, resolution, canonical, shared)
        for lo in range(0, n, step)
    ]
    images = np.empty((n, resolution, resolution, 3), np.uint8)
    captions: list[str] = []
    bar = None
    if progress:
        bar = tqdm(total=n, desc=f"rendering shapes_world/{split} at {resolution} px", unit="ex")

    def take(chunk_images, chunk_captions):
        images[len(captions) : len(captions) + len(chunk_captions)] = chunk_images
        captions.extend(chunk_captions)
        if bar is not None:
            bar.update(len(chunk_captions))

    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if workers > 1 and main_file and os.path.exists(main_file):
        # spawn, not fork: the caller usually runs JAX's threads already. spawn re-imports the main
        # script, so it needs one on disk (not `python -` or a notebook): else render in this process.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for chunk_out in pool.map(_shapes_chunk, chunks):
                take(*chunk_out)
    else:
        for chunk in chunks:
            take(*_shapes_chunk(chunk))
    if bar is not None:
        bar.close()
    return ArraySource(images, captions)


def open_source(
    spec: str,
    resolution: int = 64,
    split: str = "train",
    *,
    kinds: Mapping[str, float] | None = None,
    canonical: bool = False,
    shared: float = 0.0,
):
    """`folder:DIR` | `shapes_world:DATA_DIR` (the TFDS build at `resolution`) | `shapes_world_memory:N`
    (the split's first N examples rendered into memory; no build) | `synthetic[:N]`.

    `kinds`, `canonical` and `shared` shape a `shapes_world_memory` source (see `shapes_world_memory`;
    a training config's `data.shapes`); other sources refuse them."""
    kind, _, arg = spec.partition(":")
    if kind != "shapes_world_memory" and (kinds or canonical or shared):
        raise ValueError(
            f"{spec!r}: kinds, canonical and shared (data.shapes) shape rendered shapes-world sources "
            "(shapes_world_memory:N) only"
        )
    if kind == "folder" and arg:
        return open_folder(arg)
    if kind == "shapes_world" and arg:
        built = Path(arg).expanduser() / "shapes_world" / str(resolution)
        if not built.is_dir():
            raise FileNotFoundError(
                f"{built}: no shapes_world build at {resolution} px under {arg} "
                f"(build it first: see docs/input_pipeline.md)"
            )
        return tfds.data_source(
            f"shapes_world/{resolution}", split=split, data_dir=str(Path(arg).expanduser())
        )
    if kind == "shapes_world_memory":
        if ":" in arg:
            raise ValueError(
                f"{spec!r}: a source names only the examples (shapes_world_memory:N); the scene mix, "
                "canonical layouts and shared pairs are data.shapes.kinds, .canonical and .shared"
            )
        try:
            n = int(arg.replace("_", ""))
        except ValueError:
            raise ValueError(
                f"{spec!r}: expected shapes_world_memory:N with N a number of examples"
            ) from None
        return shapes_world_memory(
            n,
            resolution,
            split,
            kinds=dict(kinds or {}) or None,
            canonical=canonical,
            shared=shared,
        )
    if kind == "synthetic":
        return synthetic_source(int(arg) if arg else 1024, resolution)
    raise ValueError(
        f"unknown source {spec!r}: expected folder:DIR, shapes_world:DATA_DIR, shapes_world_memory:N "
        "or synthetic[:N]"
    )


# --- host batch -> global arrays ------------------------------------------------------------------


def batch_sharding(mesh, rules=None):
    """NamedSharding of a batch's leading axis, from the BATCH rule of `rules` (default data parallel)."""

    axes = dict(sh.DATA_PARALLEL if rules is None else rules).get(sh.BATCH)
    return NamedSharding(mesh, P(axes))


def to_global(batch: dict[str, Any], mesh, rules=None) -> dict:
    """Every numeric array of a host batch -> one global `jax.Array` split over the mesh's batch axes.

    Non-numeric entries (captions) stay on the host and are left out.
    """

    sharding = batch_sharding(mesh, rules)
    axes = sharding.spec[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    split = int(np.prod([mesh.shape[a] for a in axes]))
    out = {}
    for key, value in batch.items():
        if not (isinstance(value, np.ndarray) and value.dtype.kind in "biuf"):
            continue
        global_rows = value.shape[0] * jax.process_count()
        if global_rows % split:
            raise ValueError(
                f"global batch {global_rows} does not split over the mesh's batch axes "
                f"{axes} ({split} ways): make the global batch a multiple of {split}"
            )
        out[key] = jax.make_array_from_process_local_data(
            sharding, value, (global_rows,) + value.shape[1:]
        )
    return out
