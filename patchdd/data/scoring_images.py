"""Original images prepared for Stage I: resized into shape buckets, batched by shape, sharded over ranks.

:func:`plan_resize` gives each image's resize geometry (short side to ``image_size``, long side rounded to a
bucket multiple, capped); :class:`ScoringImages` loads and resizes them; :class:`ShardedBucketBatchSampler`
batches images of the same bucket shape together so that no padding enters the UNet, and shards the batches by
rank itself (Lightning cannot wrap a custom batch sampler), disjoint and unrepeated whatever the dataset size
modulo the world size.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from patchdd.data.sources import ImageSource
from patchdd.errors import DataError

READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)
SKIP_OPTION = "--data.skip_unreadable true"


def read_error_reason(err: BaseException, name: str) -> str:
    """A few words on why an image could not be read: ``truncated JPEG``, ``not an image``, or the error."""
    if "truncated" in str(err).lower():
        suffix = Path(name).suffix.lower().lstrip(".")
        return f"truncated {'JPEG' if suffix in ('jpg', 'jpeg') else suffix.upper() or 'image'}"
    if isinstance(err, UnidentifiedImageError):
        return "not an image Pillow can read"
    return f"{type(err).__name__}: {err}"


class ResizeGeometry(NamedTuple):
    """How an original image became the scored one: resize to (resized_w, resized_h), then crop at (left, top)."""

    width: int
    height: int
    resized_width: int
    resized_height: int
    left: int
    top: int
    out_width: int
    out_height: int

    def box_to_original(self, box: Sequence[float]) -> tuple[int, int, int, int]:
        """A box (x0, y0, x1, y1) in scored-image pixels as a box in ORIGINAL pixels (clamped, x1/y1 exclusive)."""
        sx, sy = self.width / self.resized_width, self.height / self.resized_height
        x0, y0, x1, y1 = box
        mapped = (round((x0 + self.left) * sx), round((y0 + self.top) * sy),
                  round((x1 + self.left) * sx), round((y1 + self.top) * sy))
        return (min(max(mapped[0], 0), self.width), min(max(mapped[1], 0), self.height),
                min(max(mapped[2], 0), self.width), min(max(mapped[3], 0), self.height))


def plan_resize(width: int, height: int, image_size: int, multiple: int = 64, max_aspect: float = 2.0,
                square: bool = False) -> ResizeGeometry:
    """Short side -> ``image_size``; long side -> its aspect-preserving length rounded to ``multiple`` (a stretch
    of at most ``multiple / 2`` px), or, beyond ``max_aspect`` x ``image_size``, aspect-preserved and centre-cropped
    to that cap. ``square`` resizes to ``image_size`` x ``image_size`` (whole-image mode for low-res data)."""
    if square:
        return ResizeGeometry(width, height, image_size, image_size, 0, 0, image_size, image_size)
    short, long = min(width, height), max(width, height)
    exact_long = long * image_size / short
    cap = max(image_size, int(image_size * max_aspect) // multiple * multiple)
    if exact_long > cap:
        resized_long, out_long = round(exact_long), cap
    else:
        resized_long = out_long = min(max(round(exact_long / multiple) * multiple, image_size), cap)
    offset = (resized_long - out_long) // 2
    if width >= height:
        return ResizeGeometry(width, height, resized_long, image_size, offset, 0, out_long, image_size)
    return ResizeGeometry(width, height, image_size, resized_long, 0, offset, image_size, out_long)


RESIZE_MODES = ("buckets", "torchvision")


def torchvision_geometry(width: int, height: int, image_size: int) -> ResizeGeometry:
    """The geometry of torchvision's ``Resize(image_size)`` -> ``CenterCrop(image_size)`` (D3HR's preprocessing):
    the long side truncated, the crop offset rounded, as torchvision computes them."""
    from torchvision.transforms.functional import _compute_resized_output_size

    resized_height, resized_width = _compute_resized_output_size([height, width], [image_size])
    return ResizeGeometry(width, height, resized_width, resized_height, int(round((resized_width - image_size) / 2)),
                          int(round((resized_height - image_size) / 2)), image_size, image_size)


def torchvision_pixels(image: Image.Image, geometry: ResizeGeometry) -> torch.Tensor:
    """The uint8 image of ``geometry`` made by torchvision's own ``Resize`` (bilinear, antialiased) ->
    ``CenterCrop``: ``Resize(s)`` -> ``CenterCrop(s)`` for :func:`torchvision_geometry` (D3HR), ``Resize((s, s))``
    for a whole-image squash (D4M)."""
    from torchvision import transforms

    return TF.pil_to_tensor(transforms.Compose([
        transforms.Resize([geometry.resized_height, geometry.resized_width]),
        transforms.CenterCrop([geometry.out_height, geometry.out_width])])(image))


def resize_for_scoring(image: Image.Image, geometry: ResizeGeometry) -> torch.Tensor:
    """The scored image (uint8, 3 x out_height x out_width) of ``geometry``."""
    resized = TF.resize(image, [geometry.resized_height, geometry.resized_width],
                        interpolation=InterpolationMode.BICUBIC, antialias=True)
    cropped = TF.crop(resized, geometry.top, geometry.left, geometry.out_height, geometry.out_width)
    return TF.pil_to_tensor(cropped)


@dataclass
class ScoringBatch:
    """Images of one bucket shape (uint8), their originals (uint8, any size), labels, ids, geometry and the
    originals' file sizes in bytes (-1: not a file)."""

    images: torch.Tensor
    originals: list[torch.Tensor]
    labels: torch.Tensor
    image_ids: list[str]
    geometry: list[ResizeGeometry]
    file_bytes: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_ids)

    def pin_memory(self) -> "ScoringBatch":
        return ScoringBatch(self.images.pin_memory(), [o.pin_memory() for o in self.originals],
                            self.labels.pin_memory(), self.image_ids, self.geometry, self.file_bytes, self.skipped)


