"""What every store of the suite shares: a ``manifest.json`` (format name and version, the settings that decide
compatibility, the class mapping, the data description with its fingerprint, provenance) beside per-rank shards.

A store is created with its first shard and reopened only after its manifest is checked against the settings,
classes and data of the run that wants to add to it or read it (:class:`StoreMismatchError` otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from patchdd.errors import IncompleteStoreError, StoreError, StoreMismatchError
from patchdd.formats.outputs import honour_umask, writing

MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"
COMPLETE_FILE = "complete.json"  # written when a pass over the data finished: the store's content hash then


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
    SHARD_SUFFIX: ClassVar[str] = ".parquet"

    def __init__(self, directory: str | Path, manifest: Manifest) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self._shard_counts: dict[int, int] = {}

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
        diff = settings_difference(self.recorded_settings(), settings)
        if classes is not None and _plain(classes) != _plain(self.manifest.classes):
            diff.append(f"classes: the {self.KIND}'s class list differs from the requested one")
        if fingerprint is not None:
            diff += fingerprint_difference(self.manifest.data.get("fingerprint"), fingerprint)
        if diff:
            raise StoreMismatchError(f"{self.KIND} {self.directory} was written with other settings:\n  "
                                     + "\n  ".join(diff))

    def recorded_settings(self) -> dict:
        """The settings the store was made with; one written before the precision was a setting kept the precision
        in its provenance."""
        return {"precision": self.manifest.provenance.get("precision")} | self.manifest.settings

    def shard_paths(self) -> list[Path]:
        return sorted((self.directory / SHARD_DIR).glob(f"*{self.SHARD_SUFFIX}"))

    def content_hash(self) -> str:
        """A hash of the manifest and the shard names and sizes: changes whenever the store's content does."""
        digest = hashlib.sha256(json.dumps(self.manifest_json(self.manifest), sort_keys=True).encode())
        for p in self.shard_paths():
            digest.update(f"{p.name}:{p.stat().st_size}".encode())
        return digest.hexdigest()[:16]

    def stored_counts(self) -> dict[str, int]:
        """Images held per class folder."""
        raise NotImplementedError

    def mark_complete(self) -> None:
        """Record that a pass over the data finished with the store as it is now (its content hash)."""
        atomic_write_text(self.directory / COMPLETE_FILE, json.dumps({"content_hash": self.content_hash()}))

    def is_complete(self) -> bool:
        """Whether a pass finished and nothing was added or removed since (a cut pass never marks its store)."""
        try:
            record = json.loads((self.directory / COMPLETE_FILE).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(record, dict) and record.get("content_hash") == self.content_hash()

    def missing_images(self) -> dict[str, tuple[int, int]]:
        """``{class folder: (images held, images the pass planned)}`` of the classes short of their plan."""
        expected = self.manifest.data.get("expected_counts") or {}
        held = self.stored_counts()
        return {folder: (held.get(folder, 0), count) for folder, count in expected.items()
                if held.get(folder, 0) < count}

    def require_complete(self, allow_partial: bool = False) -> bool:
        """Whether the store is complete; an incomplete one raises :class:`IncompleteStoreError` naming the
        classes and counts missing, unless ``allow_partial`` (then the caller records that it used a partial
        store)."""
        if self.is_complete():
            return True
        if allow_partial:
            return False
        missing = self.missing_images()
        listed = ", ".join(f"{folder} ({held} of {planned})" for folder, (held, planned) in list(missing.items())[:8])
        detail = (f"{len(missing)} class(es) short of their planned images: {listed}" if missing else
                  "no finished pass is recorded (cut before its end, changed since, or written by an older release)")
        raise IncompleteStoreError(f"the {self.KIND} {self.directory} is incomplete: {detail}. Rerun the command that "
                                   "writes it (it resumes), or pass --allow_partial true to use it as it is")

    def new_shard_path(self, rank: int) -> Path:
        """A fresh shard name of ``rank``: its count of shards so far (the folder is listed once per store object,
        then counted in memory: O(1) per shard) and a random tag, so names never collide."""
        shard_dir, suffix = self.directory / SHARD_DIR, self.SHARD_SUFFIX
        if rank not in self._shard_counts:
            shard_dir.mkdir(exist_ok=True)
            self._shard_counts[rank] = len(list(shard_dir.glob(f"rank{rank}-*{suffix}")))
        seq = self._shard_counts[rank]
        self._shard_counts[rank] = seq + 1
        return shard_dir / f"rank{rank}-{seq:06d}-{uuid.uuid4().hex[:8]}{suffix}"


class IdShardStore(ManifestStore):
    """A store whose shards are safetensors files of tensors plus the ids of the images they hold (metadata): the
    latent statistics store and the latent cache."""

    SHARD_SUFFIX: ClassVar[str] = ".safetensors"

    def write_shard(self, tensors: dict, image_ids: list[str], rank: int = 0) -> None:
        """Write one shard atomically (a crash leaves no partial shard)."""
        from safetensors.torch import save_file

        path = self.new_shard_path(rank)
        tmp = path.with_suffix(".tmp")
        with writing(path):
            save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(tmp),
                      metadata={"image_ids": json.dumps(image_ids)})
            honour_umask(tmp)
            os.replace(tmp, path)

    def shard_image_ids(self) -> list[list[str]]:
        """The image ids of every shard, in shard order."""
        from safetensors import safe_open

        ids = []
        for path in self.shard_paths():
            with safe_open(str(path), "pt") as shard:
                ids.append(json.loads(shard.metadata()["image_ids"]))
        return ids

    def done_ids(self) -> set[str]:
        """Ids of the images already held (to resume an interrupted pass)."""
        return {i for ids in self.shard_image_ids() for i in ids}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # unique: ranks may write at once
    with writing(path):
        tmp.write_text(text)
        os.replace(tmp, path)
