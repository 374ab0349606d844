"""Class subsets of ImageNet used in the dataset-distillation literature, and class-list resolution.

Presets hold ImageNet wnids. Resolution always returns wnids / folder names in sorted order, so that the
label ``i`` of a subset is the ``i``-th folder name in alphabetical order: the order torchvision's
``ImageFolder`` uses, which keeps the real and the synthetic data of the same subset in agreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

# fast.ai's ImageNette (10 easy classes).
IMAGENETTE = (
    "n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
    "n03394916", "n03417042", "n03425413", "n03445777", "n03888605",
)

# fast.ai's ImageWoof (10 dog breeds).
IMAGEWOOF = (
    "n02086240", "n02087394", "n02088364", "n02089973", "n02093754",
    "n02096294", "n02099601", "n02105641", "n02111889", "n02115641",
)

# ImageNet-100 as defined by CMC (Tian et al., imagenet100.txt), used by RDED / D4M / Minimax.
IMAGENET100 = (
    "n02869837", "n01749939", "n02488291", "n02107142", "n13037406", "n02091831", "n04517823", "n04589890",
    "n03062245", "n01773797", "n01735189", "n07831146", "n07753275", "n03085013", "n04485082", "n02105505",
    "n01983481", "n02788148", "n03530642", "n04435653", "n02086910", "n02859443", "n13040303", "n03594734",
    "n02085620", "n02099849", "n01558993", "n04493381", "n02109047", "n04111531", "n02877765", "n04429376",
    "n02009229", "n01978455", "n02106550", "n01820546", "n01692333", "n07714571", "n02974003", "n02114855",
    "n03785016", "n03764736", "n03775546", "n02087046", "n07836838", "n04099969", "n04592741", "n03891251",
    "n02701002", "n03379051", "n02259212", "n07715103", "n03947888", "n04026417", "n02326432", "n03637318",
    "n01980166", "n02113799", "n02086240", "n03903868", "n02483362", "n04127249", "n02089973", "n03017168",
    "n02093428", "n02804414", "n02396427", "n04418357", "n02172182", "n01729322", "n02113978", "n03787032",
    "n02089867", "n02119022", "n03777754", "n04238763", "n02231487", "n03032252", "n02138441", "n02104029",
    "n03837869", "n03494278", "n04136333", "n03794056", "n03492542", "n02018207", "n04067472", "n03930630",
    "n03584829", "n02123045", "n04229816", "n02100583", "n03642806", "n04336792", "n03259280", "n02116738",
    "n02108089", "n03424325", "n01855672", "n02090622",
)

PRESETS: dict[str, tuple[str, ...]] = {
    "imagenette": IMAGENETTE,
    "imagewoof": IMAGEWOOF,
    "imagenet100": IMAGENET100,
}


# D4M's label list (``distillation/label-prompt/imagenet_classes.txt``) is the standard synset lines except for the two
# cranes, whose lines it swaps: the bird (n02012849) reads "crane,machine" and the machine (n03126707) "crane, bird".
D4M_LABEL_LINES = {"n02012849": "crane,machine", "n03126707": "crane, bird"}


@lru_cache(maxsize=1)
def imagenet_synset_lines() -> dict[str, str]:
    """The 1000 ImageNet-1K wnids mapped to their synset line, all lemmas ("tench, Tinca tinca"), as in the
    ``LOC_synset_mapping.txt`` that ImageNet comes with.

    The synset list and lemmas ship with timm (``timm/data/_info``), a dependency of this package.
    """
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    return {wnid: info.label_name_to_description(wnid) for wnid in info.label_names()}


@lru_cache(maxsize=1)
def imagenet_wnid_to_name() -> dict[str, str]:
    """The 1000 ImageNet-1K wnids mapped to their first WordNet lemma ("golden retriever")."""
    return {wnid: line.split(",")[0].strip() for wnid, line in imagenet_synset_lines().items()}


def synset_line(folder: str) -> str:
    """A class's whole synset line for an ImageNet wnid, else its display name."""
    return imagenet_synset_lines().get(folder) or display_name(folder)


def d4m_label(folder: str) -> str:
    """A class's line of D4M's ImageNet label list (its prompt): the synset line, the two cranes swapped."""
    return D4M_LABEL_LINES.get(folder) or synset_line(folder)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1K wnids in the standard (sorted) label order."""
    return sorted(imagenet_wnid_to_name())


def display_name(folder: str) -> str:
    """Human-readable class name: the ImageNet lemma for a wnid, else the folder name with '_' as spaces."""
    name = imagenet_wnid_to_name().get(folder)
    return name if name is not None else folder.replace("_", " ")


def resolve_classes(spec: str | Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Resolve a class specification against the class folders present in a split.

    ``spec`` is ``None`` / ``"all"`` (every folder), a preset name (``imagenette``, ``imagewoof``,
    ``imagenet100``), a comma-separated string, or a list whose items are folder names / wnids or
    human-readable names. Returns folder names in sorted order. Raises ``ValueError`` naming every
    class that cannot be found.
    """
    available = sorted(available)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return available
    if isinstance(spec, str):
        key = spec.strip().lower()
        items = list(PRESETS[key]) if key in PRESETS else [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    if not items:
        raise ValueError(f"the class list {spec!r} names no class (give 'all', a preset or class names)")
    by_name = {_normalise(display_name(f)): f for f in available}
    resolved, unknown = [], []
    for item in items:
        if item in available:
            resolved.append(item)
        elif _normalise(item) in by_name:
            resolved.append(by_name[_normalise(item)])
        else:
            unknown.append(item)
    if unknown:
        hint = ", ".join(available[:8]) + (" ..." if len(available) > 8 else "")
        raise ValueError(
            f"unknown class(es) {unknown}: not a preset ({', '.join(PRESETS)}), nor a folder / wnid or class "
            f"name present in the data (available: {hint})"
        )
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"class list names a class twice: {items}")
    return sorted(resolved)


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", " ")
