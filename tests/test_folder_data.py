"""Users' image-caption folders: the three layouts, what is skipped and why, the `jaxdiff data folder` check."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data import cli as data_cli
from jaxdiff.data import folder as fd
from jaxdiff.data.pipeline import PipelineConfig, make_pipeline


def encode(fmt, size=(24, 16), colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def truncated_jpeg():
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@pytest.fixture
def txt_folder(tmp_path):
    files = {
        "cat.jpg": encode("JPEG"),
        "cat.txt": "a cat\n",
        "sub/deep/dog.png": encode("PNG"),
        "sub/deep/dog.txt": "a dog",
        "sub/bird.webp": encode("WEBP"),
        "sub/bird.txt": "  a bird ",
        "nocap.jpg": encode("JPEG"),
        "broken.jpg": b"this is not a jpeg",
        "broken.txt": "broken",
        "trunc.jpg": truncated_jpeg(),
        "trunc.txt": "cut off",
        "notes.pdf": b"%PDF-1.4",
        "orphan.txt": "no image here",
        "empty.png": b"",
        "empty.txt": "empty",
        ".hidden.jpg": encode("JPEG"),
    }
    for name, data in files.items():
        write(tmp_path / name, data)
    return tmp_path, files


def test_txt_pairs_layout(txt_folder):
    root, files = txt_folder
    src = fd.open_folder(root)
    assert isinstance(src, fd.TxtPairFolder) and len(src) == 5
    names = [src[i]["name"] for i in range(len(src))]
    assert names == ["broken.jpg", "cat.jpg", "sub/bird.webp", "sub/deep/dog.png", "trunc.jpg"]
    for i, name in enumerate(names):
        assert src[i]["image"] == files[name]
    assert [src[i]["caption"] for i in (1, 2, 3)] == ["a cat", "a bird", "a dog"]
    assert dict(src.skips.counts) == {
        "no caption (.txt)": 1,
        "not an image file": 1,
        "caption without image": 1,
        "empty file": 1,
    }
    assert src.skips.examples["no caption (.txt)"] == ["nocap.jpg"]
    with pytest.raises(IndexError):
        src[5]
    (root / "cat.jpg").unlink()  # gone since the folder was opened: a record that says why
    assert src[1] == {
        "image": None,
        "caption": "",
        "name": "cat.jpg",
        "error": "unreadable file (No such file or directory)",
    }


def test_scan_counts_undecodable(txt_folder):
    summary = data_cli.scan(fd.open_folder(txt_folder[0]), resolution=16)
    assert summary["used"] == 3 and summary["records"] == 5
    assert {r: v["count"] for r, v in summary["skipped_at_decode"].items()} == {
        "not a decodable image": 1,
        "truncated image": 1,
    }
    assert summary["skipped_at_decode"]["truncated image"]["examples"] == ["trunc.jpg"]
    assert sorted(summary["caption_words"]) == [2, 2, 2]


def test_cli_summary(txt_folder, capsys, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "summary.json"
    assert data_cli.folder_main([str(txt_folder[0]), "--resolution", "16", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split() for ln in text.splitlines()[1:] if ln.strip()}
    assert lines["used"][1] == "3" and lines["skipped"][1] == "6" and lines["found"][1] == "9"
    assert "truncated image" in text and "e.g. trunc.jpg" in text and "no caption (.txt)" in text
    saved = json.loads(out.read_text())
    assert saved["used"] == 3 and saved["skipped_decode"] == 2 and saved["skipped_open"] == 4


def test_pipeline_over_folder_skips_and_counts(txt_folder):
    src = fd.open_folder(txt_folder[0])
    cfg = PipelineConfig(resolution=8, global_batch=3, num_epochs=2, shard_index=0, shard_count=1)
    pipe = make_pipeline(src, cfg)
    batches = list(pipe.dataset)
    assert len(batches) == 2  # 3 good records x 2 epochs, in batches of 3
    assert sorted(batches[0]["caption"]) == ["a bird", "a cat", "a dog"]
    assert dict(pipe.skips.counts) == {
        "not a decodable image": 1,
        "truncated image": 1,
    }  # once each


def test_jsonl_layout(tmp_path):
    a, b = encode("PNG", colour=(1, 2, 3)), encode("JPEG")
    write(tmp_path / "imgs/a.png", a)
    write(tmp_path / "imgs/b.jpg", b)
    write(tmp_path / "imgs/c.jpg", b"")
    lines = [
        json.dumps({"file": "imgs/b.jpg", "caption": " second "}),
        "",
        json.dumps({"file": "imgs/a.png", "caption": "first"}),
        json.dumps({"file": "imgs/missing.jpg", "caption": "gone"}),
        "{not json",
        json.dumps({"file": 3, "caption": "x"}),
        json.dumps({"file": "imgs/c.jpg", "caption": "empty"}),
    ]
    write(tmp_path / "captions.jsonl", "\n".join(lines) + "\n")
    src = fd.open_folder(tmp_path)
    assert isinstance(src, fd.JsonlFolder) and len(src) == 2
    assert [src[0]["image"], src[0]["caption"], src[1]["image"], src[1]["caption"]] == [
        a,
        "first",
        b,
        "second",
    ]
    assert dict(src.skips.counts) == {
        "missing file": 1,
        "bad json line": 1,
        "empty file": 1,
        'line without string "file" and "caption"': 1,
    }
    assert src.skips.examples["bad json line"] == ["captions.jsonl:5"]


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            data = data if isinstance(data, bytes) else data.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_img2dataset_tars(tmp_path):
    jpg, png, webp = encode("JPEG"), encode("PNG"), encode("WEBP")
    meta = json.dumps({"url": "http://x", "status": "success"})
    _tar(
        tmp_path / "00000.tar",
        [
            ("000000000.jpg", jpg),
            ("000000000.txt", "first"),
            ("000000000.json", meta),
            ("000000001.png", png),
            ("000000001.txt", "second"),
            ("000000001.json", meta),
            ("000000002.jpg", jpg),
            ("000000002.json", meta),
        ],
    )
    _tar(
        tmp_path / "00001.tar",
        [
            ("000010000.webp", webp),
            ("000010000.txt", "third"),
            ("000010001.jpg", b"\xff\xd8garbage"),
            ("000010001.txt", "bad"),
            ("000010002.txt", "lonely"),
            ("readme.md", "hi"),
        ],
    )
    write(tmp_path / "00000_stats.json", "{}")
    write(tmp_path / "00000.parquet", b"PAR1")
    src = fd.open_folder(tmp_path)
    assert isinstance(src, fd.TarShards) and len(src) == 4
    got = [(src[i]["name"], src[i]["image"], src[i]["caption"]) for i in range(4)]
    assert got == [
        ("00000.tar:000000000", jpg, "first"),
        ("00000.tar:000000001", png, "second"),
        ("00001.tar:000010000", webp, "third"),
        ("00001.tar:000010001", b"\xff\xd8garbage", "bad"),
    ]
    assert dict(src.skips.counts) == {
        "no caption (.txt)": 1,
        "caption without image": 1,
        "not an image file": 1,
    }
    summary = data_cli.scan(src, resolution=8)
    assert summary["used"] == 3 and list(summary["skipped_at_decode"]) == ["not a decodable image"]


def test_damaged_tar_keeps_what_was_readable(tmp_path):
    big = truncated_jpeg() * 4  # any bytes: only the tar structure matters here
    _tar(
        tmp_path / "00000.tar",
        [("a.jpg", encode("JPEG")), ("a.txt", "kept"), ("b.jpg", big), ("b.txt", "lost")],
    )
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[: 512 * 5 + len(big) // 2])  # cut inside b.jpg
    src = fd.open_folder(tmp_path)
    assert len(src) == 1 and src[0]["caption"] == "kept"
    assert dict(src.skips.counts) == {"damaged tar (rest of shard lost)": 1, "no caption (.txt)": 1}


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        fd.open_folder(tmp_path / "nope")
    write(tmp_path / "file.txt", "x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        fd.open_folder(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable image-caption pairs.*no files"):
        fd.open_folder(tmp_path / "empty")
    write(tmp_path / "docs/a.pdf", b"x")
    with pytest.raises(ValueError, match="1 not an image file"):
        fd.open_folder(tmp_path / "docs")
    with pytest.raises(SystemExit, match="no such folder"):
        data_cli.folder_main([str(tmp_path / "nope")])
