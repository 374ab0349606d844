"""The model zoo: one function builds any network by name, with pretrained or local-checkpoint weights.

Names:

* any timm name (``resnet18``, ``resnet50``, ``resnet101``, ``mobilenetv2_100``, ``efficientnet_b0``,
  ``swin_tiny_patch4_window7_224``, ``vit_base_patch16_224``, ...);
* torchvision names with the ``tv:`` prefix (``tv:resnet18``, ``tv:mobilenet_v2``, ...);
* the dataset-distillation ConvNets ``convnet_d3`` / ``convnet_d4`` (``convnet_d{N}`` for any depth N; IDC's
  ConvNet-6 is ``convnet_d6``): width 128, instance norm, ReLU, 2x2 average pooling after every block, one linear
  classifier;
* IDC's ResNetAP (``resnet_ap10``, ``resnet_ap18``, ``resnet_ap34``): a ResNet with basic blocks whose
  downsampling is 2x2 average pooling instead of strided convolutions, instance norm by default (the hard-label
  students of Minimax and Li et al.).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from patchdd.data.sources import CLASS_MAPPING_FILE
from patchdd.errors import CheckpointMismatchError, WeightsUnavailableError

TORCHVISION_PREFIX = "tv:"
CONVNET_PREFIX = "convnet_d"
RESNET_AP_PREFIX = "resnet_ap"
RESNET_AP_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}  # basic blocks per stage
ConvNetNorm = Literal["instance", "batch", "none"]
STATE_DICT_PREFIXES = ("model.", "module.", "_orig_mod.", "student.", "teacher.", "net.")




class ConvNet(nn.Module):
    """The ConvNet of the dataset-distillation literature (DC / DSA / DM / MTT): depth x [conv-norm-relu-pool].

    ``norm``: ``instance`` (the literature's default: GroupNorm with one group per channel, affine), ``batch``
    (RDED's ConvNet students and teachers) or ``none``.
    """

    def __init__(self, num_classes: int, depth: int = 3, width: int = 128, image_size: int = 32,
                 in_chans: int = 3, norm: ConvNetNorm = "instance") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), norm_layer(norm, width), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2, 2)]
            channels = width
        self.features = nn.Sequential(*layers)
        side = image_size // (2 ** depth)
        if side < 1:
            raise ValueError(f"ConvNet of depth {depth} needs images of at least {2 ** depth} px, got {image_size}")
        self.num_features = width * side * side
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def norm_layer(norm: ConvNetNorm, channels: int) -> nn.Module:
    """The ConvNet's normalisation: instance norm (affine GroupNorm, one group per channel), BatchNorm, or none."""
    if norm == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown ConvNet norm {norm!r}; choose 'instance', 'batch' or 'none'")


def average_pooling(factor: int) -> nn.Module:
    """``factor`` x ``factor`` average pooling (nothing for a factor of 1)."""
    return nn.AvgPool2d(factor) if factor > 1 else nn.Identity()


class ResidualBlockAP(nn.Module):
    """A basic residual block that downsamples by 2x2 average pooling after its first convolution; the shortcut
    is a 1x1 convolution, the same pooling and a norm whenever the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int, norm: ConvNetNorm) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=bias)
        self.norm1 = norm_layer(norm, channels)
        self.pool = average_pooling(stride)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.norm2 = norm_layer(norm, channels)
        self.shortcut = nn.Identity() if stride == 1 and in_channels == channels else nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, bias=bias), average_pooling(stride), norm_layer(norm, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(torch.relu(self.norm1(self.conv1(x))))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNetAP(nn.Module):
    """IDC's ResNetAP: a stem sized for the input (above 128 px a 7x7 convolution then 4x4 average pooling, above
    64 px a 3x3 convolution then 2x2 pooling, else a 3x3 convolution alone), four stages of
    :class:`ResidualBlockAP` of width ``width`` x (1, 2, 4, 8), global average pooling, one linear classifier."""

    def __init__(self, num_classes: int, depth: int = 10, width: int = 64, image_size: int = 224,
                 norm: ConvNetNorm = "instance") -> None:
        super().__init__()
        if depth not in RESNET_AP_BLOCKS:
            raise ValueError(f"ResNetAP depth must be one of {sorted(RESNET_AP_BLOCKS)}, got {depth}")
        kernel, pool = (7, 4) if image_size > 128 else (3, 2) if image_size > 64 else (3, 1)
        self.stem = nn.Sequential(nn.Conv2d(3, width, kernel, padding=kernel // 2, bias=norm == "none"),
                                  norm_layer(norm, width), nn.ReLU(inplace=True), average_pooling(pool))
        stages, channels = [], width
        for stage, blocks in enumerate(RESNET_AP_BLOCKS[depth]):
            out_channels = width * 2 ** stage
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(ResidualBlockAP(channels, out_channels, stride, norm))
                channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.num_features = channels
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))
        return self.classifier(features.mean(dim=(2, 3)))


class OutputSubset(nn.Module):
    """A classifier whose logits are cut to some of its classes (a 1000-class teacher on an ImageNet subset)."""

    def __init__(self, model: nn.Module, positions: list[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("positions", torch.tensor(positions, dtype=torch.long), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).index_select(1, self.positions)


def build_model(
    name: str,
    num_classes: int = 1000,
    pretrained: bool = False,
    checkpoint: str | None = None,
    image_size: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build the network ``name`` with ``num_classes`` outputs.

    ``pretrained`` loads the hub weights of timm / torchvision (fails with :class:`WeightsUnavailableError`
    offline); ``checkpoint`` loads a local ``.pt`` / ``.pth`` / ``.safetensors`` state dict or a Lightning
    ``.ckpt`` of this project, strictly (:class:`CheckpointMismatchError` names the mismatching keys).
    ``image_size`` matters only to the ConvNets (their classifier size) and to ViT / Swin (position grid).
    Extra keyword arguments go to the constructor (e.g. ``width`` for the ConvNets, ``drop_rate`` for timm).
    """
    if pretrained and checkpoint:
        raise ValueError("pass either pretrained=True or a checkpoint, not both")
    if pretrained and name.startswith((CONVNET_PREFIX, RESNET_AP_PREFIX)):
        raise WeightsUnavailableError(f"{name} has no hub weights; train one and pass checkpoint=PATH")
    if name.startswith(CONVNET_PREFIX):
        model = ConvNet(num_classes, depth=int(name[len(CONVNET_PREFIX):]), image_size=image_size or 32, **kwargs)
    elif name.startswith(RESNET_AP_PREFIX):
        model = ResNetAP(num_classes, depth=int(name[len(RESNET_AP_PREFIX):]), image_size=image_size or 224,
                         **kwargs)
    elif name.startswith(TORCHVISION_PREFIX):
        model = _build_torchvision(name[len(TORCHVISION_PREFIX):], num_classes, pretrained, **kwargs)
    else:
        model = _build_timm(name, num_classes, pretrained, image_size, **kwargs)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


def _build_timm(name: str, num_classes: int, pretrained: bool, image_size: int | None, **kwargs) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}: not a timm name, nor 'tv:<torchvision name>', nor 'convnet_dN', "
                         "nor 'resnet_apN'")
    if image_size is not None and _takes_img_size(name):
        kwargs.setdefault("img_size", image_size)
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except Exception as err:  # hub errors come in many types (OSError, HTTPError, LocalEntryNotFoundError)
        if not pretrained:
            raise
        raise WeightsUnavailableError(_offline_message(name, "timm", err)) from err


