"""Stage II: selection, composition, DistilledDataModule, export and the `distill` command, on tiny stores."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from patchdd import cli
from patchdd.workflows.invoke import command_parser
from patchdd.methods import selection as selection_module
from patchdd.methods.registry import SynthesisOptions, make_selector
from patchdd.training.augment import AugmentOptions
from patchdd.methods.random_patches import patch_box_size, random_boxes
from patchdd.methods.rded import RDEDOptions, rded_pick, rded_tile_order
from patchdd.methods.composition import LayoutOptions, OriginalImages, crop_patch, layout_for, tile_images
from patchdd.datamodules.distilled import DistilledDataModule
from patchdd.methods.diffusion import DiffusionSelector
from patchdd.methods.rded import RDEDSelector
from patchdd.methods.store_index import StoreIndex
from patchdd.methods.synthesis import build_synthetic, subset_mapping
from patchdd.workflows.distill import distill
from patchdd.formats.synthetic_folder import TILES_FILE, read_synthetic_folder
from patchdd.data.sources import ClassMapping
from patchdd.datamodules.real import ImageFolderDataModule
from patchdd.errors import StoreError, StoreMismatchError
from patchdd.formats.score_store import Manifest, PatchTable, ScoreStore
from patchdd.errors import NotEnoughPatchesError
from patchdd.methods.selection import ClusterOptions, select_patches, cluster_features
from patchdd.training.zoo import build_model
from tests.conftest import write_image_folder

torch.set_num_threads(1)

WIDTH, HEIGHT = 48, 40  # original image size; short side 40
IMAGE_SIZE, PATCH_SIZE = 32, 16  # scoring settings: a 16 px patch at 32 px short side = a 20 px box here
BOX = 20
OUTPUT = 40  # output side: 2x2 tiles of 20 px (= the box: tiles are exact pixel copies), or one 40 px patch
LAYOUT = LayoutOptions(output_size=OUTPUT)
FAST = ClusterOptions(num_clusters=8, n_init=1)


def write_images(root: Path, counts: dict[str, int]) -> None:
    """``root/train/<class>/img_<i>.png`` (random pixels, WIDTH x HEIGHT) and one val image per class."""
    for seed, (folder, count) in enumerate(counts.items()):
        write_image_folder(root / "train", [folder], count, (WIDTH, HEIGHT), seed=seed)
    write_image_folder(root / "val", list(counts), 1, (WIDTH, HEIGHT), seed=99)


def write_store(directory: Path, root: Path, rows: list[dict], folders: list[str]) -> ScoreStore:
    """A store whose rows are given as dicts (image_id, label, box, score, feature)."""
    manifest = Manifest(
        settings={"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "topk": 2, "model": "test"},
        classes=ClassMapping.for_folders(folders).to_json(),
        data={"class_path": "patchdd.datamodules.real.ImageFolderDataModule",
              "init_args": {"root": str(root), "classes": folders}, "split": "train"},
    )
    store = ScoreStore.create_or_check(directory, manifest)
    store.append(PatchTable(
        image_ids=np.array([r["image_id"] for r in rows], dtype=object),
        labels=np.array([r["label"] for r in rows]),
        sizes=np.tile([WIDTH, HEIGHT], (len(rows), 1)),
        patch_index=np.array([r.get("patch", 0) for r in rows]),
        boxes=np.array([r["box"] for r in rows]),
        scores=np.array([r["score"] for r in rows], np.float32),
        features=np.array([r["feature"] for r in rows], np.float32),
    ))
    store.mark_complete()  # as a finished scoring pass does
    return store


def random_rows(counts: dict[str, int], patches_per_image: int = 2, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for label, (folder, count) in enumerate(counts.items()):
        for i in range(count):
            for p in range(patches_per_image):
                x0, y0 = int(rng.integers(0, WIDTH - BOX + 1)), int(rng.integers(0, HEIGHT - BOX + 1))
                rows.append({"image_id": f"{folder}/img_{i}.png", "label": label, "patch": p,
                             "box": [x0, y0, x0 + BOX, y0 + BOX], "score": float(rng.normal()),
                             "feature": rng.normal(size=6) + 3 * rng.integers(0, 3)})
    return rows


COUNTS = {"cls_a": 26, "cls_b": 25, "cls_c": 8}  # cls_c: 16 patches, too few for IPC 10 (40 needed)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(image root, store dir) shared by the tests that only read them."""
    base = tmp_path_factory.mktemp("distill")
    write_images(base / "images", COUNTS)
    write_store(base / "store", base / "images", random_rows(COUNTS), list(COUNTS))
    return base / "images", base / "store"


