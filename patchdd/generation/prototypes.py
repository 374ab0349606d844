"""D4M's prototypes: per class, ``k = IPC`` cluster centres of the training images' VAE latents (read from the latent
cache, :mod:`patchdd.formats.latent_cache`), the starting points of its img2img generation. Plain functions on
arrays.

D4M fits scikit-learn's ``MiniBatchKMeans`` with ``partial_fit`` on chunks of ``km_expand x IPC`` latents of one
class as they stream in from a shuffled loader. Its code fits a class's shorter leftover chunk only for the class of
the very last image, and only when it holds at least IPC latents: with its shipped ``km_expand 1`` never
(:data:`LEFTOVER_RULES`: ``d4m_code`` fits full chunks only; ``all`` fits every class's leftover too).
"""

from __future__ import annotations

import numpy as np

from patchdd.errors import NotEnoughPatchesError

KMEANS_MODES = ("minibatch", "full")
LEFTOVER_RULES = ("d4m_code", "all")


def partial_fit_chunks(count: int, ipc: int, km_expand: int = 1, leftover: str = "d4m_code") -> list[slice]:
    """The chunks of ``km_expand x ipc`` rows a class's ``count`` latents are fitted in: the full ones, and with
    ``leftover="all"`` the shorter leftover one last."""
    if leftover not in LEFTOVER_RULES:
        raise ValueError(f"leftover must be one of {LEFTOVER_RULES}, got {leftover!r}")
    size = km_expand * ipc
    last = count if leftover == "all" else count - count % size
    return [slice(start, min(count, start + size)) for start in range(0, last, size)]


def kmeans_prototypes(latents: np.ndarray, ipc: int, mode: str = "minibatch", km_expand: int = 1,
                      random_state: int = 0, leftover: str = "d4m_code") -> np.ndarray:
    """``ipc`` cluster centres (ipc, D) of one class's flattened latents (n, D) in the order given, deterministic
    given ``random_state``: ``minibatch`` as D4M (MiniBatchKMeans, one ``partial_fit`` per chunk of
    :func:`partial_fit_chunks`), or ``full`` k-means."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if mode not in KMEANS_MODES:
        raise ValueError(f"k-means mode must be one of {KMEANS_MODES}, got {mode!r}")
    if len(latents) < ipc:
        raise NotEnoughPatchesError(f"a class with {len(latents)} images cannot give {ipc} prototypes")
    latents = np.asarray(latents, np.float64)
    if mode == "full":
        return KMeans(n_clusters=ipc, random_state=random_state, n_init="auto").fit(latents).cluster_centers_
    chunks = partial_fit_chunks(len(latents), ipc, km_expand, leftover)
    if not chunks:
        raise NotEnoughPatchesError(f"a class with {len(latents)} images fills no k-means chunk of km_expand x IPC "
                                    f"= {km_expand * ipc} (D4M's code fits full chunks only; --d4m.leftover all "
                                    "fits the shorter one)")
    kmeans = MiniBatchKMeans(n_clusters=ipc, batch_size=km_expand * ipc, random_state=random_state, n_init="auto")
    for chunk in chunks:
        kmeans.partial_fit(latents[chunk])
    return kmeans.cluster_centers_


def stream_order(count: int, order: str, seed: int, class_key: str) -> np.ndarray:
    """The order a class's latents stream into k-means: ``shuffled`` (a permutation seeded by (seed, class), as
    D4M's shuffled loader, unseeded there) or ``files`` (file order)."""
    from patchdd.generation.group_sampling import derive_seed

    if order == "files":
        return np.arange(count)
    if order == "shuffled":
        return np.random.default_rng(derive_seed(seed, "d4m-order", class_key)).permutation(count)
    raise ValueError(f"order must be shuffled or files, got {order!r}")
