"""Users' own image-caption data as random-access sources (grain's `__len__` / `__getitem__` protocol).

Three layouts, detected by `open_folder(root)`:
  * `captions.jsonl` in `root`: one `{"file": "rel/path.jpg", "caption": "..."}` per line;
  * `*.tar` shards (img2dataset's output): members `KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`;
  * otherwise every image under `root` (recursive) with a same-named `.txt` caption.

A record is `{"image": bytes, "caption": str, "name": str}`: raw encoded bytes, decoded later in the
input pipeline (`jaxdiff.data.pipeline`). Records are sorted by path, so every host of a multi-host
run sees the same order. What cannot be used is counted per reason in `source.skips`, never raised.

`jaxdiff data folder DIR` (jaxdiff.data.cli) decodes a whole folder as training would and summarises it.
"""

from __future__ import annotations

import collections
import json
import os
import tarfile
import threading
from pathlib import Path

import numpy as np

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTIONS_JSONL = "captions.jsonl"
_EXAMPLES_KEPT = 5  # file names kept per skip reason, for the summary


class SkipLog:
    """Thread-safe counts of skipped records per reason, with the first few names of each.

    With a `key` (the record's index), each record counts once however often it is met.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = {}
        self.keys: set = set()  # records already counted (a bad record recurs every epoch)

    def add(self, reason: str, name: str, key=None) -> None:
        with self._lock:
            if key is not None:
                if key in self.keys:
                    return
                self.keys.add(key)
            self.counts[reason] += 1
            names = self.examples.setdefault(reason, [])
            if len(names) < _EXAMPLES_KEPT:
                names.append(name)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        with self._lock:
            return {
                r: {"count": n, "examples": list(self.examples[r])}
                for r, n in self.counts.most_common()
            }

    def __getstate__(self):  # pickled into grain worker processes: counts restart there
        return {}

    def __setstate__(self, state):
        self.__init__()


def _read_caption(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").strip()


class _Source:
    """Common parts: records named by `self._names`, each layout's `_read(index) -> (bytes, caption)`."""

    layout = ""

    def __init__(self, root: Path):
        self.root = root
        self.skips = SkipLog()
        self._names: list[str] = []

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        name = self._names[index]
        try:
            image, caption = self._read(index)
        except OSError as e:  # deleted or unreadable since open: the pipeline counts and skips it
            return {
                "image": None,
                "caption": "",
                "name": name,
                "error": f"unreadable file ({e.strerror or e})",
            }
        return {"image": image, "caption": caption, "name": name}

    def _read(self, index: int) -> tuple[bytes, str]:
        raise NotImplementedError

    def _require_records(self) -> None:
        if len(self) == 0:
            why = ", ".join(f"{n} {r}" for r, n in self.skips.counts.most_common()) or "no files"
            raise ValueError(
                f"{self.root}: no usable image-caption pairs ({self.layout} layout; {why})"
            )

    def summary(self) -> dict:
        return {
            "root": str(self.root),
            "layout": self.layout,
            "records": len(self),
            "skipped_at_open": self.skips.as_dict(),
        }


class TxtPairFolder(_Source):
    """Every image under `root` (recursive) with a same-named `.txt` beside it."""

    layout = "image + .txt"

    def __init__(self, root):
        super().__init__(Path(root))
        images, captions = {}, set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if f.startswith("."):
                    continue
                path = os.path.join(dirpath, f)
                stem, ext = os.path.splitext(path)
                ext = ext.lower()
                if ext in IMAGE_EXTS:
                    images[path] = stem
                elif ext == ".txt":
                    captions.add(stem)
                else:
                    self.skips.add("not an image file", self._rel(path))
        self._captions = []  # the .txt of each record, relative to root
        for path in sorted(images):
            stem = images[path]
            if stem not in captions:
                self.skips.add("no caption (.txt)", self._rel(path))
            elif os.path.getsize(path) == 0:
                self.skips.add("empty file", self._rel(path))
            else:
                self._names.append(self._rel(path))
                self._captions.append(self._rel(stem + ".txt"))
        for stem in sorted(captions - set(images.values())):
            self.skips.add("caption without image", self._rel(stem + ".txt"))
        self._require_records()

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def _read(self, index):
        return (
            (self.root / self._names[index]).read_bytes(),
            _read_caption((self.root / self._captions[index]).read_bytes()),
        )


