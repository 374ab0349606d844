"""The generative branch I: the DiT stack, the sampling primitives, D3HR's statistics and group sampling, and the
``generate`` command (tiny DiT built from a config, analytic noise models; CPU, seconds)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from patchdd.errors import CheckpointMismatchError, DataError, PriorUnavailableError, StoreMismatchError
from patchdd.formats.latent_stats import ClassSums, LatentStatsStore
from patchdd.formats.synthetic_folder import INFO_FILE, PROVENANCE_FILE, read_synthetic_folder
from patchdd.generation.group_sampling import d3hr_code_skewness, group_sample, group_scores
from patchdd.generation.plan import D3HROptions, SamplingOptions, canonical_batches
from patchdd.generation.sampling import (ancestral_scheduler, ddim_invert, ddim_sample, ddim_schedulers,
                                         guided_output, predicted_x0, restart_index)
from patchdd.priors.dit import block_embedders, load_dit_prior, untied_copy
from patchdd.workflows.generate import generate
from student_helpers import CLASSES, SIZE, make_student, train_teacher, write_real_folder
from tiny_dit import SCHEDULE, save_tiny_dit, tiny_dit

GRID = ddim_schedulers(DDPMScheduler(**SCHEDULE).config, 50)
ALPHAS = DDPMScheduler(**SCHEDULE).alphas_cumprod


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory) -> Path:
    """A tiny DiT (learned variance) on the squares' four classes, 32 px images."""
    return save_tiny_dit(tmp_path_factory.mktemp("dit") / "tiny-dit", CLASSES.folders)


def inputs(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=generator), torch.randint(0, 1000, (batch,), generator=generator),
            torch.randint(0, 4, (batch,), generator=generator))


# --- the DiT stack ---------------------------------------------------------------------------------------------


def test_embedders_are_tied_in_memory_untied_on_export_and_checked_at_load(dit_dir, tmp_path):
    prior = tiny_dit(CLASSES.folders)
    embedders = block_embedders(prior.transformer)
    assert all(e is embedders[0] for e in embedders)
    untied = untied_copy(prior.transformer)
    per_embedder = sum(p.numel() for p in embedders[0].parameters())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(prior.transformer) == per_embedder * (len(embedders) - 1)
    z, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(untied(z, t, y).sample, prior.transformer(z, t, y).sample)
    reloaded = load_dit_prior(str(dit_dir))  # saved untied (safetensors refuses shared tensors), re-tied here
    assert all(e is block_embedders(reloaded.transformer)[0] for e in block_embedders(reloaded.transformer))
    assert reloaded.class_mapping.folders == CLASSES.folders and reloaded.null_id == 4
    reloaded.transformer.train()
    with torch.no_grad():  # per-block label dropout is off: train mode is deterministic
        assert torch.equal(reloaded.transformer(z, t, y).sample, reloaded.transformer(z, t, y).sample)

    weights = dit_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    broken = tmp_path / "broken"
    shutil.copytree(dit_dir, broken)
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.startswith("transformer_blocks.1.norm1.emb.class_embedder"))
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(broken / "transformer" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="per-block embedders that differ"):
        load_dit_prior(str(broken))


def test_missing_dit_weights_are_one_clear_error(tmp_path):
    with pytest.raises(PriorUnavailableError, match="facebook/DiT-XL-2-256"):
        load_dit_prior("facebook/DiT-XL-2-256", local_files_only=True)
    (tmp_path / "half" / "transformer").mkdir(parents=True)
    with pytest.raises(PriorUnavailableError, match=r"lacks the component folders \['vae', 'scheduler'\]"):
        load_dit_prior(str(tmp_path / "half"))


def test_label_ids_follow_the_prior_classes_and_refuse_others(dit_dir):
    prior = load_dit_prior(str(dit_dir))
    assert prior.label_ids(["blue", "red"]) == [2, 0]
    with pytest.raises(CheckpointMismatchError, match="not trained on the classes"):
        prior.label_ids(["purple"])


# --- sampling primitives ---------------------------------------------------------------------------------------


