"""Stage I: the scoring math, the prior loader, the data side (buckets, shards, resume) and the store writer.

Everything runs on the CPU with the tiny random SD of ``tests/tiny_sd.py`` saved in the SD folder layout.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from patchdd.datamodules.real import ImageFolderDataModule
from patchdd.errors import DataError
from patchdd.errors import StoreMismatchError
from patchdd.formats.score_store import ScoreStore
from patchdd.datamodules.score_writer import ScoreStoreWriter
from patchdd.data.sources import reopen_source
from patchdd.data.scoring_images import ShardedBucketBatchSampler, bucket_batches, plan_resize
from patchdd.datamodules.scoring_data import ScoringDataModule
from patchdd.errors import PriorUnavailableError
from patchdd.priors.sd import StableDiffusionPrior, load_prior, up_block_features
from patchdd.lightning_modules.scoring import DiffusionScorer
from patchdd.scoring.relevance import (
    draw_image_noise,
    draw_timesteps,
    patch_window,
    pool_scores,
    predict_noise,
    relevance_score_map,
    top_k_windows,
    window_box,
)

torch.set_num_threads(1)

IMAGE_SIZE = 32  # short side of the scored images (tiny VAE: 4 px per latent cell -> 8 cells)
PATCH_SIZE = 16  # 4 x 4 latent cells
SIZES = [(48, 32), (32, 48), (40, 40), (80, 32), (36, 60), (32, 32), (64, 40)]


@pytest.fixture(scope="module")
def prior(prior_dir) -> StableDiffusionPrior:
    return load_prior(str(prior_dir))


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """Two classes of small images of varied (non-square) sizes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / "train" / name).mkdir(parents=True)
        for i, (w, h) in enumerate(SIZES):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"{i:02d}.png")
    return root


def scoring_data(root: Path, **kwargs) -> ScoringDataModule:
    options = {"image_size": IMAGE_SIZE, "bucket_multiple": 32, "batch_size": 2, "num_workers": 0} | kwargs
    return ScoringDataModule(ImageFolderDataModule(root=str(root)), **options)


def scorer(prior_dir: Path, **kwargs) -> DiffusionScorer:
    options = {"patch_size": PATCH_SIZE, "num_draws": 2, "dift_ensemble": 2, "top_k": 2} | kwargs
    return DiffusionScorer(prior=str(prior_dir), **options)


def run_predict(prior_dir, root, store_dir, writer_cls=ScoreStoreWriter, trainer_kwargs=None, **data_kwargs):
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
               "enable_model_summary": False} | (trainer_kwargs or {})
    trainer = L.Trainer(callbacks=[writer_cls(str(store_dir))], **options)
    trainer.predict(scorer(prior_dir), datamodule=scoring_data(root, **data_kwargs), return_predictions=False)


