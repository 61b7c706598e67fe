"""`shapes_world` as a TFDS data set: array_record files, no TensorFlow needed to build or read.

    from jaxdiff.data.shapes_tfds import ShapesWorld
    ShapesWorld(config="64", data_dir=d, split_sizes={"train": 100_000}).download_and_prepare(
        file_format="array_record")
    ds = tfds.data_source("shapes_world/64", data_dir=d)["train"]   # ds[i] == shapes_world.example(...)

Records are stored in index order (`disable_shuffling`), so record i of a split is example i of
`shapes_world.example(split, i, seed)`; the input pipeline shuffles. Captions come back as bytes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxdiff.data import shapes_world as sw

DEFAULT_SPLIT_SIZES = {"train": 100_000, "validation": 10_000, "heldout": 10_000}


@dataclasses.dataclass
class ShapesWorldConfig(tfds.core.BuilderConfig):
    resolution: int = 64


def _features(resolution):
    t, n = tfds.features.Tensor, sw.MAX_OBJECTS
    return tfds.features.FeaturesDict(
        {
            "image": t(shape=(resolution, resolution, 3), dtype=np.uint8, encoding="zlib"),
            "caption": t(shape=(), dtype=np.str_),
            "index": t(shape=(), dtype=np.int64),
            "kind": t(shape=(), dtype=np.int32),  # index into shapes_world.KINDS
            "background": t(shape=(), dtype=np.int32),  # index into BACKGROUNDS
            "relation": t(
                shape=(), dtype=np.int32
            ),  # index into RELATIONS, -1 if not a relation scene
            "num_objects": t(shape=(), dtype=np.int32),
            # Per object, padded to MAX_OBJECTS with -1 (indices) or 0 (geometry, units of S).
            "colour": t(shape=(n,), dtype=np.int32),
            "shape": t(shape=(n,), dtype=np.int32),
            "size": t(shape=(n,), dtype=np.int32),
            "cell": t(shape=(n,), dtype=np.int32),
            "centre": t(shape=(n, 2), dtype=np.float32),
            "extent": t(shape=(n,), dtype=np.float32),
        }
    )


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """The shapes world v1 (`../shared/shapes_world.md`); configs "32", "64" (canonical), "128"."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "shapes world v1"}
    BUILDER_CONFIGS = [
        ShapesWorldConfig(name=str(r), resolution=r, description=f"{r} x {r} px")
        for r in sw.RESOLUTIONS
    ]
    DEFAULT_CONFIG_NAME = "64"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's own lookup imports `importlib_resources`, which tfds does not install.
        return epath.Path(__file__)

    def __init__(self, *, split_sizes: dict | None = None, seed: int = 0, **kwargs):
        """split_sizes: examples per split (missing splits take DEFAULT_SPLIT_SIZES; 0 skips a split).
        seed: the world seed. Both only matter when building: a built data set reports its own split
        sizes (`info.splits`) and seed (`info.metadata["seed"]`)."""
        unknown = set(split_sizes or {}) - set(sw.SPLITS)
        if unknown:
            raise ValueError(
                f"unknown splits {sorted(unknown)}: expected some of {sorted(sw.SPLITS)}"
            )
        self._sizes = {**DEFAULT_SPLIT_SIZES, **(split_sizes or {})}
        if any(n < 0 for n in self._sizes.values()) or not any(self._sizes.values()) or seed < 0:
            raise ValueError(
                f"split sizes and seed must be >= 0 with one split non-empty, got "
                f"{self._sizes}, seed={seed}"
            )
        self._seed = seed
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Procedural captioned shapes (../shared/shapes_world.md): every caption has a "
            "checkable meaning. Labels index the vocabularies in metadata.",
            features=_features(self.builder_config.resolution),
            disable_shuffling=True,  # record i is example i; the input pipeline shuffles
            metadata=tfds.core.MetadataDict(
                seed=self._seed,
                spec="shapes_world v1",
                kinds=list(sw.KINDS),
                backgrounds=list(sw.BACKGROUNDS),
                colours=list(sw.COLOURS),
                shapes=list(sw.SHAPES),
                sizes=list(sw.SIZES),
                cells=list(sw.CELLS),
                relations=list(sw.RELATIONS),
            ),
        )

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s, n) for s, n in self._sizes.items() if n > 0}

    def _generate_examples(self, split, n):
        # Serial: rendering (~0.1 ms at 64 px) is cheaper than TFDS's own per-example work.
        res = self.builder_config.resolution
        for i in range(n):
            yield i, {"index": np.int64(i), **sw.example(split, i, self._seed, res)}


def prepare(
    data_dir,
    resolution: int = 64,
    split_sizes: dict | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> ShapesWorld:
    """Build (or find already built) `shapes_world/<resolution>` under data_dir; array_record files.

    An existing build with other split sizes or another seed is an error unless overwrite. TFDS
    writes into a temporary folder and renames it when complete, so nothing half-written remains.
    """
    if resolution not in sw.RESOLUTIONS:
        raise ValueError(f"resolution {resolution}: expected one of {sw.RESOLUTIONS}")
    builder = ShapesWorld(
        config=str(resolution), data_dir=str(data_dir), split_sizes=split_sizes, seed=seed
    )
    if builder.is_prepared():
        want = {s: n for s, n in builder._sizes.items() if n > 0}
        have = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
        have_seed = builder.info.metadata.get("seed")
        if want == have and have_seed == seed:
            return builder
        if not overwrite:
            raise FileExistsError(
                f"{builder.data_dir} holds a build with splits {have} and seed "
                f"{have_seed}, not {want} and seed {seed}: pass overwrite=True "
                "(--overwrite) or another data dir"
            )
        epath.Path(builder.data_dir).rmtree()
        builder = ShapesWorld(
            config=str(resolution), data_dir=str(data_dir), split_sizes=split_sizes, seed=seed
        )
    builder.download_and_prepare(file_format="array_record")
    return builder
