"""The input pipeline: decode/crop, shuffling, exact resume, host sharding, tokens, global arrays on 8 devices."""

import io
import json

import jax
import numpy as np
import pytest
from PIL import Image

from jaxdiff import sharding as sh
from jaxdiff.data import pipeline as pl
from jaxdiff.tokenizer import Tokenizer, write_clip_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))


def png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def source(n=40, res=8, bad=(5, 17)):
    """n records with caption 'item i'; mixed encoded PNGs and arrays; `bad` ones are not images."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
        image = b"garbage" if i in bad else (png(img) if i % 2 else img)
        out.append({"image": image, "caption": f"item {i}".encode() if i % 3 else f"item {i}"})
    return out


def config(**kw):
    return pl.PipelineConfig(
        **{
            "resolution": 8,
            "global_batch": 4,
            "shard_index": 0,
            "shard_count": 1,
            "num_threads": 3,
            "prefetch_examples": 16,
            **kw,
        }
    )


def captions(batches):
    return [c for b in batches for c in b["caption"]]


def take(it, k):
    return [next(it) for _ in range(k)]


# --- decoding -------------------------------------------------------------------------------------


def test_center_crop_resize_of_a_ramp():
    # Landscape ramp, pixel value = column: the centre square is columns 64..191, so output column j
    # samples source column 64 + 2 j + 0.5 (bicubic reproduces a linear ramp away from the edges).
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (128, 256, 3)).copy()
    out = pl.load_image(png(ramp), 64).astype(np.float64)
    assert out.shape == (64, 64, 3)
    assert (out == out[:1]).all()  # constant down every column
    j = np.arange(3, 61)
    np.testing.assert_allclose(out[0, j, 0], 64.5 + 2 * j, atol=1.0)
    # Portrait: the same ramp along the rows, cropped to rows 64..191.
    out_t = pl.load_image(png(np.ascontiguousarray(ramp.transpose(1, 0, 2))), 64).astype(np.float64)
    np.testing.assert_array_equal(out_t, out.transpose(1, 0, 2))
    # Already square at the resolution: passed through untouched.
    img = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pl.load_image(png(img), 16), img)
    np.testing.assert_array_equal(pl.load_image(img[..., :1], 16), np.repeat(img[..., :1], 3, -1))
    up = pl.load_image(np.full((4, 6, 3), 77, np.uint8), 10)
    assert up.shape == (10, 10, 3) and (up == 77).all()


def test_exif_orientation_is_applied():
    # Stored 40x20 with the left half red; EXIF orientation 6 means "rotate 90 degrees clockwise to view",
    # so upright the red half is on top. Without the transpose the crop would be red left, blue right.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    img, exif = Image.fromarray(arr), Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=100, exif=exif)
    out = pl.load_image(buf.getvalue(), 16).astype(int)
    assert (np.abs(out[:6] - (255, 0, 0)) < 40).all() and (
        np.abs(out[10:] - (0, 0, 255)) < 40
    ).all()


def test_images_float_and_uint8_exact(tok):
    src = [
        {"image": np.full((8, 8, 3), v, np.uint8), "caption": "a photo of a cat"}
        for v in (0, 255, 51, 204)
    ]
    it = iter(pl.make_pipeline(src, config(shuffle=False, num_epochs=1), tok).dataset)
    b = next(it)
    assert b["image"].dtype == np.float32 and b["image"].shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(b["image"][:, 0, 0, 0], np.float32([-1.0, 1.0, -0.6, 0.6]))
    np.testing.assert_array_equal(b["tokens"][0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])
    assert b["tokens"].dtype == np.int32 and b["tokens"].shape == (4, 77)
    u = next(
        iter(
            pl.make_pipeline(src, config(shuffle=False, num_epochs=1, image_dtype="uint8")).dataset
        )
    )
    np.testing.assert_array_equal(u["image"], np.stack([s["image"] for s in src]))
    assert "tokens" not in u


def test_tokens_match_the_tokenizer(tok):
    b = next(iter(pl.make_pipeline(source(), config(), tok).dataset))
    np.testing.assert_array_equal(b["tokens"], tok(b["caption"]))
    assert all(isinstance(c, str) and c.startswith("item ") for c in b["caption"])  # bytes decoded


# --- order, resume, hosts -------------------------------------------------------------------------


def test_shuffle_is_seeded_and_epochs_reshuffle():
    src = source(bad=())
    epoch = 40 // 4
    a = captions(take(iter(pl.make_pipeline(src, config(seed=0)).dataset), 2 * epoch))
    again = captions(take(iter(pl.make_pipeline(src, config(seed=0)).dataset), 2 * epoch))
    other = captions(take(iter(pl.make_pipeline(src, config(seed=1)).dataset), 2 * epoch))
    assert a == again and a != other
    assert sorted(a[:40]) == sorted(a[40:]) == sorted(f"item {i}" for i in range(40))
    assert a[:40] != a[40:]  # the second epoch is a different permutation
    assert other[:40] != a[40:]  # seed 1 epoch 0 is not seed 0 epoch 1


def test_resume_is_exact(tok):
    src = source(n=30)  # 28 usable records: batches cross epoch boundaries
    cfg = config(global_batch=6)
    pipe = pl.make_pipeline(src, cfg, tok)
    it = iter(pipe.dataset)
    take(it, 7)
    blob = pl.state_to_bytes(it)
    a = take(it, 5)
    it2 = iter(pl.make_pipeline(src, cfg, tok).dataset)
    pl.restore_state(it2, blob)
    b = take(it2, 5)
    for x, y in zip(a, b):
        assert x["caption"] == y["caption"]
        assert (
            x["image"].tobytes() == y["image"].tobytes()
            and x["tokens"].tobytes() == y["tokens"].tobytes()
        )
    assert dict(pipe.skips.counts) == {"not a decodable image": 2}  # 2 bad records, met in 4 epochs
    # Restoring to an earlier position of a running iterator rewinds it.
    pl.restore_state(it, blob)
    assert captions(take(it, 5)) == captions(a)
    state = json.loads(blob)
    assert state["pipeline"]["records"] == 30 and isinstance(state["position"]["next_index"], int)


def test_grain_orbax_handler_round_trip(tmp_path):
    # The training engine checkpoints the iterator with grain's orbax handler: it must take ours.
    from etils import epath
    from grain.checkpoint import CheckpointHandler

    it = iter(pl.make_pipeline(source(), config()).dataset)
    take(it, 3)
    CheckpointHandler().save(epath.Path(tmp_path), it)
    a = captions(take(it, 4))
    fresh = iter(pl.make_pipeline(source(), config()).dataset)
    CheckpointHandler().restore(epath.Path(tmp_path), fresh)
    assert captions(take(fresh, 4)) == a
    assert json.loads((tmp_path / "process_0-of-1.json").read_text())["pipeline"]["shard"] == [0, 1]


def test_restore_refuses_another_pipeline():
    it = iter(pl.make_pipeline(source(), config()).dataset)
    blob = pl.state_to_bytes(it)
    other = iter(pl.make_pipeline(source(), config(seed=3)).dataset)
    with pytest.raises(ValueError, match="different pipeline.*seed: saved 0, now 3"):
        pl.restore_state(other, blob)
    hosts = iter(pl.make_pipeline(source(), config(shard_count=2)).dataset)
    with pytest.raises(ValueError, match=r"shard: saved \[0, 1\], now \[0, 2\]"):
        pl.restore_state(hosts, blob)
    with pytest.raises(ValueError, match="not a jaxdiff input pipeline state"):
        pl.restore_state(it, {"next_index": 3})


def test_host_shards_are_disjoint_and_complete():
    src = source(n=48, bad=())
    one = captions(pl.make_pipeline(src, config(global_batch=8, num_epochs=1)).dataset)
    shards = []
    for i in range(2):
        pipe = pl.make_pipeline(
            src, config(global_batch=8, num_epochs=1, shard_index=i, shard_count=2)
        )
        assert pipe.per_host_batch == 4 and pipe.shard_records == 24
        shards.append(captions(pipe.dataset))
    assert len(one) == 48 and len(shards[0]) == len(shards[1]) == 24
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(one)


def test_all_bad_records_stop_instead_of_spinning():
    src = [{"image": b"nope", "caption": "x"}] * 4
    with pytest.raises(RuntimeError, match="none of the 4 records of this host decodes"):
        next(iter(pl.make_pipeline(src, config(global_batch=2)).dataset))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="global batch 6 does not split over 4 hosts"):
        pl.make_pipeline(source(), config(global_batch=6, shard_count=4))
    with pytest.raises(ValueError, match="source is empty"):
        pl.make_pipeline([], config())
    with pytest.raises(ValueError, match="shard index 2 is outside 0..1"):
        pl.make_pipeline(source(), config(shard_index=2, shard_count=2))
    with pytest.raises(ValueError, match="image_dtype"):
        pl.make_pipeline(source(), config(image_dtype="float16"))
    with pytest.raises(ValueError, match="unknown source 'imagenet:/x'"):
        pl.open_source("imagenet:/x")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        pl.open_source("folder:/definitely/not/here")
    with pytest.raises(FileNotFoundError, match="no shapes_world build at 64 px"):
        pl.open_source("shapes_world:/definitely/not/here")


# --- global arrays --------------------------------------------------------------------------------


@pytest.mark.parametrize("rules", [sh.DATA_PARALLEL, sh.FSDP_TENSOR])
def test_global_arrays_on_the_mesh(tok, rules):
    mesh = sh.make_mesh((2, 4, 1))
    batch = next(iter(pl.make_pipeline(source(), config(global_batch=8), tok).dataset))
    arrays = pl.to_global(batch, mesh, rules)
    assert set(arrays) == {"image", "tokens"}  # captions stay on the host
    for key, x in arrays.items():
        assert x.shape == batch[key].shape and x.dtype == batch[key].dtype
        assert x.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
        assert len(x.addressable_shards) == 8
        for shard in x.addressable_shards:
            rows = shard.index[0]
            assert rows.stop - rows.start == 1
            np.testing.assert_array_equal(np.asarray(shard.data), batch[key][rows])
    with pytest.raises(
        ValueError, match="global batch 4 does not split over the mesh's batch axes"
    ):
        pl.to_global({"image": batch["image"][:4]}, mesh)


# --- the shapes_world TFDS source -----------------------------------------------------------------


def test_shapes_world_tfds_source(tmp_path):
    from jaxdiff.data import shapes_tfds as sw_tfds

    sw_tfds.ShapesWorld(
        config="32",
        data_dir=str(tmp_path),
        split_sizes={"train": 24, "validation": 0, "heldout": 0},
    ).download_and_prepare(file_format="array_record")
    src = pl.open_source(f"shapes_world:{tmp_path}", resolution=32)
    assert len(src) == 24
    pipe = pl.make_pipeline(
        src, config(resolution=32, global_batch=8, num_epochs=1, image_dtype="uint8")
    )
    got = {(c, b["image"][i].tobytes()) for b in pipe.dataset for i, c in enumerate(b["caption"])}
    want = {(src[i]["caption"].decode(), src[i]["image"].tobytes()) for i in range(24)}
    assert got == want


def test_shapes_world_memory_source():
    # Rendered in 2 spawned processes, record i is example i of the split (= record i of a TFDS build).
    from jaxdiff.data import shapes_world as sw

    src = pl.open_source("shapes_world_memory:7", resolution=32, split="validation")
    assert len(src) == 7
    for i in (0, 3, 6):
        want = sw.example("validation", i, 0, 32)
        np.testing.assert_array_equal(src[i]["image"], want["image"])
        assert src[i]["caption"] == want["caption"]
    assert len({c["caption"] for c in src}) > 1
    with pytest.raises(
        ValueError,
        match=r"shapes_world_memory:N with N a number",
    ):
        pl.open_source("shapes_world_memory:lots")
    with pytest.raises(ValueError, match="resolution one of"):
        pl.shapes_world_memory(4, resolution=48)


def test_shapes_world_memory_kind_mix():
    # relation=0.5: half the records are relation scenes, the first ones of the split in index order;
    # the three other kinds share the rest (quotas add up to n by largest remainder).
    from jaxdiff.data import shapes_world as sw

    # ties in the remainders go to the kinds in the spec's order (single, relation, count, background)
    assert pl.kind_quotas(10, {"relation": 0.5}) == {
        "single": 2,
        "relation": 5,
        "count": 2,
        "background": 1,
    }
    assert pl.kind_quotas(12, {"relation": 0.5, "count": 0.25}) == {
        "single": 2,
        "relation": 6,
        "count": 3,
        "background": 1,
    }
    src = pl.open_source(
        "shapes_world_memory:8",
        resolution=32,
        split="validation",
        kinds={"relation": 0.5, "count": 0.5},
    )
    kinds = [sw.parse_caption(c["caption"]).kind for c in src]
    assert sorted(kinds) == ["count"] * 4 + ["relation"] * 4
    first_rel = [i for i in range(100) if sw.sample_scene("validation", i).kind == "relation"][:4]
    rel = [c for c in src if sw.parse_caption(c["caption"]).kind == "relation"]
    for i, rec in zip(first_rel, rel):
        want = sw.example("validation", i, 0, 32)
        assert rec["caption"] == want["caption"]
        np.testing.assert_array_equal(rec["image"], want["image"])
    with pytest.raises(ValueError, match="unknown scene kind"):
        pl.open_source("shapes_world_memory:8", kinds={"relations": 0.5})
    with pytest.raises(ValueError, match="add up to at most 1"):
        pl.open_source("shapes_world_memory:8", kinds={"relation": 0.7, "count": 0.6})
    with pytest.raises(ValueError, match="data.shapes.kinds"):  # no longer part of the string
        pl.open_source("shapes_world_memory:8:relation=0.5")


def array_source(n=40, res=8):
    rng = np.random.default_rng(0)
    return pl.ArraySource(
        rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8), [f"caption {i}" for i in range(n)]
    )


def test_array_source_batches_are_gathers_of_each_epoch(tok):
    src = array_source(40)
    pipe = pl.make_pipeline(src, config(global_batch=8, num_epochs=2), tok)
    assert type(pipe.dataset).__name__ == "_ArrayDataset"
    batches = list(pipe.dataset)
    assert len(batches) == 10
    caps = captions(batches)
    assert (
        sorted(caps[:40]) == sorted(caps[40:]) == sorted(src.captions)
    )  # every record once per epoch
    assert caps[:40] != caps[40:] and caps[:40] != src.captions  # shuffled, anew each epoch
    for b in batches:
        idx = [int(c.split()[1]) for c in b["caption"]]
        np.testing.assert_array_equal(b["image"], src.images[idx].astype(np.float32) / 127.5 - 1)
        np.testing.assert_array_equal(b["tokens"], tok(b["caption"]))
    again = captions(pl.make_pipeline(src, config(global_batch=8, num_epochs=2), tok).dataset)
    other = captions(
        pl.make_pipeline(src, config(global_batch=8, num_epochs=2, seed=1), tok).dataset
    )
    assert again == caps and other != caps
    # hosts read disjoint halves
    halves = [
        set(
            captions(
                pl.make_pipeline(
                    src, config(global_batch=8, num_epochs=1, shard_index=i, shard_count=2), tok
                ).dataset
            )
        )
        for i in (0, 1)
    ]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == set(src.captions)


def test_shapes_world_memory_canonical_and_shared_options():
    # canonical: the same captions, relation scenes in their canonical layout
    from jaxdiff.data import shapes_world as sw
    from jaxdiff.eval import fidelity

    canon = pl.open_source(
        "shapes_world_memory:4",
        resolution=32,
        split="validation",
        kinds={"relation": 1},
        canonical=True,
    )
    spec = pl.open_source(
        "shapes_world_memory:4", resolution=32, split="validation", kinds={"relation": 1}
    )
    assert [canon[k]["caption"] for k in range(4)] == [spec[k]["caption"] for k in range(4)]
    assert any(not np.array_equal(canon[k]["image"], spec[k]["image"]) for k in range(4))
    # shared=F: that fraction of relation scenes names a B that shares A's colour or shape; the rest unchanged
    rel = dict(kinds={"relation": 1}, canonical=True)
    both = pl.open_source("shapes_world_memory:8", resolution=64, shared=1.0, **rel)
    plain = pl.open_source("shapes_world_memory:8", resolution=64, **rel)
    pairs = [
        [(o.colour, o.shape) for o in sw.parse_caption(both[k]["caption"]).objects]
        for k in range(8)
    ]
    assert all(a != b and (a[0] == b[0] or a[1] == b[1]) for a, b in pairs), pairs
    assert [both[k]["caption"] for k in range(8)] != [plain[k]["caption"] for k in range(8)]
    assert all(fidelity.score(both[k]["image"], both[k]["caption"])["correct"] for k in range(8))
    none = pl.open_source("shapes_world_memory:8", resolution=32, shared=0.0, **rel)
    assert [none[k]["caption"] for k in range(8)] == [plain[k]["caption"] for k in range(8)]
    with pytest.raises(ValueError, match="shared must lie in \\[0, 1\\], got 1.5"):
        pl.open_source("shapes_world_memory:4", resolution=32, shared=1.5)


def test_array_source_resumes_exactly(tok):
    src, cfg = array_source(30), config(global_batch=4)
    it = iter(pl.make_pipeline(src, cfg, tok).dataset)
    take(it, 5)
    blob = pl.state_to_bytes(it)
    a = take(it, 4)  # crosses the epoch boundary (30 records, batches of 4)
    it2 = iter(pl.make_pipeline(src, cfg, tok).dataset)
    take(it2, 2)
    pl.restore_state(it2, blob)
    b = take(it2, 4)
    assert captions(a) == captions(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
    grain_state = pl.state_to_bytes(
        iter(pl.make_pipeline(list(src), cfg).dataset)
    )  # a list: grain's path
    with pytest.raises(ValueError, match="different pipeline"):
        pl.restore_state(it2, grain_state)
    with pytest.raises(ValueError, match=r"uint8 \[N, S, S, 3\]"):
        pl.ArraySource(np.zeros((2, 8, 8), np.uint8), ["a", "b"])
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        pl.ArraySource(np.zeros((2, 8, 8, 3), np.uint8), ["a"])


def test_resume_with_worker_processes():
    # grain's mp_prefetch: decoding in 2 processes, whose positions the state records one by one.
    src, cfg = source(n=30), config(global_batch=6, workers=2)
    it = iter(pl.make_pipeline(src, cfg).dataset)
    take(it, 4)
    blob = pl.state_to_bytes(it)
    a = captions(take(it, 3))
    it.close()
    it2 = iter(pl.make_pipeline(src, cfg).dataset)
    pl.restore_state(it2, blob)
    assert captions(take(it2, 3)) == a
    it2.close()
    assert len(a) == 18 and set(a) <= {f"item {i}" for i in range(30) if i not in (5, 17)}