def test_classifier_free_guidance(dit_dir):
    prior = load_dit_prior(str(dit_dir))
    model, null = prior.transformer, prior.null_id
    z, t, y = inputs()
    with torch.no_grad():
        conditional = model(z, t, y).sample
        unconditional = model(z, t, torch.full_like(y, 4)).sample
        assert null == 4 and torch.allclose(guided_output(model, z, t, y, null, 1.0), conditional)
        mixed = unconditional + 3.0 * (conditional - unconditional)
        every = guided_output(model, z, t, y, null, 3.0)
        assert torch.allclose(every[:, :4], mixed[:, :4], atol=1e-5)
        assert torch.allclose(every[:, 4:], conditional[:, 4:], atol=1e-6)  # the learned variance is not guided
        three = guided_output(model, z, t, y, null, 3.0, channels=3)
        assert torch.allclose(three[:, :3], mixed[:, :3], atol=1e-5)
        assert torch.allclose(three[:, 3:], conditional[:, 3:], atol=1e-6)


def gaussian_eps(scale: float):
    """The optimal noise prediction for data N(0, scale^2 I): sqrt(1 - abar) x / (abar scale^2 + 1 - abar)."""

    def model_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = ALPHAS[t].view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * z / (abar * scale**2 + 1 - abar)

    return model_fn


def round_trip_error(model_fn, steps: int, offset: int = 0, t: int = 600) -> float:
    forward, inverse = ddim_schedulers(DDPMScheduler(**SCHEDULE).config, steps)
    z0 = 0.8 * torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    back = ddim_sample(model_fn, ddim_invert(model_fn, z0, inverse, t), forward, restart_index(forward, t, offset))
    return float((back - z0).norm() / z0.norm())


def test_inversion_is_exact_when_the_noise_prediction_does_not_depend_on_x():
    assert round_trip_error(lambda z, t: torch.zeros_like(z), 50) < 1e-5
    assert round_trip_error(lambda z, t: torch.full_like(z, 0.3), 50) < 1e-5


def test_inversion_converges_for_an_analytic_model_and_the_aligned_restart_is_better():
    errors = [round_trip_error(gaussian_eps(0.8), steps) for steps in (10, 50, 200)]
    assert errors[0] > errors[1] > errors[2] and errors[1] < 0.02
    forward = GRID[0]
    assert restart_index(forward, 600) == 19 and restart_index(forward, 600, offset=1) == 18
    assert round_trip_error(gaussian_eps(0.8), 50, offset=1) > 1.05 * errors[1]  # the code restarts x_600 at t = 620
    with pytest.raises(ValueError, match="not on the sampling grid"):
        restart_index(forward, 610)


def test_predicted_x0_is_the_schedulers_pred_original_sample():
    forward = GRID[0]
    z, _, _ = inputs()
    eps = torch.randn_like(z)
    expected = forward.step(eps, 600, z).pred_original_sample
    assert torch.allclose(predicted_x0(forward.alphas_cumprod, z, eps, torch.full((3,), 600)), expected, atol=1e-5)


def test_learned_range_ancestral_step_matches_the_closed_form_iddpm_posterior():
    scheduler = ancestral_scheduler(DDPMScheduler(**SCHEDULE).config, 50)
    assert scheduler.timesteps[:3].tolist() == [999, 979, 958] and scheduler.timesteps[-1] == 0
    t, prev = int(scheduler.timesteps[10]), int(scheduler.timesteps[11])
    z, _, _ = inputs(1)
    eps, v = torch.randn_like(z), torch.rand_like(z) * 2 - 1
    abar, abar_prev = ALPHAS[t].double(), ALPHAS[prev].double()
    beta = 1 - abar / abar_prev
    x0 = (z.double() - (1 - abar).sqrt() * eps) / abar.sqrt()
    mean = abar_prev.sqrt() * beta / (1 - abar) * x0 + (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar) * z
    log_variance = (v + 1) / 2 * beta.log() + (1 - v) / 2 * (beta * (1 - abar_prev) / (1 - abar)).log()
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    expected = mean + (0.5 * log_variance).exp() * noise
    out = scheduler.step(torch.cat([eps, v], 1), t, z, generator=[torch.Generator().manual_seed(7)]).prev_sample
    assert torch.allclose(out.double(), expected, atol=1e-4)


