"""What every store of the suite shares: a ``manifest.json`` (format name and version, the settings that decide
compatibility, the class mapping, the data description with its fingerprint, provenance) beside per-rank shards.

A store is created with its first shard and reopened only after its manifest is checked against the settings,
classes and data of the run that wants to add to it or read it (:class:`StoreMismatchError` otherwise).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from patchdd.errors import StoreError, StoreMismatchError

MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"


@dataclass
class Manifest:
    """What a store holds and how it was made. ``settings`` decide compatibility; the rest is provenance."""

    settings: dict
    classes: dict  # ClassMapping.to_json()
    data: dict  # how to reopen the images: data module class path, init args, split
    provenance: dict = field(default_factory=dict)  # code version, creation time, ... (not compared)

    def to_json(self) -> dict:
        return {"settings": self.settings, "classes": self.classes, "data": self.data, "provenance": self.provenance}

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        return cls(data["settings"], data["classes"], data["data"], data.get("provenance", {}))


def settings_difference(stored: dict, requested: dict) -> list[str]:
    """Human-readable differences between two settings dicts (empty when they agree)."""
    keys = sorted(set(stored) | set(requested))
    return [f"{k}: store has {stored.get(k)!r}, requested {requested.get(k)!r}"
            for k in keys if _plain(stored.get(k)) != _plain(requested.get(k))]


def fingerprint_difference(stored: dict | None, current: dict) -> list[str]:
    """What differs between the data a store was scored on and the data given now (root, then class by class:
    image counts, or the files themselves: names and sizes)."""
    if stored is None:
        return ["data: the store records no data fingerprint (written by an older release); score into a new store"]
    diff = []
    if stored.get("root") != current.get("root"):
        diff.append(f"data root: store has {stored.get('root')!r}, requested {current.get('root')!r}")
    old, new = stored.get("classes", {}), current.get("classes", {})
    for folder in sorted(set(old) | set(new)):
        (count_a, hash_a), (count_b, hash_b) = old.get(folder, (0, "")), new.get(folder, (0, ""))
        if count_a != count_b:
            diff.append(f"class {folder}: {count_a} images in the store's data, {count_b} now")
        elif hash_a != hash_b:
            diff.append(f"class {folder}: same image count, other files (names or sizes differ)")
    return diff[:10] + ([f"... and {len(diff) - 10} more differences"] if len(diff) > 10 else [])


def _plain(value):
    """JSON round trip, so that tuples and lists compare equal."""
    return json.loads(json.dumps(value))


class ManifestStore:
    """A store directory: create or check its manifest, name new shards. Subclasses set the format and read and
    write their own shards."""

    FORMAT_NAME: ClassVar[str] = ""
    FORMAT_VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "store"

    def __init__(self, directory: str | Path, manifest: Manifest) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self._shard_counts: dict[tuple[int, str], int] = {}

    @classmethod
    def open(cls, directory: str | Path) -> "ManifestStore":
        """An existing store (complete or partial)."""
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise StoreError(f"no {cls.KIND} at {directory} (missing {MANIFEST_FILE})")
        try:
            data = json.loads(path.read_text())
            cls.check_format(data)
            return cls(directory, Manifest.from_json(data))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise StoreError(f"the {cls.KIND} manifest {path} is unreadable ({type(err).__name__}: {err}); it is not "
                             "a store this suite wrote, or it was damaged") from None

    @classmethod
    def check_format(cls, data: dict) -> None:
        if data.get("format") != cls.FORMAT_NAME:
            raise StoreError(f"not a {cls.FORMAT_NAME} manifest (format={data.get('format')!r})")
        if data.get("version") != cls.FORMAT_VERSION:
            raise StoreError(f"{cls.KIND} format version {data.get('version')} is not supported (this code reads "
                             f"version {cls.FORMAT_VERSION}); write a new store or use a matching release")

    @classmethod
    def create_or_check(cls, directory: str | Path, manifest: Manifest) -> "ManifestStore":
        """Create a store, or reopen an existing one after checking that its settings and classes match."""
        directory = Path(directory)
        if (directory / MANIFEST_FILE).is_file():
            store = cls.open(directory)
            store.check(manifest.settings, manifest.classes, manifest.data.get("fingerprint"))
            return store
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SHARD_DIR).mkdir(exist_ok=True)
        atomic_write_text(directory / MANIFEST_FILE, json.dumps(cls.manifest_json(manifest), indent=1))
        return cls(directory, manifest)

    @classmethod
    def manifest_json(cls, manifest: Manifest) -> dict:
        return {"format": cls.FORMAT_NAME, "version": cls.FORMAT_VERSION, **manifest.to_json()}

    def check(self, settings: dict, classes: dict | None = None, fingerprint: dict | None = None) -> None:
        """Raise :class:`StoreMismatchError` when the store was made with other settings, classes or data."""
        diff = settings_difference(self.manifest.settings, settings)
        if classes is not None and _plain(classes) != _plain(self.manifest.classes):
            diff.append(f"classes: the {self.KIND}'s class list differs from the requested one")
        if fingerprint is not None:
            diff += fingerprint_difference(self.manifest.data.get("fingerprint"), fingerprint)
        if diff:
            raise StoreMismatchError(f"{self.KIND} {self.directory} was written with other settings:\n  "
                                     + "\n  ".join(diff))

    def shard_paths(self, suffix: str = ".parquet") -> list[Path]:
        return sorted((self.directory / SHARD_DIR).glob(f"*{suffix}"))

    def new_shard_path(self, rank: int, suffix: str = ".parquet") -> Path:
        """A fresh shard name of ``rank``: its count of shards so far (the folder is listed once per store object,
        then counted in memory: O(1) per shard) and a random tag, so names never collide."""
        shard_dir = self.directory / SHARD_DIR
        key = (rank, suffix)
        if key not in self._shard_counts:
            shard_dir.mkdir(exist_ok=True)
            self._shard_counts[key] = len(list(shard_dir.glob(f"rank{rank}-*{suffix}")))
        seq = self._shard_counts[key]
        self._shard_counts[key] = seq + 1
        return shard_dir / f"rank{rank}-{seq:06d}-{uuid.uuid4().hex[:8]}{suffix}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # unique: ranks may write at once
    tmp.write_text(text)
    os.replace(tmp, path)