def raw_row_count(directory: Path) -> int:
    """Rows on disk before the reader drops duplicates (an image scored twice would show here)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in ScoreStore.open(directory).shard_paths())


def assert_same_store(a: Path, b: Path) -> None:
    ta, tb = ScoreStore.open(a).read(with_maps=True), ScoreStore.open(b).read(with_maps=True)
    assert raw_row_count(a) == len(ta) and raw_row_count(b) == len(tb)  # no image written twice
    assert list(ta.image_ids) == list(tb.image_ids)
    np.testing.assert_array_equal(ta.patch_index, tb.patch_index)
    np.testing.assert_array_equal(ta.boxes, tb.boxes)
    np.testing.assert_allclose(ta.scores, tb.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ta.features, tb.features, atol=2e-3)
    for ma, mb in zip(ta.score_maps, tb.score_maps):
        np.testing.assert_allclose(ma, mb, rtol=1e-2, atol=1e-3)


# ------------------------------------------------------------------------------------------------ the math
def direct_loop_scores(unet, scheduler, latents, cond, null, timesteps, noise) -> torch.Tensor:
    """Reference: one image and one prompt per UNet call, Eq. 6 written out literally, then negated."""
    maps = []
    for b in range(len(latents)):
        total = torch.zeros(latents.shape[-2:])
        for i in range(timesteps.shape[1]):
            t, eps = timesteps[b:b + 1, i], noise[b:b + 1, i]
            noisy = scheduler.add_noise(latents[b:b + 1], eps, t)
            loss_cond = ((unet(noisy, t, encoder_hidden_states=cond[b:b + 1]).sample - eps) ** 2).sum(1)[0]
            loss_null = ((unet(noisy, t, encoder_hidden_states=null[b:b + 1]).sample - eps) ** 2).sum(1)[0]
            total += loss_cond - loss_null
        maps.append(-total / timesteps.shape[1])
    return torch.stack(maps)


def test_batched_score_map_matches_direct_loop(prior):
    latents = torch.randn(3, 4, 8, 12)
    embeddings = prior.encode_prompts(["An image of cat", "An image of dog", "An image of ."])
    cond, null = embeddings[[0, 1, 0]], embeddings[[2, 2, 2]]
    timesteps, noise = draw_image_noise(["a", "b", "c"], 0, 3, latents.shape[1:], (0.1, 0.7), 1000)

    def predict(sample, t, emb):
        return predict_noise(prior.unet, sample, t, emb)

    batched = relevance_score_map(predict, prior.add_noise, latents, cond, null, timesteps, noise)
    reference = direct_loop_scores(prior.unet, prior.scheduler, latents, cond, null, timesteps, noise)
    assert batched.shape == (3, 8, 12) and batched.dtype == torch.float32
    assert batched.abs().max() > 1e-4  # the prompts do differ, so the test compares something
    torch.testing.assert_close(batched, reference, rtol=1e-4, atol=1e-5)


def test_identical_prompts_give_a_zero_map(prior):
    latents = torch.randn(2, 4, 8, 8)
    same = prior.encode_prompts(["An image of .", "An image of ."])
    timesteps, noise = draw_image_noise(["x", "y"], 0, 4, latents.shape[1:], (0.1, 0.7), 1000)
    scores = relevance_score_map(lambda s, t, e: predict_noise(prior.unet, s, t, e), prior.add_noise, latents,
                                 same, same, timesteps, noise)
    assert torch.count_nonzero(scores) == 0


def test_noise_depends_only_on_seed_and_image_id():
    t_ab, eps_ab = draw_image_noise(["a", "b"], 3, 5, (4, 6, 6), (0.1, 0.7), 1000)
    t_b, eps_b = draw_image_noise(["b"], 3, 5, (4, 6, 6), (0.1, 0.7), 1000)
    assert torch.equal(t_ab[1], t_b[0]) and torch.equal(eps_ab[1], eps_b[0])
    assert not torch.equal(eps_ab[0], eps_ab[1])
    assert not torch.equal(draw_image_noise(["b"], 4, 5, (4, 6, 6), (0.1, 0.7), 1000)[1], eps_b)


def test_timesteps_stay_in_range_and_stratify():
    t = draw_timesteps(torch.Generator().manual_seed(0), 4000, (0.1, 0.7), 1000)
    assert t.min() >= 100 and t.max() < 700 and t.float().std() > 150
    strata = draw_timesteps(torch.Generator().manual_seed(1), 6, (0.1, 0.7), 1000, stratified=True)
    bins = ((strata - 100) // 100).tolist()  # six strata of 100 steps each over [100, 700)
    assert bins == list(range(6))


def test_pooling_is_the_window_mean_with_stride_one():
    scores = torch.randn(2, 5, 7)
    pooled = pool_scores(scores, (3, 4))
    assert pooled.shape == (2, 3, 4)
    assert torch.allclose(pooled[1, 2, 3], scores[1, 2:5, 3:7].mean())
    assert patch_window(224, 8, (32, 48)) == (28, 28)
    assert patch_window(224, 8, (32, 24)) == (28, 24)  # clamped to the map
    assert patch_window(None, 8, (32, 32)) == (32, 32)  # whole-image mode


def test_top_k_windows_never_overlap():
    pooled = torch.zeros(6, 9)
    pooled[2, 3], pooled[3, 4], pooled[0, 8] = 5.0, 4.0, 3.0  # (3, 4) overlaps the best (2, 3) window
    picks = top_k_windows(pooled, (3, 3), k=3)
    assert [(r, c) for r, c, _ in picks[:2]] == [(2, 3), (0, 8)]
    assert picks[0][2] == 5.0
    for (r1, c1, _), (r2, c2, _) in zip(picks, picks[1:]):
        assert abs(r1 - r2) >= 3 or abs(c1 - c2) >= 3
    assert len(top_k_windows(torch.zeros(2, 2), (2, 2), k=3)) == 1  # only one window fits


# ------------------------------------------------------------------------------------------------ geometry
def test_resize_plan_keeps_aspect_rounds_to_buckets_and_caps():
    wide = plan_resize(500, 375, 256)  # 341 -> 320: short side 256, long side a multiple of 64
    assert (wide.out_width, wide.out_height) == (320, 256) and (wide.left, wide.top) == (0, 0)
    tall = plan_resize(375, 500, 256)
    assert (tall.out_width, tall.out_height) == (256, 320)
    panorama = plan_resize(1000, 200, 256)  # 1280 px long side -> resized keeping aspect, centre-cropped to 512
    assert (panorama.resized_width, panorama.resized_height) == (1280, 256)
    assert (panorama.out_width, panorama.out_height, panorama.left) == (512, 256, 384)
    square = plan_resize(32, 32, 256, square=True)
    assert (square.out_width, square.out_height) == (256, 256)


def test_boxes_map_back_to_original_pixels_for_non_square_images():
    geometry = plan_resize(600, 300, 64, multiple=32)  # 128 x 64, no crop: 4.6875 original px per scored px
    assert geometry.box_to_original((0, 0, 128, 64)) == (0, 0, 600, 300)
    assert geometry.box_to_original((32, 16, 64, 48)) == (150, 75, 300, 225)
    cropped = plan_resize(900, 300, 64, multiple=32)  # 192 x 64 resized, centre 128 x 64 kept (left = 32)
    assert cropped.left == 32 and cropped.box_to_original((0, 0, 128, 64)) == (150, 0, 750, 300)
    assert window_box(2, 5, (4, 4), 8) == (40, 16, 72, 48)


class OracleUNet(torch.nn.Module):
    """A noise predictor whose class-conditional prediction is exact only inside ``mask``; elsewhere, and for
    the null prompt, it predicts half the true noise. Every other attribute is the tiny UNet's, so DIFT's
    truncated pass runs the real blocks."""

    def __init__(self, inner, scheduler, clean: torch.Tensor, mask: torch.Tensor, null_embedding: torch.Tensor):
        super().__init__()
        self.inner, self.scheduler, self.clean, self.mask, self.null = inner, scheduler, clean, mask, null_embedding

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, sample, timesteps, encoder_hidden_states, return_dict=False):
        abar = self.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1).float()
        eps = (sample - abar.sqrt() * self.clean) / (1 - abar).sqrt()
        # the null prompt's embedding (equal up to float rounding across batch sizes; class prompts differ by ~1)
        is_null = ((encoder_hidden_states - self.null).abs() < 1e-4).flatten(1).all(1).view(-1, 1, 1, 1)
        exact = self.mask & ~is_null
        return (torch.where(exact, eps, 0.5 * eps),)


def test_planted_object_gets_the_best_patch(prior_dir, tmp_path):
    """The object's latent cells are the only place where the class prompt helps; the best patch must cover
    them and map back onto the planted box in the original (non-square, cropped) image. This pins the sign
    (score = -R, higher = class-relevant) and the geometry without training a prior."""
    root = tmp_path / "planted"
    (root / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (160, 48), (90, 120, 150)).save(root / "train" / "cat" / "0.png")
    data = scoring_data(root, batch_size=1)
    batch = next(iter(data.predict_dataloader()))
    geometry = batch.geometry[0]  # 160 x 48 -> 107 x 32 resized, centre 64 x 32 kept (left = 21)
    assert (geometry.out_width, geometry.out_height, geometry.left) == (64, 32, 21)
    model = scorer(prior_dir, top_k=1)
    model.setup("predict")
    clean = model.prior.encode_images(batch.images.float() / 127.5 - 1)  # (1, 4, 8, 16)
    mask = torch.zeros(1, 1, 8, 16, dtype=torch.bool)
    mask[..., 2:6, 9:13] = True  # scored pixels x 36..52, y 8..24
    null = model.prior.encode_prompts([model.null_prompt])
    model.prior.unet = OracleUNet(model.prior.unet, model.prior.scheduler, clean, mask, null)
    model.prepare(["cat"])
    rows = model.predict_step(batch)
    planted = geometry.box_to_original((36, 8, 52, 24))
    assert rows.scores[0] > 0
    assert tuple(rows.boxes[0]) == planted
    assert rows.score_maps[0][2:6, 9:13].min() > 0 and np.abs(np.delete(rows.score_maps[0], np.s_[9:13], 1)).max() == 0
    assert rows.features.shape == (1, 16) and np.isclose(np.linalg.norm(rows.features[0]), 1, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the prior
def test_prior_loads_frozen_from_an_sd_folder(prior_dir, prior):
    assert prior.downsample_factor == 4  # 3 VAE blocks
    assert not any(p.requires_grad for p in prior.parameters())
    prior.train()
    assert not prior.unet.training and not prior.vae.training


@pytest.mark.parametrize("which", ["tiny", "toy"])
def test_dift_features_are_the_full_passs_up_block_output_and_stop_there(prior, which):
    """The truncated forward equals what the full UNet pass computes at up_blocks[k], and never runs conv_out; the
    toy prior's UNet adds the pooled prompt to the time embedding (``addition_embed_type: text``)."""
    loaded = prior if which == "tiny" else load_prior(str(Path(__file__).parents[1] / "assets" / "toy_prior"))
    unet, side = loaded.unet, 8 if which == "tiny" else 16
    sample, t = torch.randn(2, 4, side, side), torch.tensor([160, 400])
    emb = loaded.encode_prompts(["An image of cat", "An image of dog"])
    seen = {}
    handles = [unet.up_blocks[k].register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o))
               for k in range(2)] + [unet.conv_out.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))]
    try:
        with torch.no_grad():
            unet(sample, t, encoder_hidden_states=emb)
            full = {k: seen[k] for k in range(2)}
            seen.clear()
            for k in range(2):
                torch.testing.assert_close(up_block_features(unet, sample, t, emb, up_block=k), full[k])
        assert "out" not in seen  # the rest of the UNet never ran
    finally:
        for handle in handles:
            handle.remove()