# --- D3HR: statistics and group sampling ---------------------------------------------------------------------


def test_class_sums_merge_to_torch_mean_and_var_whatever_the_sharding():
    generator = torch.Generator().manual_seed(0)
    latents, labels = torch.randn(30, 4, 2, 2, generator=generator), torch.randint(0, 3, (30,), generator=generator)
    for cuts in ([30], [7, 23], [1, 2, 3, 24]):
        parts, start = [], 0
        for size in cuts:
            parts.append(ClassSums.of(latents[start:start + size], labels[start:start + size]))
            start += size
        merged = sum(parts[1:], parts[0])
        for c in range(3):
            mean, variance = merged.gaussian(c)
            rows = latents[labels == c].reshape(-1, 16).double()
            assert torch.allclose(mean, rows.mean(0)) and torch.allclose(variance, rows.var(0))
    with pytest.raises(DataError, match="at least 2"):
        ClassSums.of(latents[:1], torch.tensor([5])).gaussian(5)


def test_a_group_with_the_target_moments_scores_zero_and_a_planted_group_wins():
    mean, std = torch.randn(64), torch.rand(64) + 0.5
    exact = torch.stack([mean - std / math.sqrt(2), mean + std / math.sqrt(2)])  # mean, unbiased std, no skew
    assert float(group_scores(exact[None], mean, std)) < 1e-5
    candidates = mean + std * torch.randn(500, 2, 64, generator=torch.Generator().manual_seed(0))
    candidates[321] = exact
    assert int(group_scores(candidates, mean, std).argmin()) == 321


def test_group_sampling_is_deterministic_and_independent_of_the_processing_batch():
    mean, std = torch.randn(32), torch.rand(32) + 0.5
    one = group_sample(mean, std, 3, 1000, seed=5, class_key="n01", block_size=64, blocks_per_batch=1)
    four = group_sample(mean, std, 3, 1000, seed=5, class_key="n01", block_size=64, blocks_per_batch=4)
    assert one.index == four.index and torch.equal(one.latents, four.latents) and one.score == four.score
    other = group_sample(mean, std, 3, 1000, seed=5, class_key="n02", block_size=64, blocks_per_batch=4)
    assert not torch.equal(other.latents, one.latents)  # each class draws its own candidates
    more = group_sample(mean, std, 3, 4000, seed=5, class_key="n01", block_size=64, blocks_per_batch=4)
    assert more.score <= one.score  # the same first blocks and more: never worse


def test_the_d3hr_code_score_variant_on_a_hand_computed_example():
    group = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [2.0, 4.0, 9.0]]])  # 3 members, D = 3
    columns = [[row[d] for row in group[0].tolist()] for d in range(3)]
    means = [sum(c) / 3 for c in columns]
    stds = [math.sqrt(sum((x - m) ** 2 for x in c) / 2) for c, m in zip(columns, means)]
    expected = [1.5 * sum(((group[0][i][d].item() - means[d]) / stds[d]) ** 3 for d in range(3)) for i in range(3)]
    assert torch.allclose(d3hr_code_skewness(group)[0], torch.tensor(expected), atol=1e-5)
    target_mean, target_std = torch.zeros(3), torch.ones(3)
    score = (torch.tensor(means).norm() + (torch.tensor(stds) - 1).norm() + 0.1 * torch.tensor(expected).norm())
    assert torch.isclose(group_scores(group, target_mean, target_std, variant="d3hr_code")[0], score, atol=1e-5)


# --- the inversion pass and generate ----------------------------------------------------------------------------


def invert(root: Path, prior: Path, stats: Path, batch_size: int, extra: list[str] = ()) -> None:
    from patchdd.workflows.invoke import run_trainer_command

    run_trainer_command(["predict", "-c", "configs/invert/toy_d3hr.yaml", "--data.root", str(root),
                         "--model.prior", str(prior), "--model.steps", "10", "--stats.dir", str(stats),
                         "--data.batch_size", str(batch_size), "--data.num_workers", "0",
                         "--trainer.default_root_dir", str(stats), "--trainer.enable_progress_bar", "false",
                         *extra])