class JsonlFolder(_Source):
    """`root/captions.jsonl`: `{"file": ..., "caption": ...}` per line, files relative to `root`."""

    layout = "captions.jsonl"

    def __init__(self, root):
        super().__init__(Path(root))
        rows = []
        with open(self.root / CAPTIONS_JSONL, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{CAPTIONS_JSONL}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    self.skips.add("bad json line", where)
                    continue
                if not (
                    isinstance(row, dict)
                    and isinstance(row.get("file"), str)
                    and isinstance(row.get("caption"), str)
                ):
                    self.skips.add('line without string "file" and "caption"', where)
                    continue
                path = self.root / row["file"]
                if not path.is_file():
                    self.skips.add("missing file", row["file"])
                elif path.stat().st_size == 0:
                    self.skips.add("empty file", row["file"])
                else:
                    rows.append((row["file"], row["caption"].strip()))
        rows.sort()
        self._names = [r[0] for r in rows]
        self._captions = [r[1] for r in rows]
        self._require_records()

    def _read(self, index):
        return (self.root / self._names[index]).read_bytes(), self._captions[index]


class TarShards(_Source):
    """img2dataset's output: `*.tar` shards holding `KEY.<image ext>`, `KEY.txt` (and `KEY.json`).

    Member offsets are indexed once at open time; `__getitem__` seeks straight to the bytes.
    """

    layout = "img2dataset tars"

    def __init__(self, root):
        super().__init__(Path(root))
        self._tars = sorted(str(p) for p in self.root.rglob("*.tar"))
        # Per record: tar number, image offset and size, caption offset and size.
        entries, names = [], []
        for t, tar_path in enumerate(self._tars):
            rel = os.path.relpath(tar_path, self.root)
            images, captions = {}, {}
            try:
                with tarfile.open(tar_path, mode="r:") as tf:
                    for m in tf:
                        if not m.isfile():
                            continue
                        key, ext = os.path.splitext(m.name)
                        ext = ext.lower()
                        if ext in IMAGE_EXTS:
                            images[key] = (m.offset_data, m.size)
                        elif ext == ".txt":
                            captions[key] = (m.offset_data, m.size)
                        elif ext != ".json":
                            self.skips.add("not an image file", f"{rel}:{m.name}")
            except (tarfile.TarError, EOFError, OSError):
                # A cut-off shard: keep the members read before the damage.
                self.skips.add("damaged tar (rest of shard lost)", rel)
            for key in sorted(images):
                off, size = images[key]
                if key not in captions:
                    self.skips.add("no caption (.txt)", f"{rel}:{key}")
                elif size == 0:
                    self.skips.add("empty file", f"{rel}:{key}")
                else:
                    entries.append((t, off, size, *captions[key]))
                    names.append(f"{rel}:{key}")
            for key in sorted(set(captions) - set(images)):
                self.skips.add("caption without image", f"{rel}:{key}")
        if not self._tars:
            raise ValueError(f"{self.root}: no .tar shards")
        self._entries = np.asarray(entries, dtype=np.int64).reshape(-1, 5)
        self._names = names
        self._require_records()

    def _read(self, index):
        t, img_off, img_size, cap_off, cap_size = (int(v) for v in self._entries[index])
        with open(self._tars[t], "rb") as f:
            f.seek(img_off)
            image = f.read(img_size)
            f.seek(cap_off)
            caption = _read_caption(f.read(cap_size))
        if len(image) != img_size:
            raise OSError("tar member cut short")
        return image, caption


def open_folder(root) -> _Source:
    """The source for `root`, its layout detected: captions.jsonl, *.tar shards, or image + .txt pairs."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    if not root.is_dir():
        raise NotADirectoryError(
            f"{root}: not a folder (expected a folder of images with captions)"
        )
    if (root / CAPTIONS_JSONL).is_file():
        return JsonlFolder(root)
    if next(root.rglob("*.tar"), None) is not None:
        return TarShards(root)
    return TxtPairFolder(root)