def test_offline_hub_id_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PriorUnavailableError, match="nobody/no-such-prior-xyz"):
        load_prior("nobody/no-such-prior-xyz")


def test_incomplete_prior_folder_names_missing_parts(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(PriorUnavailableError, match="vae"):
        load_prior(str(tmp_path))


# ------------------------------------------------------------------------------------------------ data side
@pytest.mark.parametrize("count", [0, 1, 5, 7, 13])
def test_bucket_shards_are_disjoint_and_complete(count):
    shapes = [(32, 32 + 32 * (i % 3)) for i in range(count)]
    for world in (1, 2, 3, 4):
        shards = [list(ShardedBucketBatchSampler(shapes, 2, rank, world)) for rank in range(world)]
        positions = [p for shard in shards for batch in shard for p in batch]
        assert sorted(positions) == list(range(count))  # none dropped, none repeated
        assert all(len({shapes[p] for p in batch}) == 1 for shard in shards for batch in shard)
    assert sum(len(b) for b in bucket_batches(shapes, 2)) == count


def test_max_images_per_class_and_whole_image_mode(image_root):
    data = scoring_data(image_root, max_images_per_class=3, whole_image=True, batch_size=8)
    batches = list(data.predict_dataloader())
    assert sum(len(b) for b in batches) == 6
    assert all(b.images.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE) for b in batches)
    assert reopen_source(data.describe()).ids == data.source.ids