@pytest.fixture(scope="module")
def toy_dit_dir(toy_root, tmp_path_factory) -> Path:
    """A tiny DiT on the toy classes, 64 px images (16 x 16 latents), epsilon only."""
    folders = sorted(p.name for p in (toy_root / "train").iterdir())
    return save_tiny_dit(tmp_path_factory.mktemp("toydit") / "dit", folders, sample_size=16, learn_sigma=False)


def test_inversion_statistics_store_is_batch_invariant_and_resumes(toy_root, toy_dit_dir, tmp_path):
    invert(toy_root, toy_dit_dir, tmp_path / "a", batch_size=24)
    invert(toy_root, toy_dit_dir, tmp_path / "b", batch_size=5, extra=["--stats.flush_images", "5"])
    a, b = LatentStatsStore.open(tmp_path / "a"), LatentStatsStore.open(tmp_path / "b")
    assert len(b.shard_paths()) > 1 and len(a.done_ids()) == 24
    sums_a, sums_b = a.sums(), b.sums()
    assert sums_a.count.tolist() == [6, 6, 6, 6] and torch.equal(sums_a.count, sums_b.count)
    assert torch.allclose(sums_a.total, sums_b.total, atol=1e-4)  # per-image posterior noise: batching is moot
    for shard in b.shard_paths()[2:]:
        shard.unlink()  # a run cut after two shards ...
    invert(toy_root, toy_dit_dir, tmp_path / "b", batch_size=5, extra=["--stats.flush_images", "5"])
    assert torch.allclose(b.sums().total, sums_a.total, atol=1e-4)  # ... resumes with the rest only
    with pytest.raises(StoreMismatchError, match="timestep"):
        invert(toy_root, toy_dit_dir, tmp_path / "a", batch_size=24, extra=["--model.timestep", "400"])


def test_generate_d3hr_writes_sets_that_reload(toy_root, toy_dit_dir, tmp_path):
    invert(toy_root, toy_dit_dir, tmp_path / "stats", batch_size=24)
    options = D3HROptions(candidates=256, block_size=64, blocks_per_batch=2)
    generate("d3hr", str(tmp_path / "out"), str(toy_dit_dir), ipc=[2], stats=str(tmp_path / "stats"),
             sampling=SamplingOptions(steps=10), d3hr=options, batch_size=3, progress=False)
    synthetic = read_synthetic_folder(tmp_path / "out" / "ipc2")
    assert synthetic.images.shape == (8, 3, 64, 64) and synthetic.grid == 1
    rows = pq.read_table(tmp_path / "out" / "ipc2" / PROVENANCE_FILE).to_pylist()
    # the reference profile restarts the t = 600 latent one grid step early, as D3HR's code (10 steps: t = 700)
    assert {r["init"] for r in rows} == {"group"} and {r["start_timestep"] for r in rows} == {700}
    assert all(r["group_score"] is not None for r in rows) and {r["profile"] for r in rows} == {"reference"}
    generate("d3hr", str(tmp_path / "paper"), str(toy_dit_dir), ipc=[1], profile="paper", stats=str(tmp_path / "stats"),
             sampling=SamplingOptions(steps=10), d3hr=options, batch_size=3, progress=False)
    rows = pq.read_table(tmp_path / "paper" / "ipc1" / PROVENANCE_FILE).to_pylist()
    assert {r["start_timestep"] for r in rows} == {600} and rows[0]["profile"].startswith("paper (IPC 1: the suite's")
    with pytest.raises(StoreMismatchError, match="other DiT weights"):
        other = save_tiny_dit(tmp_path / "other", synthetic.classes.folders, sample_size=16, learn_sigma=False, seed=3)
        generate("d3hr", str(tmp_path / "out2"), str(other), ipc=[2], stats=str(tmp_path / "stats"), d3hr=options,
                 progress=False)


class CutAfterFirstBatch(L.Callback):
    def on_predict_batch_end(self, trainer, *args) -> None:
        raise RuntimeError("simulated crash")


