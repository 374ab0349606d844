"""Fault injection, third round: inputs that change under a run, partial stores, and the edges of ``generate``.

Each test failed before its fix (the issue note lists what each did then)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from patchdd import cli
from patchdd.errors import DataError, IncompleteStoreError, StoreError, StoreMismatchError, one_line
from patchdd.formats.latent_stats import ClassSums, LatentStatsStore
from patchdd.formats.score_store import ScoreStore
from patchdd.formats.stores import Manifest
from patchdd.formats.synthetic_folder import INFO_FILE, read_synthetic_folder
from patchdd.datamodules.generation_data import SyntheticImageWriter
from patchdd.generation.plan import D3HROptions, SamplingOptions
from patchdd.methods.registry import SynthesisOptions
from patchdd.workflows.distill import distill
from patchdd.workflows.generate import generate
from test_generation import CutAfterFirstBatch, invert
from test_reliability import resized_copy, two_class_images
from test_scoring import run_predict, scorer, scoring_data
from tiny_dit import save_tiny_dit

RANDOM = SynthesisOptions(selector="random")


def distill_random(store: Path, out: Path, ipc: int = 2, **kwargs) -> Path:
    distill(str(store), str(out), ipc=[ipc], synthesis=kwargs.pop("synthesis", RANDOM), progress=False, **kwargs)
    return out / f"ipc{ipc}"


@pytest.fixture
def scored(prior_dir, tmp_path) -> tuple[Path, Path]:
    """(image root, score store) from a real scoring pass over two classes of three images."""
    root = two_class_images(tmp_path / "images")
    run_predict(prior_dir, root, tmp_path / "store")
    return root, tmp_path / "store"


# --- 1. originals replaced under a store -----------------------------------------------------------------------
def test_originals_regenerated_in_place_are_refused(scored, tmp_path) -> None:
    root, store = scored
    for path in (root / "train").rglob("*.png"):  # same names, same pixel sizes, other images
        with Image.open(path) as image:
            size = image.size
        Image.new("RGB", size, (200, 30, 30)).save(path)
    with pytest.raises(DataError, match=r"is not the one that was scored: its file has \d+ bytes, the store recorded"):
        distill_random(store, tmp_path / "out")
    assert not (tmp_path / "out" / "ipc2").exists()


def test_images_root_at_an_upscaled_copy_is_refused(scored, tmp_path) -> None:
    root, store = scored
    copy = resized_copy(root, tmp_path / "upscaled", 2)  # 2x: every stored box still falls inside
    with pytest.raises(DataError, match=r"upscaled/train/cat/0.png is not the one that was scored"):
        distill_random(store, tmp_path / "out", synthesis=SynthesisOptions(selector="random",
                                                                            images_root=str(copy)))


def test_a_store_scored_with_a_relative_root_reads_its_own_images_from_anywhere(prior_dir, tmp_path,
                                                                                  monkeypatch) -> None:
    (tmp_path / "a").mkdir()
    two_class_images(tmp_path / "a" / "images", seed=0)
    monkeypatch.chdir(tmp_path / "a")
    run_predict(prior_dir, Path("images"), tmp_path / "store")  # --data.root images, relative
    expected = read_synthetic_folder(distill_random(tmp_path / "store", tmp_path / "from_a")).images
    (tmp_path / "b").mkdir()
    two_class_images(tmp_path / "b" / "images", seed=1)  # other images under the same relative path
    monkeypatch.chdir(tmp_path / "b")
    data = json.loads((tmp_path / "store" / "manifest.json").read_text())["data"]
    assert data["init_args"]["root"] == str((tmp_path / "a" / "images").resolve())
    again = read_synthetic_folder(distill_random(tmp_path / "store", tmp_path / "from_b")).images
    assert np.array_equal(again.numpy(), expected.numpy())  # cut from the scored images, not from b's


# --- 3. partial stores ------------------------------------------------------------------------------------------
class SigtermAfterFirstBatch(L.Callback):
    def on_predict_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.predict_loop.batch_progress.current.completed == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_cut_scoring_pass_leaves_an_incomplete_store_that_distill_refuses(prior_dir, tmp_path, capsys) -> None:
    from patchdd.datamodules.score_writer import ScoreStoreWriter

    root = two_class_images(tmp_path / "images")
    trainer = L.Trainer(callbacks=[SigtermAfterFirstBatch(), ScoreStoreWriter(str(tmp_path / "store"))],
                        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(SystemExit) as stop:
        trainer.predict(scorer(prior_dir), datamodule=scoring_data(root), return_predictions=False)
    assert stop.value.code == 143  # non-zero, with one line that says what happened
    assert "stopped by SIGTERM after the batch in hand" in capsys.readouterr().err
    store = ScoreStore.open(tmp_path / "store")
    assert not store.is_complete() and store.missing_images() == {"cat": (1, 3), "dog": (1, 3)}  # one batch of 2
    with pytest.raises(IncompleteStoreError, match=r"incomplete: 2 class\(es\) short of their planned images: "
                                                   r"cat \(1 of 3\), dog \(1 of 3\)"):
        distill_random(tmp_path / "store", tmp_path / "out")
    distill(str(tmp_path / "store"), str(tmp_path / "out"), ipc=[1], classes="cat", synthesis=RANDOM,
            allow_partial=True, progress=False)
    assert json.loads((tmp_path / "out" / "ipc1" / INFO_FILE).read_text())["store_complete"] is False
    with pytest.raises(Exception, match="The store is incomplete") as short:  # 2 patches of cat's 1 image, 4 asked
        distill(str(tmp_path / "store"), str(tmp_path / "out2"), ipc=[1], synthesis=SynthesisOptions(),
                allow_partial=True, progress=False)
    assert "score more images" not in str(short.value)
    run_predict(prior_dir, root, tmp_path / "store")  # the same command finishes the pass
    assert store.is_complete() and store.missing_images() == {}
    distill_random(tmp_path / "store", tmp_path / "out3")


@pytest.fixture(scope="module")
def stats(toy_root, tmp_path_factory) -> tuple[Path, Path]:
    """(toy DiT, complete latent statistics store of the toy data)."""
    base = tmp_path_factory.mktemp("stats")
    folders = sorted(p.name for p in (toy_root / "train").iterdir())
    dit = save_tiny_dit(base / "dit", folders, sample_size=16, learn_sigma=False)
    invert(toy_root, dit, base / "stats", batch_size=6, extra=["--stats.flush_images", "6"])  # a shard per class
    return dit, base / "stats"


D3HR = D3HROptions(candidates=128, block_size=64, blocks_per_batch=1)


def generate_d3hr(dit: Path, stats_dir: Path, out: Path, **kwargs) -> None:
    generate("d3hr", str(out), str(dit), ipc=kwargs.pop("ipc", [2]), stats=str(stats_dir),
             sampling=SamplingOptions(steps=10), d3hr=kwargs.pop("d3hr", D3HR), batch_size=3, progress=False, **kwargs)


def test_a_partial_statistics_store_is_refused_unless_allowed(stats, tmp_path) -> None:
    dit, complete = stats
    partial = shutil.copytree(complete, tmp_path / "partial")
    store = LatentStatsStore.open(partial)
    assert store.is_complete() and len(store.shard_paths()) == 4
    store.shard_paths()[-1].unlink()  # a shard lost: its class's images were not summed
    with pytest.raises(IncompleteStoreError, match=r"1 class\(es\) short of their planned images: \w+ \(0 of 6\)"):
        generate_d3hr(dit, partial, tmp_path / "out")
    first_two = ",".join(store.manifest.classes["folders"][:2])
    generate_d3hr(dit, partial, tmp_path / "out", classes=first_two, allow_partial=True)
    assert json.loads((tmp_path / "out" / "ipc2" / INFO_FILE).read_text())["options"]["stats_complete"] is False


class CrashAtSecondBatch(L.Callback):
    """A crash once the first batch is written (every callback's batch end done)."""

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 1:
            raise RuntimeError("simulated crash")


def test_an_interrupted_inversion_is_incomplete_and_says_which_classes(toy_root, stats, tmp_path):
    dit, _ = stats
    with pytest.raises(RuntimeError, match="simulated crash"):
        invert(toy_root, dit, tmp_path / "stats", batch_size=5, extra=[
            "--stats.flush_images", "1", "--trainer.callbacks", '[{"class_path": "test_inputs.CrashAtSecondBatch"}]'])
    store = LatentStatsStore.open(tmp_path / "stats")
    assert sum(held for held, _ in store.missing_images().values()) == 5  # one batch of 5 summed, no more
    with pytest.raises(IncompleteStoreError, match=r"latent statistics store .* is incomplete: 4 class\(es\) short"):
        generate_d3hr(dit, tmp_path / "stats", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- 2. a generate resume with other inputs ---------------------------------------------------------------------
def cut_generate(monkeypatch, run) -> None:
    import lightning

    original = lightning.Trainer.__init__

    def with_crash(self, *args, callbacks=(), **kwargs):  # the generation pass (not D4M's encode pass) is cut
        generating = any(isinstance(c, SyntheticImageWriter) for c in callbacks)
        original(self, *args, callbacks=[*callbacks, *([CutAfterFirstBatch()] if generating else [])], **kwargs)

    monkeypatch.setattr(lightning.Trainer, "__init__", with_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run()
    monkeypatch.setattr(lightning.Trainer, "__init__", original)


def test_a_d3hr_resume_on_a_rebuilt_statistics_store_is_refused(toy_root, stats, tmp_path, monkeypatch) -> None:
    dit, complete = stats
    store = shutil.copytree(complete, tmp_path / "stats")
    cut_generate(monkeypatch, lambda: generate_d3hr(dit, store, tmp_path / "out"))
    assert len(list((tmp_path / "out").rglob("img_*.png"))) == 3
    other = shutil.copytree(toy_root, tmp_path / "other")
    for path in sorted((other / "train").rglob("*.png"))[::3]:
        path.unlink()  # other data
    shutil.rmtree(store)
    invert(other, dit, store, batch_size=24)  # the store rebuilt at the same path
    with pytest.raises(StoreMismatchError, match="stats_hash: store has"):
        generate_d3hr(dit, store, tmp_path / "out")
    generate_d3hr(dit, store, tmp_path / "out", overwrite=True)  # afresh: every image from the new store
    fresh = tmp_path / "fresh"
    generate_d3hr(dit, store, fresh)
    for path in (fresh / "ipc2").rglob("img_*.png"):
        assert path.read_bytes() == (tmp_path / "out" / "ipc2" / path.relative_to(fresh / "ipc2")).read_bytes()


def test_a_d4m_resume_on_a_replaced_data_folder_is_refused(prior_dir, tmp_path, monkeypatch) -> None:
    from patchdd.data.toy import write_toy_dataset
    from patchdd.generation.plan import D4MOptions

    options = D4MOptions(image_size=32, steps=4, prompt_template="An image of {name}", negative_prompt="")
    data = write_toy_dataset(str(tmp_path / "data"), num_classes=2, image_size=32, train_per_class=3,
                             val_per_class=1)

    def run(**kwargs):
        generate("d4m", str(tmp_path / "out"), str(prior_dir), ipc=[2], data_root=str(data), d4m=options, batch_size=3,
                 progress=False, **kwargs)

    cut_generate(monkeypatch, run)
    write_toy_dataset(str(data), num_classes=2, image_size=32, train_per_class=3, val_per_class=1, seed=5,
                      overwrite=True)
    with pytest.raises(StoreMismatchError, match="latent cache .* other settings"):  # its latents: the old images
        run()
    run(overwrite=True)
    assert len(list((tmp_path / "out" / "ipc2").rglob("img_*.png"))) == 4


def test_the_d4m_latent_cache_keeps_the_vaes_dtype_and_refuses_another_precision(prior_dir, tmp_path) -> None:
    """Under 16-true the cache holds fp16 latents (D4M's code keeps fp16 latents); the precision is one of its
    settings, so reusing it at 32-true is refused naming it, also for a cache written when the precision was only
    provenance."""
    from safetensors import safe_open

    from patchdd.data.toy import write_toy_dataset
    from patchdd.generation.plan import D4MOptions

    options = D4MOptions(image_size=32, steps=2, prompt_template="An image of {name}", negative_prompt="")
    data = write_toy_dataset(str(tmp_path / "data"), num_classes=2, image_size=32, train_per_class=3,
                             val_per_class=1)
    cache = tmp_path / "cache"

    def run(out: str, precision: str) -> None:
        generate("d4m", str(tmp_path / out), str(prior_dir), ipc=[2], data_root=str(data), d4m=options, batch_size=3,
                 progress=False, latent_cache=str(cache), precision=precision)

    run("half", "16-true")
    for shard in (cache / "shards").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as table:
            assert table.get_tensor("latents").dtype == torch.float16
    with pytest.raises(StoreMismatchError, match="precision: store has '16-true', requested '32-true'"):
        run("full", "32-true")
    manifest = json.loads((cache / "manifest.json").read_text())  # as an older release wrote it
    manifest["provenance"]["precision"] = manifest["settings"].pop("precision")
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreMismatchError, match="precision: store has '16-true', requested '32-true'"):
        run("full", "32-true")


# --- 4. toydata over an existing folder -------------------------------------------------------------------------
def test_toydata_never_mixes_into_an_existing_folder(tmp_path) -> None:
    from patchdd.data.toy import write_toy_dataset

    write_toy_dataset(str(tmp_path / "toy"), num_classes=2, image_size=16, train_per_class=4, val_per_class=1)
    with pytest.raises(FileExistsError, match="is not empty"):
        write_toy_dataset(str(tmp_path / "toy"), num_classes=2, image_size=16, train_per_class=2, val_per_class=1)
    assert len(list((tmp_path / "toy" / "train").rglob("*.png"))) == 8  # untouched
    write_toy_dataset(str(tmp_path / "toy"), num_classes=2, image_size=16, train_per_class=2, val_per_class=1,
                      overwrite=True)
    assert len(list((tmp_path / "toy" / "train").rglob("*.png"))) == 4  # replaced whole: no old extra image
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]  # nothing left beside it


# --- 5. a truncated JPEG ---------------------------------------------------------------------------------------
def test_a_truncated_jpeg_is_one_line_naming_it(prior_dir, tmp_path) -> None:
    root = two_class_images(tmp_path / "images")
    broken = root / "train" / "cat" / "broken.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(broken)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    with pytest.raises(DataError) as error:  # read in a DataLoader worker process
        run_predict(prior_dir, root, tmp_path / "store", num_workers=1)
    assert one_line(error.value) == (f"DataError: unreadable image {broken} (truncated JPEG): fix it or pass "
                                     "--data.skip_unreadable true")
    run_predict(prior_dir, root, tmp_path / "store", num_workers=1, skip_unreadable=True)
    assert len(ScoreStore.open(tmp_path / "store").done_ids()) == 6


# --- 6, 7. arguments checked before anything is written --------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--ipc", "0"], "every IPC must be at least 1, got --ipc 0"),
    (["--ipc", "-1"], "every IPC must be at least 1, got --ipc -1"),
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
])
def test_bad_generate_arguments_are_one_line_and_leave_nothing(args, message, tmp_path, capsys) -> None:
    from tiny_dit import save_tiny_dit as save

    dit = save(tmp_path / "dit", ["a", "b"])
    with pytest.raises(SystemExit):
        cli.main(["generate", "--method", "dit", "--prior", str(dit), "--out", str(tmp_path / "out"), *args])
    assert capsys.readouterr().err.strip().endswith(f"{message} (--traceback for the stack)")
    assert not (tmp_path / "out").exists()