def test_unknown_class_is_an_error(image_root):
    with pytest.raises(ValueError, match="zebra"):
        ScoringDataModule(ImageFolderDataModule(root=str(image_root), classes=["zebra"])).setup("predict")


def test_corrupt_image_is_an_error_unless_skipped(image_root, tmp_path):
    root = tmp_path / "corrupt"
    (root / "train" / "cat").mkdir(parents=True)
    Image.open(image_root / "train" / "cat" / "00.png").save(root / "train" / "cat" / "good.png")
    (root / "train" / "cat" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        scoring_data(root).predict_dataloader()
    with pytest.warns(UserWarning, match="bad.png"):
        batches = list(scoring_data(root, skip_unreadable=True).predict_dataloader())
    assert [b.image_ids for b in batches] == [["cat/good.png"]]


# ------------------------------------------------------------------------------------------------ the pass
def test_predict_writes_a_store_the_reader_loads(prior_dir, image_root, tmp_path):
    run_predict(prior_dir, image_root, tmp_path / "store")
    store = ScoreStore.open(tmp_path / "store")
    rows = store.read(with_maps=True)
    assert set(rows.image_ids) == set(scoring_data(image_root).source.ids)
    per_image = np.unique(rows.image_ids, return_counts=True)[1]
    assert per_image.min() >= 1 and per_image.max() == 2  # top-2 where two non-overlapping windows fit
    assert store.manifest.classes["names"] == ["cat", "dog"]
    for (w, h), box in zip(rows.sizes, rows.boxes):
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert np.allclose(np.linalg.norm(rows.features, axis=1), 1, atol=1e-2)
    best = rows.patch_index == 0
    first = {i: s for i, s, m in zip(rows.image_ids, rows.scores, best) if m}
    assert all(s <= first[i] + 1e-6 for i, s in zip(rows.image_ids, rows.scores))  # patch 0 is the best
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["settings"]["num_draws"] == 2


def test_whole_image_mode_keeps_the_whole_image(prior_dir, image_root, tmp_path):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ScoreStoreWriter(str(tmp_path / "whole"))])
    trainer.predict(scorer(prior_dir, patch_size=None),
                    datamodule=scoring_data(image_root, whole_image=True, max_images_per_class=2))
    rows = ScoreStore.open(tmp_path / "whole").read(with_maps=True)
    assert len(rows) == 4 and set(rows.patch_index) == {0}
    np.testing.assert_array_equal(rows.boxes[:, 2:], rows.sizes)
    assert not rows.boxes[:, :2].any()
    for score, score_map in zip(rows.scores, rows.score_maps):  # the patch score is the mean of the whole map
        assert score_map.shape == (8, 8) and np.isclose(score, score_map.mean(), rtol=1e-2, atol=1e-4)