def build(store_dir: Path, classes: str, ipc: int, selector: str = "diffusion", cache: Path | None = None,
          seed: int = 0, clustering: ClusterOptions = FAST, **kw):
    store = ScoreStore.open(store_dir)
    index = StoreIndex(store)
    images = OriginalImages.from_data_spec(store.manifest.data)
    options = SynthesisOptions(selector, layout=kw.get("layout", LAYOUT), clustering=clustering,
                               rded=kw.get("rded") or RDEDOptions(), seed=seed, cache_dir=cache)
    chooser = make_selector(index, images, options)
    return build_synthetic(index, images, subset_mapping(index.classes, classes), ipc, chooser,
                           kw.get("layout", LAYOUT), progress=False)


def original(root: Path, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(root / "train" / image_id).convert("RGB"))


# --- selection ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ipc, per_image", [(1, 4), (10, 4), (50, 1)])
def test_selection_counts(data, tmp_path, ipc, per_image):
    root, store_dir = data
    synthetic, picks = build(store_dir, "cls_a,cls_b", ipc, cache=tmp_path)
    assert synthetic.images.shape == (2 * ipc, 3, OUTPUT, OUTPUT) and synthetic.grid == (2 if ipc <= 10 else 1)
    assert synthetic.images_per_class().tolist() == [ipc, ipc]
    assert len(picks) == 2 * ipc * per_image
    for label, folder in enumerate(["cls_a", "cls_b"]):
        mine = picks.store_rows[picks.labels == label]
        assert len(set(mine.tolist())) == len(mine)  # never a patch twice
        assert all(str(i).startswith(folder + "/") for i in picks.image_ids[picks.labels == label])


def test_class_with_too_few_patches_is_an_error(data, tmp_path):
    _, store_dir = data
    build(store_dir, "cls_c", 4, cache=tmp_path)  # 16 patches = exactly 4 x 2x2: fine
    with pytest.raises(NotEnoughPatchesError, match=r"IPC 10 needs 40 patches.*cls_c \(16\)"):
        build(store_dir, "all", 10, cache=tmp_path)


def hand_built_rows() -> list[dict]:
    """Three far-apart clusters with known medians; expected choice worked out in the test."""
    def row(i, feature, score):
        return {"image_id": f"cls_a/img_{i}.png", "label": 0, "box": [0, 0, BOX, BOX], "score": score,
                "feature": feature}
    return [
        # A: highest max (9) and mean (3) but median 1
        row(0, [0, 0], 9.0), row(1, [1, 0], 1.0), row(2, [0, 1], 1.0), row(3, [1, 1], 1.0),
        # B: median 4; its member nearest the centroid (10, 0.5) has the LOWEST score (3)
        row(4, [10, 0], 3.0), row(5, [11, 0], 4.0), row(6, [9, 0], 4.0), row(7, [10, 2], 4.0),
        # C: median 2
        row(8, [0, 10], 2.0), row(9, [0, 11], 2.5), row(10, [0, 13], 2.0), row(11, [1, 10], 2.0),
    ]