def test_generate_dit_exports_resumes_byte_identically_and_feeds_a_student(dit_dir, tmp_path, monkeypatch):
    sampling = SamplingOptions(sampler="ancestral", steps=8)
    generate("dit", str(tmp_path / "whole"), str(dit_dir), ipc=[1, 2], sampling=sampling, batch_size=3,
             progress=False)
    info = json.loads((tmp_path / "whole" / "ipc2" / INFO_FILE).read_text())
    assert info["version"] == 2 and info["kind"] == "generated" and info["method"] == "dit"
    assert info["options"]["sampling"]["sampler"] == "ancestral" and len(info["prior_hash"]) == 16
    files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("img_*.png"))
    assert len(files) == 4 * 1 + 4 * 2
    assert (tmp_path / "whole" / "contact_sheets" / "ipc2" / "red.png").is_file()

    import lightning

    original = lightning.Trainer.__init__

    def with_crash(self, *args, callbacks=(), **kwargs):
        original(self, *args, callbacks=[*callbacks, CutAfterFirstBatch()], **kwargs)

    monkeypatch.setattr(lightning.Trainer, "__init__", with_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate("dit", str(tmp_path / "cut"), str(dit_dir), ipc=[1, 2], sampling=sampling, batch_size=3,
                 progress=False)
    monkeypatch.setattr(lightning.Trainer, "__init__", original)
    written = list((tmp_path / "cut").rglob("img_*.png"))
    assert len(written) == 3 and not (tmp_path / "cut" / "ipc1").exists()  # one batch, nothing described yet
    generate("dit", str(tmp_path / "cut"), str(dit_dir), ipc=[1, 2], sampling=sampling, batch_size=3,
             progress=False)
    for file in files:
        assert (tmp_path / "cut" / file).read_bytes() == (tmp_path / "whole" / file).read_bytes()
    with pytest.raises(FileExistsError):
        generate("dit", str(tmp_path / "cut"), str(dit_dir), ipc=[2], sampling=sampling, progress=False)

    from patchdd.datamodules.distilled import DistilledDataModule
    from patchdd.datamodules.real import ImageFolderDataModule

    real = ImageFolderDataModule(str(write_real_folder(tmp_path / "real", 2, seed=0)), image_size=SIZE,
                                 eval_resize=SIZE, num_workers=0)
    data = DistilledDataModule(synthetic_dir=str(tmp_path / "whole" / "ipc2"), real=real, batch_size=4)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    student = make_student(train_teacher(tmp_path / "teacher.pt", steps=1), min_teacher_top1=0)
    trainer.fit(student, data)
    assert student.summary()["epochs"] == 1


def test_generate_writes_the_same_bytes_on_two_ddp_ranks_as_on_one(dit_dir, tmp_path):
    """Each image's noise comes from its own seed and every rank deals out the same canonical batches: a 2-process
    run writes the same files, byte for byte, and the same provenance."""
    import pyarrow.parquet as pq

    sampling = SamplingOptions(steps=4)
    runs = {"one": {}, "two": {"devices": 2, "strategy": "ddp_fork"}}
    for name, kwargs in runs.items():
        generate("dit", str(tmp_path / name), str(dit_dir), ipc=[2], sampling=sampling, batch_size=3,
                 accelerator="cpu", progress=False, **kwargs)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("img_*.png"))
    assert len(files) == 4 * 2
    assert sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("img_*.png")) == files
    for file in files:
        assert (tmp_path / "two" / file).read_bytes() == (tmp_path / "one" / file).read_bytes()
    tables = [pq.read_table(tmp_path / name / "ipc2" / "provenance.parquet").to_pylist() for name in runs]
    assert tables[0] == tables[1]


def test_canonical_batches_cover_every_item_once_for_any_world_size():
    from patchdd.datamodules.generation_data import FixedBatches

    batches = canonical_batches(list(range(11)), 3)
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    for world in (1, 2, 3):
        shards = [list(FixedBatches(batches[rank::world])) for rank in range(world)]
        assert sorted(i for shard in shards for batch in shard for i in batch) == list(range(11))
        assert all(batch in batches for shard in shards for batch in shard)  # the same batches, only dealt out


