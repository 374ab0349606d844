import pytest
import torch

from patchdd.errors import CheckpointMismatchError, WeightsUnavailableError
from patchdd.training.zoo import build_model, load_checkpoint

ZOO = [
    ("resnet18", 64), ("resnet50", 64), ("resnet101", 64), ("mobilenetv2_100", 64), ("efficientnet_b0", 64),
    ("swin_tiny_patch4_window7_224", 224), ("vit_base_patch16_224", 224), ("tv:resnet18", 64),
    ("tv:mobilenet_v2", 64), ("convnet_d3", 32), ("convnet_d4", 64), ("convnet_d6", 224), ("resnet_ap10", 224),
    ("resnet_ap10", 128), ("resnet_ap18", 64),
]


@pytest.mark.parametrize("name,size", ZOO)
def test_every_listed_name_builds_with_the_right_output(name: str, size: int) -> None:
    model = build_model(name, num_classes=7, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, 7)


def test_vit_takes_a_smaller_image_size() -> None:
    model = build_model("vit_base_patch16_224", num_classes=3, image_size=32, depth=1).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_convnet_architecture_matches_the_literature() -> None:
    model = build_model("convnet_d3", num_classes=10, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert [c.out_channels for c in convs] == [128, 128, 128]
    assert all(n.num_groups == n.num_channels for n in norms)  # instance norm
    assert model.classifier.in_features == 128 * 4 * 4


@pytest.mark.parametrize("size,stem_kernel,stem_pool", [(224, 7, 4), (128, 3, 2), (64, 3, 1)])
def test_resnet_ap10_is_idcs_network(size: int, stem_kernel: int, stem_pool: int) -> None:
    """IDC's ResNetAP-10: a stem sized by the input, one basic block per stage of width 64 / 128 / 256 / 512,
    downsampling by average pooling (every convolution has stride 1), instance norm, 4.9 M parameters."""
    model = build_model("resnet_ap10", num_classes=10, image_size=size)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.stride == (1, 1) for c in convs)
    assert convs[0].kernel_size == (stem_kernel, stem_kernel)
    pools = [m for m in model.stem.modules() if isinstance(m, torch.nn.AvgPool2d)]
    assert [p.kernel_size for p in pools] == ([stem_pool] if stem_pool > 1 else [])
    assert [b.conv2.out_channels for b in model.stages] == [64, 128, 256, 512]
    assert all(n.num_groups == n.num_channels for n in model.modules() if isinstance(n, torch.nn.GroupNorm))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(4.9e6, rel=0.01)
    features = model.stages(model.stem(torch.randn(1, 3, size, size)))
    assert features.shape[-1] == size // max(stem_pool, 1) // 8  # three 2x2 poolings after the stem


def test_resnet_ap_has_no_hub_weights_and_known_depths_only() -> None:
    with pytest.raises(WeightsUnavailableError, match="no hub weights"):
        build_model("resnet_ap10", num_classes=10, pretrained=True)
    with pytest.raises(ValueError, match="depth must be one of"):
        build_model("resnet_ap12", num_classes=10)


def test_unknown_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet_does_not_exist", num_classes=2)


@pytest.mark.parametrize("name", ["resnet18", "tv:resnet18"])
def test_pretrained_offline_fails_with_one_clear_message(name: str) -> None:
    with pytest.raises(WeightsUnavailableError, match="checkpoint=") as info:
        build_model(name, num_classes=10, pretrained=True)
    assert name in str(info.value)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_checkpoint_round_trip(tmp_path, suffix: str) -> None:
    source = build_model("resnet18", num_classes=5)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)  # DDP-style prefix
    loaded = build_model("resnet18", num_classes=5, checkpoint=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_lightning_checkpoint_with_model_prefix_loads(tmp_path) -> None:
    source = build_model("convnet_d3", num_classes=4, image_size=32, width=16)
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    loaded = build_model("convnet_d3", num_classes=4, image_size=32, width=16, checkpoint=str(path))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(x), source(x))


def test_checkpoint_for_other_class_count_names_the_mismatch(tmp_path) -> None:
    path = tmp_path / "w.pth"
    torch.save(build_model("resnet18", num_classes=5).state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"fc\.weight"):
        build_model("resnet18", num_classes=10, checkpoint=str(path))


def test_checkpoint_of_other_architecture_is_refused(tmp_path) -> None:
    path = tmp_path / "w.pth"
    torch.save(build_model("resnet18", num_classes=5).state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        load_checkpoint(build_model("resnet50", num_classes=5), path)


def test_missing_checkpoint_file_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("resnet18", num_classes=5, checkpoint=str(tmp_path / "nope.pth"))