def test_ranking_rules_on_hand_built_store(tmp_path):
    write_images(tmp_path / "images", {"cls_a": 12})
    write_store(tmp_path / "store", tmp_path / "images", hand_built_rows(), ["cls_a"])
    # IPC 5 as single patches, k = 3, top 2 clusters: 5 // 2 = 2 from B, 2 from C, 1 best-score fill.
    layout = LayoutOptions(output_size=OUTPUT, compose_max_ipc=0)
    _, picks = build(tmp_path / "store", "all", 5, cache=tmp_path / "cache", layout=layout,
                     clustering=ClusterOptions(num_clusters=3, top_clusters=2, n_init=1))
    chosen = [int(Path(i).stem.split("_")[1]) for i in picks.image_ids]
    # B by distance: 4 (0.5), then 5 and 6 tie (1.12) -> position; C's centroid (0.25, 11): 9 (0.25), 8 (1.03)
    assert chosen == [4, 5, 9, 8, 0]
    assert picks.cluster_ranks.tolist() == [0, 0, 1, 1, 2]
    assert picks.member_ranks.tolist() == [0, 1, 0, 1, 0]
    assert picks.filled.tolist() == [False, False, False, False, True]


def test_select_patches_takes_per_cluster_quota_then_fill():
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(size=(30, 4)) + 8 * k for k in range(12)])
    scores = rng.normal(size=len(features))
    clustering = cluster_features(features, ClusterOptions(num_clusters=12, n_init=1))
    for count, quota in [(40, 4), (20, 2), (4, 0), (50, 5), (15, 1)]:
        chosen = select_patches(clustering, scores, count, top_clusters=10)
        assert len(chosen.positions) == count == len(set(chosen.positions.tolist()))
        assert (~chosen.filled).sum() == 10 * quota
        assert np.bincount(chosen.cluster_ranks[~chosen.filled], minlength=10).tolist() == [quota] * 10
        fill_scores = scores[chosen.positions[chosen.filled]]
        unused = np.setdiff1d(np.arange(len(scores)), chosen.positions)
        assert (np.diff(fill_scores) <= 0).all()  # fill in descending score, better than anything left unused
        assert len(fill_scores) == count - 10 * quota and fill_scores.min(initial=np.inf) >= scores[unused].max()
    with pytest.raises(NotEnoughPatchesError):
        select_patches(clustering, scores, len(scores) + 1, 10)


def test_fewer_clusters_when_few_patches():
    clustering = cluster_features(np.eye(5), ClusterOptions(num_clusters=32, n_init=1))
    assert clustering.num_clusters == 5


def test_determinism_under_a_seed(data, tmp_path):
    _, store_dir = data
    first, _ = build(store_dir, "cls_a", 10, cache=tmp_path / "one")
    second, _ = build(store_dir, "cls_a", 10, cache=tmp_path / "two")
    assert torch.equal(first.images, second.images)
    r1, p1 = build(store_dir, "cls_a,cls_b", 10, "random", seed=3)
    r2, p2 = build(store_dir, "cls_a,cls_b", 10, "random", seed=3)
    r3, p3 = build(store_dir, "cls_a,cls_b", 10, "random", seed=4)
    assert torch.equal(r1.images, r2.images) and not np.array_equal(p1.boxes, p3.boxes)
    alone, p_alone = build(store_dir, "cls_b", 10, "random", seed=3)  # a class's draw ignores the other classes
    assert np.array_equal(p_alone.boxes, p1.boxes[p1.labels == 1])