def test_a_negative_distill_ipc_is_one_line_and_leaves_nothing(scored, tmp_path, capsys) -> None:
    _, store = scored
    with pytest.raises(SystemExit):
        cli.main(["distill", "--store", str(store), "--out", str(tmp_path / "out"), "--ipc", "2", "-1"])
    assert "every IPC must be at least 1, got --ipc 2 -1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_group_sampling_beyond_its_memory_limit_is_refused_up_front(stats, tmp_path) -> None:
    dit, store = stats
    with pytest.raises(ValueError, match=r"IPC 100000 needs about 1,562\.5 GiB at once .* over "
                                         r"--d3hr.memory_limit_gb 16"):
        generate_d3hr(dit, store, tmp_path / "out", ipc=[2, 100000],
                      d3hr=D3HROptions(candidates=1024, block_size=1024, blocks_per_batch=1))
    assert not (tmp_path / "out").exists()
    D3HROptions(block_size=1, blocks_per_batch=1).check_memory(100_000, 1024)  # one group at a time: 1.5 GiB


# --- 8. SIGTERM in generate -------------------------------------------------------------------------------------
def test_sigterm_stops_generate_after_the_batch_in_hand(stats, tmp_path, monkeypatch, capsys) -> None:
    import lightning

    dit, _ = stats
    original = lightning.Trainer.__init__

    def with_sigterm(self, *args, callbacks=(), **kwargs):
        original(self, *args, callbacks=[*callbacks, SigtermAfterFirstBatch()], **kwargs)

    monkeypatch.setattr(lightning.Trainer, "__init__", with_sigterm)
    with pytest.raises(SystemExit) as stop:
        generate("dit", str(tmp_path / "out"), str(dit), ipc=[2], sampling=SamplingOptions(steps=4), batch_size=3,
                 progress=False)
    monkeypatch.setattr(lightning.Trainer, "__init__", original)
    assert stop.value.code == 143 and "stopped by SIGTERM" in capsys.readouterr().err
    assert len(list((tmp_path / "out").rglob("img_*.png"))) == 3  # the batch in hand, no more
    generate("dit", str(tmp_path / "out"), str(dit), ipc=[2], sampling=SamplingOptions(steps=4), batch_size=3,
             progress=False)  # the same command resumes
    assert len(list((tmp_path / "out" / "ipc2").rglob("img_*.png"))) == 8