class CrashingWriter(ScoreStoreWriter):
    """Dies after writing two batches, like a pre-empted job."""

    def write_on_batch_end(self, *args, **kwargs) -> None:
        super().write_on_batch_end(*args, **kwargs)
        self.writes.drain()
        if len(self.store.shard_paths()) == 2:
            raise RuntimeError("simulated crash")


def test_a_killed_run_resumes_to_the_same_store(prior_dir, image_root, tmp_path):
    run_predict(prior_dir, image_root, tmp_path / "whole")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_predict(prior_dir, image_root, tmp_path / "resumed", writer_cls=CrashingWriter)
    partial = ScoreStore.open(tmp_path / "resumed").done_ids()
    assert 0 < len(partial) < 2 * len(SIZES)
    run_predict(prior_dir, image_root, tmp_path / "resumed")
    assert_same_store(tmp_path / "whole", tmp_path / "resumed")  # the rerun scored only the rest


def test_a_store_with_other_settings_is_an_error(prior_dir, image_root, tmp_path):
    run_predict(prior_dir, image_root, tmp_path / "store", max_images_per_class=1)
    with pytest.raises(StoreMismatchError, match="image_size"):
        run_predict(prior_dir, image_root, tmp_path / "store", max_images_per_class=1, image_size=64)


def test_two_ddp_processes_write_the_same_store_as_one(prior_dir, image_root, tmp_path):
    run_predict(prior_dir, image_root, tmp_path / "single")
    run_predict(prior_dir, image_root, tmp_path / "ddp",
                trainer_kwargs={"devices": 2, "strategy": "ddp_fork"})
    names = {p.name.split("-")[0] for p in ScoreStore.open(tmp_path / "ddp").shard_paths()}
    assert names == {"rank0", "rank1"}
    assert_same_store(tmp_path / "single", tmp_path / "ddp")


def test_cli_predict_scores_with_the_toy_config(prior_dir, image_root, tmp_path):
    from patchdd.cli import main

    config = Path(__file__).parents[1] / "configs" / "score" / "toy.yaml"
    main(["predict", "-c", str(config), "--trainer.default_root_dir", str(tmp_path), "--data.root", str(image_root),
          "--model.prior", str(prior_dir), "--store.dir", str(tmp_path / "cli"), "--data.image_size", "32",
          "--data.bucket_multiple", "32", "--model.patch_size", "16", "--model.num_draws", "1",
          "--model.dift_ensemble", "1", "--data.num_workers", "0", "--trainer.enable_progress_bar", "false"])
    rows = ScoreStore.open(tmp_path / "cli").read()
    assert len(rows) == 2 * len(SIZES) and set(rows.labels) == {0, 1}


def test_scoring_without_a_store_directory_is_an_error(prior_dir, image_root):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[ScoreStoreWriter()])
    with pytest.raises(ValueError, match="--store.dir"):
        trainer.predict(scorer(prior_dir), datamodule=scoring_data(image_root), return_predictions=False)


def test_image_noise_on_the_cpu_is_the_stores_format():
    """Pinned values: a change here changes every CPU-scored store (a format bump, not a refactoring)."""
    timesteps, noise = draw_image_noise(["a/1.jpg", "b/2.jpg"], 0, 8, (4, 8, 10), (0.1, 0.7), 1000)
    assert timesteps.tolist() == [[606, 595, 129, 265, 614, 376, 684, 263], [664, 238, 375, 408, 522, 508, 175, 402]]
    assert hashlib.sha256(noise.numpy().tobytes()).hexdigest()[:16] == "615455bc245608d5"
