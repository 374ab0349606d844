"""Stage I's math (paper Sec. 3.2-3.3, Alg. 1), as plain functions on tensors: the relevance score map of an
image under a text-to-image diffusion prior, the best patch(es), and the DIFT vector of each kept patch.

Sign convention: the relevance of Eq. 6 is ``R = E[L_cond - L_null]`` (lower = the class text helps denoising
= more class-relevant, Eq. 5). Everything here returns and stores ``score = -R``: HIGHER = MORE CLASS-RELEVANT.
:class:`patchdd.lightning_modules.scoring.DiffusionScorer` wires these functions into Lightning's predict loop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from patchdd.data.scoring_images import ResizeGeometry, ScoringBatch
from patchdd.formats.score_store import PatchTable
from patchdd.priors.sd import StableDiffusionPrior, up_block_features

NoisePredictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
AddNoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def stable_seed(*keys: object) -> int:
    """A 63-bit seed from the keys (same on every machine and rank, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


def draw_timesteps(generator: torch.Generator, num_draws: int, t_range: Sequence[float], num_train_timesteps: int,
                   stratified: bool = False) -> torch.Tensor:
    """``num_draws`` integer timesteps t = u x T with u ~ U(lo, hi); stratified: one u in each of ``num_draws``
    equal strata of (lo, hi)."""
    lo, hi = t_range
    u = torch.rand(num_draws, generator=generator, dtype=torch.float64)
    if stratified:
        u = (torch.arange(num_draws, dtype=torch.float64) + u) / num_draws
    t = torch.floor((lo + (hi - lo) * u) * num_train_timesteps).long()
    return t.clamp_(0, num_train_timesteps - 1)


def draw_image_noise(image_ids: Sequence[str], seed: int, num_draws: int, latent_shape: Sequence[int],
                     t_range: Sequence[float], num_train_timesteps: int, stratified: bool = False,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (seeded by its id, so independent of batching, rank and resume): timesteps (B, N) and noise
    (B, N, *latent_shape), on ``device``.

    The timesteps and, on the CPU, the noise come from one CPU generator per image (the store format since its
    first version). On an accelerator the noise is drawn there, from a generator of that device seeded with the
    same per-image seed: no host-side drawing, no copy (the numbers differ from the CPU's, as any GPU result does).
    """
    device = torch.device(device)
    seeds, timesteps, noise = [], [], []
    for image_id in image_ids:
        seeds.append(stable_seed(seed, "score", image_id))
        generator = torch.Generator().manual_seed(seeds[-1])
        timesteps.append(draw_timesteps(generator, num_draws, t_range, num_train_timesteps, stratified))
        if device.type == "cpu":  # the same generator goes on: the format of every CPU-scored store
            noise.append(torch.randn(num_draws, *latent_shape, generator=generator))
    noise = torch.stack(noise) if device.type == "cpu" else seeded_normal(seeds, (num_draws, *latent_shape), device)
    return torch.stack(timesteps).to(device), noise


def predict_noise(unet: torch.nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                  text_embeddings: torch.Tensor) -> torch.Tensor:
    """The UNet's eps prediction, its inputs cast to the UNet's dtype."""
    dtype = unet.dtype
    return unet(sample.to(dtype), timesteps, encoder_hidden_states=text_embeddings.to(dtype), return_dict=False)[0]


def squared_error_map(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, per location, in fp32: (B, C, h, w) -> (B, h, w)."""
    return (prediction.float() - target.float()).pow(2).sum(1)


def relevance_score_map(predict: NoisePredictor, add_noise: AddNoise, latents: torch.Tensor,
                        cond_embeddings: torch.Tensor, null_embeddings: torch.Tensor, timesteps: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor:
    """score = -(1/N) sum_i [L_cond - L_null] per latent location, (B, h, w) fp32; HIGHER = more class-relevant.

    ``latents`` (B, C, h, w), ``timesteps`` (B, N), ``noise`` (B, N, C, h, w). Draw i noises every latent with
    its own (t, eps) and asks the UNet for eps under the class prompt and the null prompt in ONE batch of 2B.
    """
    batch, num_draws = timesteps.shape
    embeddings = torch.cat([cond_embeddings, null_embeddings])
    total = torch.zeros(batch, *latents.shape[-2:], dtype=torch.float32, device=latents.device)
    for i in range(num_draws):
        eps, t = noise[:, i], timesteps[:, i]
        noisy = add_noise(latents, eps, t)
        cond, null = predict(torch.cat([noisy, noisy]), torch.cat([t, t]), embeddings).chunk(2)
        total += squared_error_map(cond, eps) - squared_error_map(null, eps)
    return -total / num_draws


def patch_window(patch_size: int | None, downsample: int, map_shape: Sequence[int]) -> tuple[int, int]:
    """Pooling window in latent cells: ``patch_size / downsample`` (224 px -> 28 at SD's 8), clamped to the map;
    ``None`` = the whole map (whole-image mode)."""
    height, width = map_shape
    if patch_size is None:
        return height, width
    cells = max(1, patch_size // downsample)
    return min(cells, height), min(cells, width)


def pool_scores(score_map: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Mean score of every window position, stride 1: (B, h, w) -> (B, h - wh + 1, w - ww + 1)."""
    return F.avg_pool2d(score_map.unsqueeze(1), window, stride=1).squeeze(1)


def top_k_windows(pooled: torch.Tensor, window: tuple[int, int], k: int) -> list[tuple[int, int, float]]:
    """Greedy top-k of one pooled map (H, W) with no two windows overlapping: [(row, col, score)], best first
    (fewer than k when no non-overlapping position is left)."""
    scores = pooled.detach().float().cpu().clone()
    wh, ww = window
    picks: list[tuple[int, int, float]] = []
    for _ in range(k):
        flat = int(torch.argmax(scores))
        row, col = divmod(flat, scores.shape[1])
        value = float(scores[row, col])
        if value == float("-inf"):
            break
        picks.append((row, col, value))
        scores[max(0, row - wh + 1):row + wh, max(0, col - ww + 1):col + ww] = float("-inf")
    return picks


def window_box(row: int, col: int, window: tuple[int, int], downsample: int) -> tuple[int, int, int, int]:
    """A latent window as a box (x0, y0, x1, y1) in scored-image pixels."""
    wh, ww = window
    return col * downsample, row * downsample, (col + ww) * downsample, (row + wh) * downsample


def crop_and_resize(original: torch.Tensor, box: Sequence[int], size: int) -> torch.Tensor:
    """The box of a uint8 image (3, H, W) resized to size x size, as floats in [-1, 1]."""
    x0, y0, x1, y1 = box
    crop = original[:, y0:y1, x0:x1].float().unsqueeze(0)
    resized = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return (resized.clamp(0, 255) / 127.5 - 1).squeeze(0)


def pooled_unit_vectors(features: torch.Tensor) -> torch.Tensor:
    """Global-average-pool (P, C, h, w) feature maps and L2-normalise: (P, C) fp32."""
    return F.normalize(features.float().mean(dim=(-2, -1)), dim=-1)


def seeded_normal(seeds: Sequence[int], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Standard normal draws (len(seeds), *shape): each row from its own generator of ``device`` seeded by its seed
    (drawn where they are used: no host-side drawing, no copy)."""
    return torch.stack([torch.randn(*shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)
                        for seed in seeds])


def dift_vectors(prior: StableDiffusionPrior, patches: torch.Tensor, text_embeddings: torch.Tensor,
                 seeds: Sequence[int], timestep: int, up_block: int, ensemble: int = 8,
                 chunk: int = 128, features_fn=up_block_features) -> torch.Tensor:
    """DIFT vectors (P, C) of patches in [-1, 1]: the VAE latent of each patch noised at ``timestep`` with
    ``ensemble`` noise draws (from that patch's seed), features of UNet ``up_blocks[up_block]`` (the UNet
    stops there; ``features_fn`` may be a compiled :func:`up_block_features`) averaged over the draws,
    global-average-pooled and L2-normalised."""
    latents = prior.encode_images(patches)
    noise = seeded_normal(seeds, (ensemble, *latents.shape[1:]), latents.device)
    noisy = prior.add_noise(latents.repeat_interleave(ensemble, 0), noise.flatten(0, 1).to(latents),
                            torch.full((len(latents) * ensemble,), timestep, dtype=torch.long, device=latents.device))
    embeddings = text_embeddings.repeat_interleave(ensemble, 0)
    unet, maps = prior.unet, []
    for start in range(0, len(noisy), chunk):
        rows = slice(start, start + chunk)
        t = torch.full((len(noisy[rows]),), timestep, dtype=torch.long, device=noisy.device)
        maps.append(features_fn(unet, noisy[rows].to(unet.dtype), t, embeddings[rows].to(unet.dtype),
                                up_block).float())
    features = torch.cat(maps).unflatten(0, (len(latents), ensemble)).mean(1)
    return pooled_unit_vectors(features)


class KeptPatch(NamedTuple):
    """One kept patch: its image's position in the batch, its rank there (0 = best), score and original box."""

    image: int
    rank: int
    score: float
    box: tuple[int, int, int, int]


def keep_patches(pooled: torch.Tensor, window: tuple[int, int], k: int, geometry: Sequence[ResizeGeometry],
                 downsample: int) -> list[KeptPatch]:
    """The top-k non-overlapping windows of every pooled map (B, H, W), boxes mapped to original pixels."""
    return [KeptPatch(b, rank, score, geometry[b].box_to_original(window_box(row, col, window, downsample)))
            for b in range(len(pooled))
            for rank, (row, col, score) in enumerate(top_k_windows(pooled[b], window, k))]


def empty_rows() -> PatchTable:
    return PatchTable(np.zeros(0, object), np.zeros(0, np.int64), np.zeros((0, 2), np.int64), np.zeros(0, np.int64),
                      np.zeros((0, 4), np.int64), np.zeros(0, np.float32), np.zeros((0, 0), np.float32), [])


def patch_rows(batch: ScoringBatch, kept: list[KeptPatch], maps: np.ndarray, features: np.ndarray) -> PatchTable:
    """Store rows: one per kept patch, with its image's full score map."""
    owners = [p.image for p in kept]
    geometry = [batch.geometry[b] for b in owners]
    return PatchTable(
        image_ids=np.asarray([batch.image_ids[b] for b in owners], dtype=object),
        labels=batch.labels.cpu().numpy()[owners].astype(np.int64),
        sizes=np.asarray([(g.width, g.height) for g in geometry], np.int64).reshape(-1, 2),
        patch_index=np.asarray([p.rank for p in kept], np.int64),
        boxes=np.asarray([p.box for p in kept], np.int64).reshape(-1, 4),
        scores=np.asarray([p.score for p in kept], np.float32),
        features=features.astype(np.float32),
        score_maps=[maps[b] for b in owners],
        file_bytes=np.asarray([batch.file_bytes[b] for b in owners], np.int64),
    )