class ScoringImages(Dataset):
    """Item ``j`` = the ``positions[j]``-th image of a source, resized per its planned geometry."""

    def __init__(self, source: ImageSource, positions: Sequence[int], geometry: Sequence[ResizeGeometry],
                 skip_unreadable: bool, resize: str = "buckets") -> None:
        self.source, self.positions, self.geometry = source, list(positions), list(geometry)
        self.skip_unreadable, self.resize = skip_unreadable, resize
        self.ids = source.ids

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j: int):
        position, geometry = self.positions[j], self.geometry[j]
        image_id = self.ids[position]
        try:
            file_bytes = self.source.file_bytes(position)
            image = self.source.load(position)
        except READ_ERRORS as err:
            if not self.skip_unreadable:
                path = self.source.path(position) if hasattr(self.source, "path") else image_id
                raise DataError(f"unreadable image {path} ({read_error_reason(err, image_id)}): fix it or pass "
                                f"{SKIP_OPTION}") from None
            warnings.warn(f"skipping unreadable image {image_id}: {err}", stacklevel=2)
            return image_id
        if image.size != (geometry.width, geometry.height):
            raise DataError(f"image {image_id} changed size since it was scanned: {image.size}")
        scored = torchvision_pixels(image, geometry) if self.resize == "torchvision" else \
            resize_for_scoring(image, geometry)
        return (scored, TF.pil_to_tensor(image), self.source.labels[position],
                image_id, geometry, file_bytes)


def collate_scoring(items: list) -> ScoringBatch:
    """Stack the readable items (same bucket shape); unreadable ones arrive as their id and are listed."""
    readable = [item for item in items if not isinstance(item, str)]
    skipped = [item for item in items if isinstance(item, str)]
    if not readable:
        return ScoringBatch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), [], torch.empty(0, dtype=torch.long), [],
                            [], [], skipped)
    images, originals, labels, ids, geometry, file_bytes = zip(*readable)
    return ScoringBatch(torch.stack(images), list(originals), torch.tensor(labels, dtype=torch.long), list(ids),
                        list(geometry), list(file_bytes), skipped)


def bucket_batches(shapes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """All batches of item positions: items grouped by shape (sorted), in position order, chunked."""
    groups: dict[tuple[int, int], list[int]] = {}
    for position, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(position)
    return [members[start:start + batch_size] for shape in sorted(groups)
            for members in [groups[shape]] for start in range(0, len(members), batch_size)]


class ShardedBucketBatchSampler(Sampler[list[int]]):
    """This rank's share of the bucket batches: batches ``rank, rank + world, ...``; disjoint and unrepeated."""

    def __init__(self, shapes: Sequence[tuple[int, int]], batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.batches = bucket_batches(shapes, batch_size)[rank::world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def scan_sizes(source: ImageSource, positions: Sequence[int], workers: int = 16) -> list[tuple[int, int] | None]:
    """(width, height) of every image at ``positions``, from file headers when the source has paths; None for an
    image that cannot be read."""
    path_of = getattr(source, "path", None)

    def size_of(position: int):
        try:
            if path_of is None:
                return source.load(position).size
            with Image.open(path_of(position)) as image:
                return image.size
        except READ_ERRORS:
            return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(size_of, positions))
