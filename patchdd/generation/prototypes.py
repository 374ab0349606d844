"""D4M's prototypes: per class, ``k = IPC`` cluster centres of the training images' VAE latents, the starting points
of its img2img generation. Plain functions on arrays.

D4M fits scikit-learn's ``MiniBatchKMeans`` with ``partial_fit`` on chunks of ``km_expand x IPC`` latents of one
class as they stream in; its code fits the leftover chunk of the last class only (a bug): here every class's
leftover chunk is fitted.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from patchdd.errors import NotEnoughPatchesError

KMEANS_MODES = ("minibatch", "full")


def partial_fit_chunks(count: int, ipc: int, km_expand: int = 1) -> list[slice]:
    """The chunks of ``km_expand x ipc`` rows a class's ``count`` latents are fitted in, the leftover one last."""
    size = km_expand * ipc
    return [slice(start, min(count, start + size)) for start in range(0, count, size)]


def kmeans_prototypes(latents: np.ndarray, ipc: int, mode: str = "minibatch", km_expand: int = 1,
                      random_state: int = 0) -> np.ndarray:
    """``ipc`` cluster centres (ipc, D) of one class's flattened latents (n, D), deterministic given
    ``random_state``: ``minibatch`` as D4M (MiniBatchKMeans, one ``partial_fit`` per chunk), or ``full`` k-means."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if mode not in KMEANS_MODES:
        raise ValueError(f"k-means mode must be one of {KMEANS_MODES}, got {mode!r}")
    if len(latents) < ipc:
        raise NotEnoughPatchesError(f"a class with {len(latents)} images cannot give {ipc} prototypes")
    latents = np.asarray(latents, np.float64)
    if mode == "full":
        return KMeans(n_clusters=ipc, random_state=random_state, n_init="auto").fit(latents).cluster_centers_
    kmeans = MiniBatchKMeans(n_clusters=ipc, batch_size=km_expand * ipc, random_state=random_state, n_init="auto")
    for chunk in partial_fit_chunks(len(latents), ipc, km_expand):
        kmeans.partial_fit(latents[chunk])
    return kmeans.cluster_centers_


def class_latents(source, positions: list[int], vae, options, seed: int, device: torch.device) -> np.ndarray:
    """Scaled VAE latents (n, C, h, w) of a class's images (``source.load(position)``), squashed to
    ``options.image_size``, encoded ``options.encode_batch`` at a time; a posterior sample's noise is seeded by
    (seed, image id), so the latents do not depend on batching."""
    from patchdd.generation.group_sampling import derive_seed
    from patchdd.priors.dit import encode_scaled
    from patchdd.priors.sd import vae_downsample_factor

    side = options.image_size // vae_downsample_factor(vae)
    shape = (int(vae.config.latent_channels), side, side)
    rows = []
    for start in range(0, len(positions), options.encode_batch):
        chunk = positions[start:start + options.encode_batch]
        pixels = np.stack([np.asarray(source.load(p).resize((options.image_size, options.image_size),
                                                             Image.Resampling.BICUBIC)) for p in chunk])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
        noise = None
        if options.latent_mode == "sample":
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
                derive_seed(seed, "d4m", source.ids[p]))) for p in chunk])
        with torch.no_grad():
            rows.append(encode_scaled(vae, images, options.latent_mode, noise).cpu().numpy())
    return np.concatenate(rows)