def test_unknown_method_and_missing_statistics_are_clear_errors(dit_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown generative method 'minimax'"):
        generate("minimax", str(tmp_path / "x"), str(dit_dir))
    with pytest.raises(ValueError, match="needs --stats"):
        generate("d3hr", str(tmp_path / "x"), str(dit_dir))


@pytest.mark.slow
def test_the_committed_toy_dit_makes_images_the_toy_teacher_recognises(tmp_path, monkeypatch):
    """CFG-4 DDIM samples of assets/toy_dit (IPC 10) against a freshly trained toy teacher: a prior that ignored
    its label would score about 10 % (measured when committed: 97 % against the demo's teacher; the previous 0.3 M
    parameter DiT, which drew blobs of the class hue: 55 %)."""
    from patchdd.data.sources import IMAGENET_MEAN, IMAGENET_STD
    from patchdd.data.toy import write_toy_dataset
    from patchdd.evaluation.synthetic_sets import recognition_rate
    from patchdd.training.zoo import build_model, find_run_checkpoint
    from patchdd.workflows.invoke import run_trainer_command

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    data = write_toy_dataset(str(tmp_path / "toy"))
    run_trainer_command(["fit", "-c", "configs/teacher/toy_convnet.yaml", "--data.root", str(data),
                         "--trainer.default_root_dir", str(tmp_path / "teacher"), "--trainer.enable_progress_bar",
                         "false"])
    teacher = build_model("convnet_d3", 10, image_size=64, width=32,
                          checkpoint=str(find_run_checkpoint(tmp_path / "teacher"))).eval()
    generate("dit", str(tmp_path / "syn"), "assets/toy_dit", ipc=[10], batch_size=50, progress=False)
    synthetic = read_synthetic_folder(tmp_path / "syn" / "ipc10")
    assert recognition_rate(teacher, synthetic.images, synthetic.labels, 64, IMAGENET_MEAN, IMAGENET_STD) > 0.80


# --- D4M ----------------------------------------------------------------------------------------------------------


def d4m_code_centres(latents: np.ndarray, labels: list[int], ipc: int, km_expand: int) -> dict[int, np.ndarray]:
    """A transcription of D4M's ``prototype_kmeans`` loop over a (shuffled) stream of latents."""
    from sklearn.cluster import MiniBatchKMeans

    models = {c: MiniBatchKMeans(n_clusters=ipc, random_state=0, batch_size=km_expand * ipc, n_init="auto")
              for c in set(labels)}
    pending = {c: [] for c in set(labels)}
    for latent, c in zip(latents, labels):
        pending[c].append(latent[None])
        if len(pending[c]) == km_expand * ipc:
            models[c].partial_fit(np.vstack(pending[c]))
            pending[c] = []
    if len(pending[c]) >= ipc:  # the last image's class only
        models[c].partial_fit(np.vstack(pending[c]))
    return {c: m.cluster_centers_ for c, m in models.items()}


def test_d4m_prototypes_follow_d4ms_chunks_and_the_suite_fits_every_leftover():
    from patchdd.errors import NotEnoughPatchesError
    from patchdd.generation.prototypes import kmeans_prototypes, partial_fit_chunks, stream_order

    assert [c.stop - c.start for c in partial_fit_chunks(23, 10, km_expand=1)] == [10, 10]  # the code's full chunks
    assert [c.stop - c.start for c in partial_fit_chunks(23, 10, 1, leftover="all")] == [10, 10, 3]
    rng = np.random.default_rng(0)
    latents, labels = rng.standard_normal((47, 12)), rng.integers(0, 2, 47).tolist()
    reference = d4m_code_centres(latents, labels, ipc=5, km_expand=1)
    for c in (0, 1):
        own = latents[[i for i, label in enumerate(labels) if label == c]]  # this class's latents in stream order
        assert np.array_equal(kmeans_prototypes(own, 5), reference[c])
        assert not np.array_equal(kmeans_prototypes(own, 5, leftover="all"), reference[c]) or len(own) % 5 == 0
    order = stream_order(23, "shuffled", 0, "n01440764")
    assert sorted(order) == list(range(23)) and not np.array_equal(order, np.arange(23))
    assert np.array_equal(order, stream_order(23, "shuffled", 0, "n01440764"))
    assert kmeans_prototypes(latents[:23], 4, mode="full").shape == (4, 12)
    with pytest.raises(NotEnoughPatchesError, match="cannot give 30 prototypes"):
        kmeans_prototypes(latents[:23], 30)
    with pytest.raises(NotEnoughPatchesError, match="fills no k-means chunk"):
        kmeans_prototypes(latents[:7], 4, km_expand=2)


def test_d4m_img2img_starts_where_diffusers_starts(prior_dir):
    from patchdd.generation.plan import D4MOptions
    from patchdd.lightning_modules.generation import PromptedImg2Img

    module = PromptedImg2Img(str(prior_dir), D4MOptions(steps=50, strength=0.7))
    module.scheduler.set_timesteps(50)  # what the pipeline does before asking where img2img starts
    pipeline_timesteps, _ = module.pipeline().get_timesteps(50, 0.7, "cpu")
    assert module.start_timestep_used == int(pipeline_timesteps[0]) == int(module.scheduler.timesteps[15])
    module.options = D4MOptions(steps=50, strength=1.0)
    assert module.start_timestep_used == int(module.scheduler.timesteps[0])


def test_generate_d4m_writes_prototype_sets(toy_root, prior_dir, tmp_path):
    from patchdd.generation.plan import D4MOptions

    options = D4MOptions(image_size=32, steps=4, prompt_template="An image of {name}", negative_prompt="")
    generate("d4m", str(tmp_path / "out"), str(prior_dir), ipc=[2], data=str(toy_root), d4m=options, batch_size=3,
             progress=False)
    synthetic = read_synthetic_folder(tmp_path / "out" / "ipc2")
    assert synthetic.images.shape == (8, 3, 32, 32) and synthetic.grid == 1
    rows = pq.read_table(tmp_path / "out" / "ipc2" / PROVENANCE_FILE).to_pylist()
    assert {r["init"] for r in rows} == {"prototype"} and {r["scheduler"] for r in rows} == {"pndm"}
    with pytest.raises(ValueError, match="needs --data_root"):
        generate("d4m", str(tmp_path / "x"), str(prior_dir), d4m=options)


def test_d4m_on_two_ranks_encodes_each_image_once_and_a_second_ipc_encodes_nothing(toy_root, prior_dir, tmp_path):
    from safetensors.torch import load_file

    from patchdd.formats.latent_cache import LatentCache
    from patchdd.generation.plan import D4MOptions

    options = D4MOptions(image_size=32, steps=2, prompt_template="An image of {name}", negative_prompt="",
                         encode_batch=5, encode_workers=0)
    common = {"data_root": str(toy_root), "d4m": options, "batch_size": 4, "accelerator": "cpu", "progress": False}
    # IPC 1: one generation batch of 4 on two ranks (the other rank has none and finishes cleanly)
    generate("d4m", str(tmp_path / "two"), str(prior_dir), ipc=[1], devices=2, strategy="ddp_fork", **common)
    cache = LatentCache.open(tmp_path / "two" / "d4m_latent_cache")
    ids = [i for shard in cache.shard_image_ids() for i in shard]
    assert len(ids) == len(set(ids)) == 4 * 6  # every training image once, over both ranks
    assert {p.name.split("-")[0] for p in cache.shard_paths()} == {"rank0", "rank1"}
    shards = cache.shard_paths()
    generate("d4m", str(tmp_path / "two"), str(prior_dir), ipc=[2], **common)  # a second IPC reuses the cache
    assert LatentCache.open(tmp_path / "two" / "d4m_latent_cache").shard_paths() == shards
    generate("d4m", str(tmp_path / "one"), str(prior_dir), ipc=[2], **common)  # one rank: the same prototypes
    files = [next((tmp_path / run / "d4m_latent_cache" / "prototypes").glob("ipc2-*")) for run in ("two", "one")]
    first, second = (load_file(str(f)) for f in files)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