# --- 9. read-only stores, shared stores, full disks -------------------------------------------------------------
def test_a_read_only_store_is_distilled_with_a_cache_dir(scored, tmp_path, monkeypatch) -> None:
    import pyarrow.parquet as pq

    from patchdd.formats import score_store

    _, store = scored
    write_table = pq.write_table

    def read_only(table, where, *args, **kwargs):  # root ignores permission bits: refuse writes into the store
        if Path(where).resolve().is_relative_to(store.resolve()):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(where))
        return write_table(table, where, *args, **kwargs)

    monkeypatch.setattr(score_store.pq, "write_table", read_only)
    with pytest.raises(StoreError, match="pass --synthesis.cache_dir DIR"):
        distill_random(store, tmp_path / "out")
    synthesis = SynthesisOptions(selector="diffusion", cache_dir=str(tmp_path / "cache"))
    distill_random(store, tmp_path / "out", ipc=1, synthesis=synthesis)
    assert list((tmp_path / "cache" / "index").glob("rows-*.parquet"))
    assert not list(store.rglob("rows-*.parquet")) and not (store / "clusters").exists()


def test_statistics_shards_honour_the_umask(tmp_path) -> None:
    import torch

    store = LatentStatsStore.create_or_check(tmp_path / "stats", Manifest({}, {"folders": ["a"], "names": ["a"]},
                                                                          {}))
    previous = os.umask(0o022)
    try:
        from patchdd.formats import outputs

        outputs.current_umask.cache_clear()
        store.append(ClassSums.of(torch.randn(2, 4), torch.zeros(2, dtype=torch.long)), ["x", "y"])
    finally:
        os.umask(previous)
    assert oct(store.shard_paths()[0].stat().st_mode & 0o777) == oct(0o644)  # others can read a shared store


def test_a_full_disk_names_the_file(scored, monkeypatch) -> None:
    from patchdd.formats import score_store

    _, store = scored
    rows = ScoreStore.open(store).read()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as Arrow raises it: no file name

    monkeypatch.setattr(score_store.pq, "write_table", full)
    with pytest.raises(OSError, match=r"\[Errno 28\] No space left on device: '.*/shards/rank0-.*\.parquet'"):
        ScoreStore.open(store).append(rows)
