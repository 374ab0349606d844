"""``patchdd generate``: a diffusion prior -> generated synthetic sets (PNG ImageFolders), one per IPC.

Methods (:data:`GENERATIVE_METHODS`): ``dit`` samples every image from Gaussian noise with a class-conditional DiT
(the plain baseline, or a Minimax / self-adaptive-memory fine-tune); ``d3hr`` restarts from the latents of the group that
D3HR's group sampling chooses from each class's inverted-latent Gaussian (the statistics store written by
``patchdd predict -c configs/invert/...``); ``d4m`` runs img2img with an SD-layout prior from each class's k-means
prototypes of its training latents. Work is planned on the CPU
(:mod:`patchdd.generation.plan`), then run by ``Trainer.predict`` (bf16 on a GPU, DDP over canonical batches);
the sets are written in the same folder format as ``distill``'s, with ``provenance.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from patchdd.data.sources import ClassMapping, data_fingerprint
from patchdd.data.subsets import imagenet_wnids
from patchdd.errors import StoreMismatchError
from patchdd.formats.latent_cache import LatentCache
from patchdd.formats.latent_stats import LatentStatsStore
from patchdd.formats.outputs import atomic_directory, atomic_file, exclusive_output, replace_directory
from patchdd.formats.stores import MANIFEST_FILE, settings_difference
from patchdd.formats.synthetic_folder import finish_generated_set
from patchdd.generation.plan import (D3HROptions, D4MOptions, SamplingOptions, WorkItem, canonical_batches,
                                     group_items, noise_items, prototype_items, provenance_columns)
from patchdd.generation.profiles import apply_profile, profile_label
from patchdd.generation.prototypes import kmeans_prototypes, stream_order
from patchdd.methods.synthesis import check_ipcs, subset_mapping
from patchdd.priors.dit import DEFAULT_DIT, weights_hash
from patchdd.workflows.invoke import deprecated

GENERATIVE_METHODS = {
    "dit": "class-conditional DiT sampling from Gaussian noise (the plain-DiT baseline; Minimax / self-adaptive-memory priors)",
    "d3hr": "D3HR: DDIM inversion statistics, group sampling, generation from the chosen latents (Zhao et al.)",
    "d4m": "D4M: per-class k-means prototypes of the VAE latents, text-conditioned img2img from them",
}
SETTINGS_FILE = ".generate.json"
SQUASH_RESIZE = {"bilinear": "torchvision", "bicubic": "buckets"}  # D4M's squash filter -> ScoringDataModule resize


def device_of(accelerator: str) -> torch.device:
    """Where planning work (group sampling) runs: the GPU when the run uses one."""
    return torch.device("cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu")


def available_classes(dit, store: LatentStatsStore | None) -> ClassMapping:
    """The classes a method can make: the statistics store's (d3hr), else the prior's label table."""
    if store is not None:
        return ClassMapping.from_json(store.manifest.classes)
    return dit.class_mapping or ClassMapping.for_folders(imagenet_wnids())


def open_statistics(stats: str | None, d3hr: D3HROptions, prior_hash: str,
                    allow_partial: bool = False) -> LatentStatsStore:
    """The latent statistics store of ``d3hr``, checked to be complete (unless ``allow_partial``) and made with the
    prior and the restart timestep."""
    if stats is None:
        raise ValueError("generate --method d3hr needs --stats DIR: the latent statistics store written by "
                         "`patchdd predict -c configs/invert/<config>.yaml --stats.dir DIR`")
    store = LatentStatsStore.open(stats)
    store.require_complete(allow_partial)
    settings = store.manifest.settings
    if settings.get("prior_hash") != prior_hash:
        raise StoreMismatchError(f"{stats} was inverted with other DiT weights ({settings.get('prior_hash')}) than "
                                 f"--prior ({prior_hash})")
    if settings.get("timestep") != d3hr.timestep:
        raise StoreMismatchError(f"{stats} holds latents at t = {settings.get('timestep')}, --d3hr.timestep is "
                                 f"{d3hr.timestep}")
    return store


def encode_d4m_latents(data_module, vae, options: D4MOptions, seed: int, cache_dir: Path, trainer_kwargs: dict,
                       progress: bool, overwrite: bool = False) -> LatentCache:
    """D4M's encode pass: every training image of ``data_module`` squashed to ``options.image_size`` and encoded
    once into the latent cache at ``cache_dir``, sharded over the ranks and resumable (the images already cached are
    left out: a later IPC encodes nothing). A cache of other settings or data is refused (``overwrite``: encoded
    afresh). Returns the complete cache."""
    import lightning as L

    from patchdd.datamodules.score_writer import LatentCacheWriter, pass_settings
    from patchdd.datamodules.scoring_data import ScoringDataModule
    from patchdd.lightning_modules.generation import PrototypeEncoder

    if options.resize_filter not in SQUASH_RESIZE:
        raise ValueError(f"d4m.resize_filter must be one of {sorted(SQUASH_RESIZE)}, got {options.resize_filter!r}")
    images = ScoringDataModule(data_module, split="train", image_size=options.image_size, whole_image=True,
                               resize=SQUASH_RESIZE[options.resize_filter], batch_size=options.encode_batch,
                               num_workers=options.encode_workers)
    encoder = PrototypeEncoder(vae, options.latent_mode, seed)
    trainer = L.Trainer(**trainer_kwargs, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=progress, use_distributed_sampler=False,
                        callbacks=[LatentCacheWriter(str(cache_dir))])
    if overwrite and (cache_dir / MANIFEST_FILE).is_file():
        try:
            LatentCache.open(cache_dir).check(pass_settings(trainer, encoder, images), images.class_mapping.to_json(),
                                              images.describe()["fingerprint"])
        except StoreMismatchError:
            shutil.rmtree(cache_dir)
    trainer.predict(encoder, datamodule=images, return_predictions=False)
    cache = LatentCache.open(cache_dir)
    cache.require_complete()
    return cache


def d4m_prototypes(cache: LatentCache, mapping: ClassMapping, ipc: int, options: D4MOptions, seed: int,
                   is_global_zero: bool = True, wait_seconds: float = 3600) -> dict[str, torch.Tensor]:
    """Per class folder, its ``ipc`` k-means prototypes (ipc, C, h, w) of the cached latents: computed once by
    global rank 0 (one class's latents in memory at a time) into ``prototypes/ipc{N}-{key}.safetensors`` of the
    cache, which every rank reads (``key``: the cache's content and the k-means settings)."""
    from safetensors.torch import load_file, save_file

    settings = {"cache": cache.content_hash(), "ipc": ipc, "kmeans": options.kmeans, "km_expand": options.km_expand,
                "leftover": options.leftover, "order": options.order, "seed": seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = cache.directory / "prototypes" / f"ipc{ipc}-{key}.safetensors"
    if is_global_zero and not path.is_file():
        prototypes = {}
        for label, rows in cache.rows_by_class().items():
            latents = cache.latents_of(rows)
            folder = mapping.folders[label]
            order = stream_order(len(latents), options.order, seed, folder)
            flat = latents.reshape(len(latents), -1).float().numpy()[order]
            centres = kmeans_prototypes(flat, ipc, options.kmeans, options.km_expand, seed, options.leftover)
            prototypes[folder] = torch.from_numpy(centres).float().view(ipc, *latents.shape[1:])
        path.parent.mkdir(exist_ok=True)
        with atomic_file(path) as tmp:
            save_file(prototypes, str(tmp))
    deadline = time.monotonic() + wait_seconds
    while not path.is_file():  # the other ranks (started at once under SLURM) wait for rank 0's file
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not write {path} within {wait_seconds:.0f} s")
        time.sleep(0.5)
    return load_file(str(path))


def pending_batches(items: Sequence[WorkItem], batches: list[list[int]], directory: Path) -> list[list[int]]:
    """The canonical batches with at least one image not yet on disk (a cut run redoes only those)."""
    return [b for b in batches if not all((directory / items[i].file).is_file() for i in b)]


def check_arguments(ipc: Sequence[int], batch_size: int) -> None:
    """Refuse bad arguments before anything is written."""
    check_ipcs(ipc)
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")


def input_identity(method: str, store: LatentStatsStore | None, source, mapping: ClassMapping,
                   data: str | None) -> dict:
    """What a set depends on besides the prior and the options: the statistics store's content (d3hr) or the
    training images' fingerprint (d4m), so that a resume never mixes images made from other inputs."""
    if store is not None:
        return {"stats_hash": store.content_hash()}
    if method == "d4m":
        fingerprint = data_fingerprint(source, mapping.folders, data)
        return {"data_hash": hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]}
    return {}


def prepare_building(building: Path, settings: dict, is_global_zero: bool = True, overwrite: bool = False,
                     wait_seconds: float = 600) -> None:
    """Resume ``building`` when it was started with the same settings and inputs; with other ones refuse it,
    naming what changed (``overwrite``: start it afresh). Only global rank 0 changes it; the other ranks (started at
    once under SLURM) wait until it records these settings, so that every rank plans from the same folder."""
    record = building / SETTINGS_FILE

    def recorded() -> dict | None:
        try:
            return json.loads(record.read_text())
        except (OSError, ValueError):
            return None

    if not is_global_zero:
        deadline = time.monotonic() + wait_seconds
        while recorded() != settings:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not prepare {building} within {wait_seconds:.0f} s")
            time.sleep(0.5)
        return
    previous = recorded()
    if building.exists() and previous != settings:
        if previous is not None and not overwrite:
            changed = settings_difference(previous, settings)
            raise StoreMismatchError(f"{building} holds images made from other inputs or settings; not mixing them:\n  "
                                     + "\n  ".join(changed) + "\n(pass --overwrite true to start this set afresh)")
        shutil.rmtree(building)
    building.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f"{record.name}.tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, record)


def generate(
    method: str = "dit",
    out: str = "runs/syn/dit",
    prior: str = DEFAULT_DIT,
    ipc: Sequence[int] = (10,),
    classes: str | None = "all",
    profile: str = "reference",
    stats: str | None = None,
    seed: int = 0,
    sampling: SamplingOptions = SamplingOptions(),
    d3hr: D3HROptions = D3HROptions(),
    data_root: str | None = None,
    d4m: D4MOptions = D4MOptions(),
    output_size: int | None = None,
    resize_filter: str = "lanczos",
    batch_size: int = 32,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str | None = None,
    vae: str | None = None,
    meta_dit: bool = True,
    overwrite: bool = False,
    allow_partial: bool = False,
    progress: bool = True,
    data: str | None = None,
    latent_cache: str | None = None,
) -> list[Path]:
    """Generate synthetic sets with a diffusion prior (dit, d3hr: a class-conditional DiT; d4m: SD), one per IPC.

    Each ``ipc{N}`` folder is built in ``.ipc{N}.building`` beside its target and renamed into place when complete;
    a cut run resumes there with the images it has not written yet, byte-identical to an uncut run (every image
    depends on its own seed and canonical batch only, whatever the world size). ``out`` is locked while written.

    Args:
        method: ``dit`` (from noise), ``d3hr`` (from group-sampled inverted latents) or ``d4m`` (img2img from
            k-means prototypes, with an SD-layout prior).
        out: output directory; gets ``ipc{N}/`` per IPC and ``contact_sheets/ipc{N}/``.
        prior: DiT prior folder (``DiTPipeline`` layout) or hub id (``facebook/DiT-XL-2-256``); for d4m an
            SD-layout folder or hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``).
        ipc: images per class, one or several (``--ipc 1 10 50``).
        classes: ``all``, a preset (imagenette, imagewoof, imagenet100) or comma-separated wnids / names, among the
            prior's classes (dit) or the statistics store's (d3hr).
        profile: ``reference`` (every method option's default: what the method's public code ran) or a named
            reading (d3hr: ``paper``; d4m: ``suite``) set on the options left at their defaults; the provenance
            records the profile the options follow.
        stats: the latent statistics store (d3hr).
        seed: seed of every image's noise and of the group sampling.
        sampling: sampler, steps, guidance (``SamplingOptions``).
        d3hr: restart timestep and offset, candidate groups, score (``D3HROptions``).
        data_root: the ImageFolder root whose training images give D4M's prototypes (d4m).
        d4m: image size, k-means, img2img strength, guidance, prompts (``D4MOptions``).
        output_size: side of the saved images (``None``: as decoded; D3HR saves 224 from 256).
        resize_filter: ``lanczos`` (D3HR), ``bicubic`` or ``bilinear``.
        batch_size: images per canonical batch (part of the plan: changing it restarts a building set).
        accelerator: Lightning accelerator (``auto``: the GPU when there is one).
        devices: Lightning devices per node (several: DDP over the canonical batches).
        num_nodes: nodes (under SLURM, ``srun`` starts one task per device: see the docs' cluster recipes).
        strategy: Lightning strategy.
        precision: Lightning precision (default: ``bf16-mixed`` on a GPU, ``32-true`` on the CPU).
        vae: the VAE that decodes a DiT's latents, hub id or folder (Minimax / Li et al.:
            ``stabilityai/sd-vae-ft-mse``); ``None``: the prior's own (dit, d3hr).
        meta_dit: run the DiT as Meta's code computes it (timestep frequencies / 128, LayerNorm eps 1e-6), as
            ``facebook/DiT-XL-2-256`` was trained; ``False``: diffusers' variant (dit, d3hr).
        overwrite: replace existing ``ipc{N}`` folders, and restart a building set whose inputs changed.
        allow_partial: use a statistics store whose inversion pass did not finish (refused otherwise); the sets'
            ``synthetic.json`` records it.
        progress: show a progress bar.
        data: the old spelling of ``data_root`` (accepted for one release, with a note).
        latent_cache: D4M's latent cache (every training image encoded once, sharded over the ranks, resumable, and
            reused by every later IPC); ``None``: ``OUT/d4m_latent_cache``.
    """
    import lightning as L

    from patchdd.datamodules.generation_data import SyntheticImageWriter, WorkItemDataModule
    from patchdd.datamodules.real import ImageFolderDataModule
    from patchdd.lightning_modules.generation import LatentGenerator, PromptedImg2Img

    if method not in GENERATIVE_METHODS:
        raise ValueError(f"unknown generative method {method!r}; choose from {sorted(GENERATIVE_METHODS)}")
    check_arguments(ipc, batch_size)
    d3hr, d4m = apply_profile("d3hr", profile if method == "d3hr" else "reference", d3hr), \
        apply_profile("d4m", profile if method == "d4m" else "reference", d4m)
    if method == "d4m" and vae is not None:
        raise ValueError("--vae decodes a DiT's latents (dit, d3hr); d4m decodes with its SD prior's VAE")
    if method == "dit" and profile != "reference":
        raise ValueError(f"profile {profile!r} is not one of dit's: reference")
    if data is not None:
        deprecated("data", "data_root")
        data_root = data
    store, source = None, None
    if method == "d4m":
        if data_root is None:
            raise ValueError("generate --method d4m needs --data_root ROOT: the training images its prototypes come "
                             "from")
        module = PromptedImg2Img(prior, d4m)
        prior_hash = weights_hash(module.prior.unet)
        data_module = ImageFolderDataModule(data_root, classes=classes)
        mapping, source = data_module.class_mapping, data_module.source("train")
        module.use_classes(mapping)
        model_labels = [0] * len(mapping)
    else:
        restart = d3hr.timestep if method == "d3hr" else None
        module = LatentGenerator(prior, sampling, start_timestep=restart, restart_offset=d3hr.restart_offset,
                                 final_steps=d3hr.final_steps if method == "d3hr" else "scheduler", vae=vae,
                                 meta_dit=meta_dit)
        prior_hash = weights_hash(module.dit.transformer)
        store = open_statistics(stats, d3hr, prior_hash, allow_partial) if method == "d3hr" else None
        available = available_classes(module.dit, store)
        mapping = subset_mapping(available, classes)
        model_labels = module.dit.label_ids(mapping.folders)
        if method == "d3hr":
            for n in ipc:
                d3hr.check_memory(n, math.prod(module.dit.latent_shape))
    device = device_of(accelerator)
    if precision is None:
        precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    group_device = device if d3hr.device == "auto" else torch.device(d3hr.device)
    options = {"seed": seed, "batch_size": batch_size, "output_size": output_size, "resize_filter": resize_filter,
               "start_timestep": module.start_timestep_used,
               "profile": profile_label(method, d3hr if method == "d3hr" else d4m) if method != "dit" else "reference"}
    if method == "d4m":
        options |= {"d4m": asdict(d4m), "data": str(Path(data_root).resolve())}
    else:
        options |= {"sampling": asdict(sampling), "meta_dit": meta_dit, "vae": vae}
    if method == "d3hr":
        options |= {"d3hr": asdict(d3hr), "stats": str(Path(stats).resolve()),
                    "stats_complete": store.is_complete()}
    options |= input_identity(method, store, source, mapping, data_root)
    targets = {n: Path(out) / f"ipc{n}" for n in ipc}
    writer = SyntheticImageWriter({n: str(Path(out) / f".ipc{n}.building") for n in ipc}, output_size, resize_filter)
    trainer_kwargs = {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes, "strategy": strategy,
                      "precision": precision}
    trainer = L.Trainer(**trainer_kwargs, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=progress, use_distributed_sampler=False, callbacks=[writer])
    with exclusive_output(out) if trainer.is_global_zero else nullcontext():
        existing = [str(p) for p in targets.values() if p.exists() and any(p.iterdir())]
        if existing and not overwrite:
            raise FileExistsError(f"output folders exist: {existing} (pass --overwrite true to replace them)")
        sums = store.sums() if store is not None else None
        cache_dir = Path(latent_cache or Path(out) / "d4m_latent_cache")
        cache = encode_d4m_latents(data_module, module.prior.vae, d4m, seed, cache_dir, trainer_kwargs, progress,
                                   overwrite) if method == "d4m" else None
        items: list[WorkItem] = []
        batches: list[list[int]] = []
        buildings = {n: Path(d) for n, d in writer.directories.items()}
        for n in ipc:
            prepare_building(buildings[n], {"method": method, "prior_hash": prior_hash, "ipc": n,
                                            "classes": list(mapping.folders), **options}, trainer.is_global_zero,
                             overwrite)
            if method == "d3hr":
                planned = group_items(mapping, model_labels, n, seed, sums, available.folders,
                                      module.dit.latent_shape, d3hr, group_device)
            elif method == "d4m":
                planned = prototype_items(mapping, n, seed, d4m_prototypes(cache, mapping, n, d4m, seed,
                                                                           trainer.is_global_zero))
            else:
                planned = noise_items(mapping, model_labels, n, seed)
            pending = pending_batches(planned, canonical_batches(planned, batch_size), buildings[n])
            batches += [[len(items) + i for i in b] for b in pending]
            items += planned
        print(f"generate ({method}): {len(items)} images planned, {sum(map(len, batches))} to make "
              f"({len(batches)} batches of up to {batch_size})", flush=True)
        if batches:
            trainer.predict(module, datamodule=WorkItemDataModule(items, batches), return_predictions=False)
            trainer.strategy.barrier("generated")  # every rank's images are written before rank 0 describes them
        if not trainer.is_global_zero:
            return list(targets.values())
        common = {"method": method, "start_timestep": module.start_timestep_used,
                  "cfg_scale": d4m.cfg_scale if method == "d4m" else sampling.cfg_scale,
                  "steps": d4m.steps if method == "d4m" else sampling.steps,
                  "scheduler": "pndm" if method == "d4m" else sampling.sampler}
        info = {"method": method, "prior": prior, "prior_hash": prior_hash, "options": options}
        for n, target in targets.items():
            own = [item for item in items if item.ipc == n]
            profile_note = options["profile"] + (" (IPC 1: the suite's extension; D3HR's code scores a group of one "
                                                 "with a NaN std)" if method == "d3hr" and n == 1 else "")
            sheets = Path(out) / "contact_sheets" / f"ipc{n}"
            with atomic_directory(sheets) as building_sheets:
                finish_generated_set(buildings[n], mapping, provenance_columns(own, common | {"profile": profile_note}),
                                     {"ipc": n, **info},
                                     building_sheets, title=f"IPC {n}, {method}")
            (buildings[n] / SETTINGS_FILE).unlink()
            replace_directory(buildings[n], target)
            print(f"wrote {target}: {len(own)} images ({len(mapping)} classes x {n})", flush=True)
    return list(targets.values())