def test_cache_reuse_second_ipc_does_not_recluster(data, tmp_path, monkeypatch):
    _, store_dir = data
    build(store_dir, "cls_a,cls_b", 10, cache=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2

    def no_kmeans(*args, **kwargs):
        raise AssertionError("reclustered")

    monkeypatch.setattr(selection_module, "cluster_features", no_kmeans)
    index = StoreIndex(ScoreStore.open(store_dir))
    chooser = DiffusionSelector(index, ClusterOptions(num_clusters=8, n_init=1, top_clusters=5), tmp_path)
    images = OriginalImages.from_data_spec(index.store.manifest.data)
    for ipc in (1, 50):  # new IPC and new top-cluster count: selection only
        synthetic, _ = build_synthetic(index, images, subset_mapping(index.classes, "cls_b"), ipc, chooser, LAYOUT,
                                       progress=False)
        assert synthetic.images_per_class().tolist() == [ipc]
    assert chooser.cache.computed == 0
    with pytest.raises(AssertionError, match="reclustered"):  # other k-means settings: a new clustering
        build(store_dir, "cls_a", 1, cache=tmp_path, clustering=ClusterOptions(num_clusters=4, n_init=1))


# --- composition -------------------------------------------------------------------------------------------


def test_layouts():
    assert layout_for(10, LayoutOptions()) == layout_for(1, LayoutOptions())
    assert (layout_for(10, LayoutOptions()).grid, layout_for(10, LayoutOptions()).tile) == (2, 112)
    assert (layout_for(11, LayoutOptions()).grid, layout_for(11, LayoutOptions()).tile) == (1, 224)
    assert layout_for(20, LayoutOptions(compose_max_ipc=20, grid=4)).tile == 56
    with pytest.raises(ValueError):
        layout_for(0, LayoutOptions())


def test_composition_geometry_is_pixel_exact(data, tmp_path):
    root, store_dir = data
    synthetic, picks = build(store_dir, "cls_a,cls_b", 3, cache=tmp_path)
    t = OUTPUT // 2
    for k in range(len(picks)):  # 2x2: tile k % 4 of image k // 4 is the stored box, copied pixel for pixel
        x0, y0, x1, y1 = picks.boxes[k]
        r, c = divmod(k % 4, 2)
        tile = synthetic.images[k // 4, :, r * t:(r + 1) * t, c * t:(c + 1) * t].permute(1, 2, 0).numpy()
        assert np.array_equal(tile, original(root, picks.image_ids[k])[y0:y1, x0:x1])
    single, picks = build(store_dir, "cls_a", 11, cache=tmp_path)  # one patch per image, upscaled 20 -> 40
    for k in (0, 10):
        expected = Image.open(root / "train" / picks.image_ids[k]).convert("RGB").crop(tuple(picks.boxes[k]))
        expected = np.asarray(expected.resize((OUTPUT, OUTPUT), Image.Resampling.BICUBIC))
        assert np.array_equal(single.images[k].permute(1, 2, 0).numpy(), expected)


def test_tile_images_places_tiles_row_major():
    tiles = np.stack([np.full((2, 2, 3), v, np.uint8) for v in range(8)])
    images = tile_images(tiles, 2)
    assert images.shape == (2, 3, 4, 4)
    assert images[1, 0].tolist() == [[4, 4, 5, 5], [4, 4, 5, 5], [6, 6, 7, 7], [6, 6, 7, 7]]
    assert crop_patch(Image.fromarray(np.zeros((9, 9, 3), np.uint8)), (1, 2, 7, 8), 3).shape == (3, 3, 3)


# --- data module, class subsets ----------------------------------------------------------------------------


def test_class_subset_remapping_agrees_with_imagefolder(data, tmp_path):
    root, store_dir = data
    real = ImageFolderDataModule(root=str(root), image_size=32, batch_size=4, num_workers=0)
    synthesis = SynthesisOptions(layout=LAYOUT, clustering=FAST, cache_dir=str(tmp_path))
    module = DistilledDataModule(store=str(store_dir), classes=["cls c", "cls_a"], ipc=2, synthesis=synthesis,
                                 real=real, batch_size=3)
    assert module.class_mapping.folders == ("cls_a", "cls_c") == real.class_mapping.folders
    assert ImageFolderDataModule(root=str(root), classes="cls_c,cls_a").class_mapping == module.class_mapping
    module.setup("fit")
    assert module.synthetic_set.images_per_class().tolist() == [2, 2]
    for label, image_id in zip(module.picks.labels, module.picks.image_ids):
        assert module.class_mapping.folders[label] == image_id.split("/")[0]
    val_labels = torch.cat([batch.labels for batch in module.val_dataloader()])
    val_ids = real.source("val").ids
    assert [module.class_mapping.folders[i] for i in val_labels] == [i.split("/")[0] for i in val_ids]
    images, labels = next(iter(module.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (3, 3, OUTPUT, OUTPUT) and labels.dtype == torch.int64
    module.augment_in_workers, module.augment = True, AugmentOptions(image_size=24)
    images, labels = next(iter(module.train_dataloader()))
    assert images.dtype == torch.float32 and images.shape == (3, 3, 24, 24) and labels.dtype == torch.int64


def test_data_module_errors(data, tmp_path):
    _, store_dir = data
    with pytest.raises(ValueError, match="unknown class"):
        DistilledDataModule(store=str(store_dir), classes="cls_a,zebra")
    with pytest.raises(StoreError, match="no score store"):
        DistilledDataModule(store=str(tmp_path / "missing"))
    with pytest.raises(StoreMismatchError, match="patch_size: store has 16, requested 224"):
        DistilledDataModule(store=str(store_dir), synthesis=SynthesisOptions(expect_settings={"patch_size": 224}))
    with pytest.raises(ValueError, match="exactly one"):
        DistilledDataModule()


# --- baselines ---------------------------------------------------------------------------------------------


def test_random_selector_boxes(data):
    root, store_dir = data
    assert patch_box_size(WIDTH, HEIGHT, PATCH_SIZE, IMAGE_SIZE) == (BOX, BOX)
    assert patch_box_size(100, 30, 16, 32) == (15, 15) and patch_box_size(64, 32, 16, 32, whole_image=True) == (32, 16)
    sizes = np.array([[48, 40], [100, 30]])
    box_size = partial(patch_box_size, patch_size=PATCH_SIZE, image_size=IMAGE_SIZE)
    chosen, boxes = random_boxes(sizes, 5, box_size, np.random.default_rng(0))
    assert sorted(chosen[:2].tolist()) == [0, 1]  # every image once before any twice
    for i, (x0, y0, x1, y1) in zip(chosen, boxes):
        w, h = sizes[i]
        assert (x1 - x0, y1 - y0) == box_size(w, h)
        assert 0 <= x0 and x1 <= w and 0 <= y0 and y1 <= h
    synthetic, picks = build(store_dir, "cls_c", 10, "random", seed=0)  # boxes are unlimited: 40 from 8 images
    assert len(picks) == 40 and np.isnan(picks.scores).all() and (picks.store_rows == -1).all()
    assert len(set(picks.image_ids)) == 8 and synthetic.images_per_class().tolist() == [10]


def test_rded_pick_keeps_best_crop_per_image_and_rded_tiling():
    sizes = np.tile([WIDTH, HEIGHT], (6, 1))
    seen = {}

    def crop_and_score(positions, boxes):  # score = image position + 0.01 * box x0: higher images rank first
        seen["n"] = len(positions)
        return positions + 0.01 * boxes[:, 0]

    options = RDEDOptions(images_per_class=5, crops_per_image=3)
    images, boxes, scores = rded_pick(sizes, 4, 2, crop_and_score, options, np.random.default_rng(0))
    assert seen["n"] == 15  # 5 sampled images x 3 crops
    assert len(set(images.tolist())) == 4  # one crop per image
    ranked = np.sort(scores)[::-1]
    assert np.array_equal(scores, ranked[rded_tile_order(4, 2)])
    assert rded_tile_order(8, 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    with pytest.raises(NotEnoughPatchesError):
        rded_pick(sizes, 8, 2, crop_and_score, options, np.random.default_rng(0))


def test_rded_selector_with_tiny_teacher(data, tmp_path):
    root, store_dir = data
    torch.manual_seed(0)
    teacher = build_model("convnet_d2", num_classes=3, image_size=OUTPUT, width=8)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    options = RDEDOptions(teacher="convnet_d2", checkpoint=str(tmp_path / "teacher.pt"), teacher_kwargs={"width": 8},
                          images_per_class=10, crops_per_image=2, device="cpu")
    store = ScoreStore.open(store_dir)
    index = StoreIndex(store)
    images = OriginalImages.from_data_spec(store.manifest.data)
    chooser = RDEDSelector(index, images, options, seed=0, output_size=OUTPUT)
    mapping = subset_mapping(index.classes, "cls_a,cls_b")
    synthetic, picks = build_synthetic(index, images, mapping, 2, chooser, LAYOUT, progress=False)
    assert synthetic.images_per_class().tolist() == [2, 2] and len(picks) == 16
    for label in (0, 1):
        ids = picks.image_ids[picks.labels == label]
        assert len(set(ids)) == 8
    k = 5  # the stored score is the teacher's log-probability of the true class on that tile
    tile = crop_patch(Image.open(root / "train" / picks.image_ids[k]).convert("RGB"), picks.boxes[k], OUTPUT // 2)
    assert np.isclose(chooser.scorer.log_probs(tile[None], "cls_b" if picks.labels[k] else "cls_a")[0],
                      picks.scores[k], atol=1e-5)
    assert np.all(picks.scores <= 0)
    with pytest.raises(NotEnoughPatchesError, match="rded"):
        build_synthetic(index, images, mapping, 10, chooser, LAYOUT, progress=False)  # 40 > 10 sampled images


# --- export and CLI ----------------------------------------------------------------------------------------


def test_export_round_trip(data, tmp_path):
    root, store_dir = data
    out = tmp_path / "out"
    synthesis = SynthesisOptions(layout=LAYOUT, clustering=FAST, cache_dir=str(tmp_path / "cache"))
    distill(str(store_dir), str(out), ipc=[3, 12], classes="cls_b,cls_a", synthesis=synthesis, progress=False)
    module = DistilledDataModule(store=str(store_dir), classes="cls_a,cls_b", ipc=3, synthesis=synthesis)
    module.setup("fit")
    reloaded = DistilledDataModule(synthetic_dir=str(out / "ipc3"))
    reloaded.setup("fit")
    assert torch.equal(reloaded.synthetic_set.images, module.synthetic_set.images)
    assert torch.equal(reloaded.synthetic_set.labels, module.synthetic_set.labels)
    assert reloaded.synthetic_set.grid == 2 and reloaded.class_mapping == module.class_mapping
    info = json.loads((out / "ipc3" / "synthetic.json").read_text())
    assert info["store_hash"] == ScoreStore.open(store_dir).content_hash() and info["selector"] == "diffusion"
    tiles = pq.read_table(out / "ipc3" / TILES_FILE).to_pylist()
    assert len(tiles) == 2 * 3 * 4
    for row in tiles[:8]:  # every tile traces to its source pixels
        x0, y0, x1, y1 = row["box"]
        image = np.asarray(Image.open(out / "ipc3" / row["file"]))
        t = OUTPUT // 2
        tile = image[row["tile_row"] * t:(row["tile_row"] + 1) * t, row["tile_col"] * t:(row["tile_col"] + 1) * t]
        assert np.array_equal(tile, original(root, row["source_image"])[y0:y1, x0:x1])
        assert row["class"] == row["source_image"].split("/")[0] and row["store_row"] >= 0
    only_b = read_synthetic_folder(out / "ipc12", ["cls_b"])
    assert only_b.labels.tolist() == [0] * 12 and only_b.grid == 1
    assert (out / "contact_sheets" / "ipc12" / "cls_a.png").is_file()
    with pytest.raises(FileExistsError):
        distill(str(store_dir), str(out), ipc=[3], classes="cls_a", synthesis=SynthesisOptions(layout=LAYOUT),
                progress=False)
    with pytest.raises(NotEnoughPatchesError, match="IPC 10"):  # checked before IPC 1 is written
        distill(str(store_dir), str(tmp_path / "short"), ipc=[1, 10], classes="all",
                synthesis=SynthesisOptions(layout=LAYOUT), progress=False)
    assert not (tmp_path / "short" / "ipc1").exists()


def test_cli_distill_end_to_end(data, tmp_path):
    _, store_dir = data
    out = tmp_path / "cli"
    cli.main(["distill", "--store", str(store_dir), "--out", str(out), "--ipc", "1", "5", "10", "50",
              "--classes", "cls_a,cls_b", "--synthesis.layout.output_size", str(OUTPUT), "--synthesis.clustering.n_init", "1",
              "--progress", "false"])
    for ipc in (1, 5, 10, 50):
        for folder in ("cls_a", "cls_b"):
            files = sorted((out / f"ipc{ipc}" / folder).glob("*.png"))
            assert len(files) == ipc and files[0].name == "img_000.png"
            assert Image.open(files[0]).size == (OUTPUT, OUTPUT)
            assert (out / "contact_sheets" / f"ipc{ipc}" / f"{folder}.png").is_file()
        assert len(pq.read_table(out / f"ipc{ipc}" / TILES_FILE)) == 2 * ipc * (4 if ipc <= 10 else 1)
    assert len(list((store_dir / "clusters").glob("*.npz"))) == 2  # one clustering per class for all IPCs
    cli.main(["distill", "--store", str(store_dir), "--out", str(out), "--ipc", "1", "--classes", "cls_b",
              "--synthesis.layout.output_size", str(OUTPUT), "--synthesis.clustering.n_init", "1", "--progress", "false",
              "--overwrite", "true"])
    assert sorted(p.name for p in (out / "ipc1").iterdir() if p.is_dir()) == ["cls_b"]
    assert [p.name for p in (out / "contact_sheets" / "ipc1").iterdir()] == ["cls_b.png"]
    help_text = command_parser("distill", distill).format_help()
    assert "--synthesis.clustering.top_clusters" in help_text and "--synthesis.rded.crops_per_image" in help_text


def test_plain_imagefolder_from_another_method_is_read_with_its_grid(tmp_path) -> None:
    from patchdd.datamodules.distilled import DistilledDataModule
    from tests.conftest import write_image_folder

    write_image_folder(tmp_path / "rded_set", ["n01440764", "n02102040"], per_class=3, size=(50, 40))
    dm = DistilledDataModule(synthetic_dir=str(tmp_path / "rded_set"), folder_grid=2, folder_image_size=32)
    dm.setup("fit")
    synthetic = dm.synthetic_set
    assert synthetic.grid == 2 and synthetic.images.shape == (6, 3, 32, 32)
    assert synthetic.classes.names == ("tench", "English springer")
    assert synthetic.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_uint8_batches_are_gathered_whole_and_cover_the_set_once() -> None:
    import torch
    from torch.utils.data import DataLoader

    from patchdd.datamodules.distilled import SyntheticBatches, already_batched
    from patchdd.data.sources import ClassMapping
    from patchdd.formats.synthetic_set import SyntheticSet

    images = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 3, 2, 2).contiguous()
    synthetic = SyntheticSet(images, torch.tensor([0, 1, 0, 1, 0, 1, 0]), ClassMapping(("a", "b"), ("a", "b")))
    batches = list(DataLoader(SyntheticBatches(synthetic), batch_size=3, shuffle=True, collate_fn=already_batched))
    assert [len(b[0]) for b in batches] == [3, 3, 1]
    seen = torch.cat([b[0][:, 0, 0, 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(7))
    labels = torch.cat([b[1] for b in batches])
    assert torch.equal(labels, seen.long() % 2)