def _takes_img_size(name: str) -> bool:
    return any(key in name for key in ("vit_", "swin", "deit", "eva", "beit"))


def _build_torchvision(name: str, num_classes: int, pretrained: bool, **kwargs) -> nn.Module:
    from torchvision import models

    if name not in models.list_models():
        raise ValueError(f"unknown torchvision model {name!r}")
    if not pretrained:
        return models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    try:
        model = models.get_model(name, weights="DEFAULT", **kwargs)
    except Exception as err:
        raise WeightsUnavailableError(_offline_message(TORCHVISION_PREFIX + name, "torchvision", err)) from err
    if num_classes != 1000:
        _replace_head(model, num_classes)
    return model


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer of a torchvision classifier for one with ``num_classes`` outputs."""
    for parent in model.modules():
        for child_name, child in reversed(list(parent.named_children())):
            if isinstance(child, nn.Linear):
                setattr(parent, child_name, nn.Linear(child.in_features, num_classes))
                return
    raise ValueError("no Linear head found to replace")


def _offline_message(name: str, hub: str, err: Exception) -> str:
    return (f"could not obtain the pretrained {hub} weights for {name!r} ({type(err).__name__}: {err}). "
            f"This machine may be offline: download the weights elsewhere and pass them as a local file, "
            f"e.g. checkpoint=/path/to/{name.replace(':', '_')}.pth (a state dict, .safetensors or .ckpt), "
            f"with pretrained=False")


def find_run_checkpoint(root: str | Path, name: str = "best.ckpt") -> Path | None:
    """``root/lightning_logs/version_N/checkpoints/<name>`` of the highest N that has one (None: no such run)."""
    found = [(int(p.parents[1].name.removeprefix("version_")), p)
             for p in Path(root).glob(f"lightning_logs/version_*/checkpoints/{name}")
             if p.parents[1].name.removeprefix("version_").isdigit()]
    return max(found)[1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or for a fit's run folder (``trainer.default_root_dir``) the ``best.ckpt`` of
    its newest run, so that configs never name a ``version_N``."""
    path = Path(path)
    if path.is_dir():
        found = find_run_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint under {path}: expected lightning_logs/version_N/checkpoints/"
                                    "best.ckpt of a teacher fit (train one there first, e.g. `patchdd fit -c "
                                    "configs/teacher/toy_convnet.yaml`)")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def recorded_class_mapping(checkpoint: str | Path | None) -> str | None:
    """The ``class_mapping.json`` a teacher run wrote beside its checkpoint (``RUN/checkpoints/x.ckpt`` ->
    ``RUN/class_mapping.json``, or the checkpoint's own folder), so that a teacher trained on other classes is
    caught; None when there is none (a hub model, a bare state dict)."""
    if checkpoint is None:
        return None
    path = resolve_checkpoint(checkpoint)
    found = [folder / CLASS_MAPPING_FILE for folder in (path.parent, path.parent.parent)
             if (folder / CLASS_MAPPING_FILE).is_file()]
    return str(found[0]) if found else None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` state dict or a Lightning ``.ckpt`` (or of
    the newest ``best.ckpt`` of a run folder)."""
    path = resolve_checkpoint(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    data = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointMismatchError(f"{path} holds no state dict of tensors")
    return data


def strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``model.``, ``module.``, ``_orig_mod.``, ...) where that makes keys match."""
    state = dict(state)
    while True:
        matching = sum(k in expected for k in state)
        best = None
        for prefix in STATE_DICT_PREFIXES:
            kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if kept and sum(k in expected for k in kept) > matching:
                best, matching = kept, sum(k in expected for k in kept)
        if best is None:
            return state
        state = best


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local checkpoint into ``model`` strictly; mismatching keys or shapes raise an error naming them."""
    expected = model.state_dict()
    state = strip_prefixes(read_state_dict(path), set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                   for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        parts = [f"{label} ({len(items)}): {items[:5]}" for label, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape))
                 if items]
        raise CheckpointMismatchError(f"checkpoint {path} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model
