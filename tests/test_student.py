"""FKD student: the KL loss, RDED's augmentation on both paths, the frozen teacher, learning, DDP validation."""

from __future__ import annotations

import json
import math
from itertools import permutations
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from patchdd.training.augment import (
    AugmentOptions,
    augment_batch,
    cutmix,
    mix_batch,
    mixed_cross_entropy,
    mixup,
    per_sample_transform,
    resized_crops,
    sample_crop_boxes,
    shuffle_patches,
)
from patchdd.data.sources import ClassMapping
from patchdd.errors import DataError
from patchdd.data.subsets import imagenet_wnids
from patchdd.training.zoo import build_model
from patchdd.datamodules.callbacks import RDEDValidationSchedule
from patchdd.lightning_modules.student import FKDStudent
from patchdd.training.kd import (idc_epochs, kd_kl_loss, learning_rate_for, lr_factor, rded_batch_size,
                                rded_validates)
from patchdd.training.optim import weight_decay_groups
from student_helpers import CLASSES, SIZE, SquaresData, make_student, train_teacher

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def test_kd_kl_loss_equals_hand_computation():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    t = 4.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p = np.exp(np.array(t_row) / t) / np.exp(np.array(t_row) / t).sum()
        q = np.exp(np.array(s_row) / t) / np.exp(np.array(s_row) / t).sum()
        expected += float((p * (np.log(p) - np.log(q))).sum())
    expected /= 2
    assert kd_kl_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-5)
    assert kd_kl_loss(student, teacher, t, scale_by_t2=True).item() == pytest.approx(expected * 16, rel=1e-5)
    assert kd_kl_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-7)


def test_protocol_functions():
    assert lr_factor(0, 300, "half_cosine") == 1.0
    assert lr_factor(299, 300, "half_cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 299 / 600)))
    assert lr_factor(150, 300, "cosine") == pytest.approx(0.5)
    # IDC's MultiStepLR(milestones=[2E // 3, 5E // 6], gamma=0.2), checked against torch's own scheduler
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[200, 250], gamma=0.2)
    for epoch in range(300):
        assert lr_factor(epoch, 300, "multistep") == pytest.approx(optimizer.param_groups[0]["lr"]), epoch
        optimizer.step()
        reference.step()
    assert [idc_epochs(ipc, 10) for ipc in (1, 2, 10, 11, 50, 100, 200, 500, 1000)] == \
        [3000, 2000, 2000, 1500, 1500, 1000, 1000, 500, 300]
    # two thirds, rounded down to hundreds, for exactly 100 classes (the code's ipc_epoch): 1333 -> 1300, 666 -> 600
    assert [idc_epochs(ipc, 100) for ipc in (1, 10, 50, 200, 500, 1000)] == [2000, 1300, 1000, 600, 300, 200]
    assert idc_epochs(10, 99) == idc_epochs(10, 1000) == 2000
    assert [rded_batch_size(ipc, 10) for ipc in (1, 10, 50, 100)] == [10, 50, 100, 100]
    assert [rded_batch_size(ipc, 1000) for ipc in (1, 10, 50)] == [20, 100, 200]
    assert rded_batch_size(10, 100) == 100 and rded_batch_size(1, 4) == 4  # never above IPC x classes
    assert [e for e in range(300) if rded_validates(e, 300)] == list(range(249, 300, 10))
    table = {"resnet": 1e-3, "efficientnet": 2e-3, "mobilenet": 2.5e-3, "vit": 1e-4, "swin": 1e-4}
    assert learning_rate_for("tv:mobilenet_v2", table) == 2.5e-3 and learning_rate_for("vit_base_patch16_224", table) == 1e-4
    with pytest.raises(ValueError, match="no learning rate"):
        learning_rate_for("convnet_d3", table)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    decay, no_decay = weight_decay_groups(net, 0.01)
    assert [p.shape for p in decay["params"]] == [(4, 3, 3, 3)] and len(no_decay["params"]) == 3


def tile_ids(images: torch.Tensor, grid: int) -> list[tuple[int, ...]]:
    """The tile value of each of the grid x grid tiles of every image (images hold one value per tile)."""
    b, _, h, w = images.shape
    th, tw = h // grid, w // grid
    return [tuple(int(img[0, r * th, c * tw]) for r in range(grid) for c in range(grid)) for img in images]


def tiled(batch: int, grid: int, side: int) -> torch.Tensor:
    values = torch.arange(grid * grid, dtype=torch.uint8).reshape(grid, grid)
    image = values.repeat_interleave(side, 0).repeat_interleave(side, 1)
    return image.expand(batch, 3, -1, -1).contiguous()


@pytest.mark.parametrize("mode", ["tiles", "strips"])
def test_shuffle_patches_permutes_whole_tiles(mode):
    grid, side = 2, 5
    images = tiled(400, grid, side)
    out = shuffle_patches(images, grid, mode, torch.Generator().manual_seed(0))
    th = side
    for img in out:  # every tile is one whole, uniform source tile
        for r in range(grid):
            for c in range(grid):
                block = img[:, r * th:(r + 1) * th, c * th:(c + 1) * th]
                assert (block == block[0, 0, 0]).all()
    orders = tile_ids(out, grid)
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    seen = set(orders)
    if mode == "tiles":
        assert seen == set(permutations(range(4)))
    else:  # RDED: a column order and a row order -> 4 arrangements of a 2x2 grid
        assert seen == {(0, 1, 2, 3), (1, 0, 3, 2), (2, 3, 0, 1), (3, 2, 1, 0)}
    assert torch.equal(shuffle_patches(images, 1), images)


def test_shuffle_patches_drops_remainder_like_rded():
    images = torch.zeros(2, 3, 11, 9, dtype=torch.uint8)
    assert shuffle_patches(images, 2, "tiles").shape == (2, 3, 10, 8)


@pytest.mark.parametrize("height,width", [(224, 224), (96, 200)])
def test_device_crop_boxes_have_torchvision_distribution(height, width):
    torch.manual_seed(0)
    n = 3000
    ours = sample_crop_boxes(n, height, width, (0.5, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1))
    assert (ours[:, :2] >= 0).all() and (ours[:, 2] <= width).all() and (ours[:, 3] <= height).all()
    reference = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, height, width), [0.5, 1.0], [3 / 4, 4 / 3])
                              for _ in range(n)], dtype=torch.float64)  # (top, left, h, w)
    ref_h, ref_w = reference[:, 2], reference[:, 3]
    our_w, our_h = (ours[:, 2] - ours[:, 0]).double(), (ours[:, 3] - ours[:, 1]).double()
    for a, b in ((our_w * our_h / (height * width), ref_w * ref_h / (height * width)),
                 (our_w / our_h, ref_w / ref_h),
                 (ours[:, 0] / (width - our_w + 1), reference[:, 1] / (width - ref_w + 1))):
        assert ks_2samp(a.numpy(), b.numpy()).pvalue > 1e-3


def test_cpu_and_device_paths_give_the_same_crop_sizes():
    """Both paths on an image whose pixels hold their column: the output's span of columns is the crop width."""
    torch.manual_seed(0)
    side, out = 200, 50
    columns = torch.arange(side, dtype=torch.float32).expand(3, side, side)
    image = (columns * 255 / (side - 1)).round().to(torch.uint8)
    options = AugmentOptions(image_size=out, scale=(0.3, 1.0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), flip=False)
    cpu = per_sample_transform(1, options)
    spans_cpu = [float(x[0, 0, -1] - x[0, 0, 0]) for x in (cpu(image) for _ in range(1500))]
    device = augment_batch(image.expand(1500, -1, -1, -1).contiguous(), 1, options)
    spans_device = (device[:, 0, 0, -1] - device[:, 0, 0, 0]).tolist()
    assert ks_2samp(spans_cpu, spans_device).pvalue > 1e-3


def test_crop_scale_follows_the_composition_factor_unless_given():
    from patchdd.training.augment import crop_scale

    assert crop_scale(AugmentOptions(), 2) == (0.5, 1.0)  # RDED: (1 / factor, 1) for 2x2 sets
    assert crop_scale(AugmentOptions(), 1) == (1.0, 1.0)  # one patch per image
    assert crop_scale(AugmentOptions(scale=(0.08, 1.0)), 2) == (0.08, 1.0)
    image = torch.arange(64 * 64, dtype=torch.float32).view(1, 1, 64, 64).expand(200, 3, 64, 64).contiguous()
    crops = augment_batch((image % 256).to(torch.uint8), 2, AugmentOptions(image_size=32, flip=False,
                                                                             shuffle="tiles"))
    assert crops.shape == (200, 3, 32, 32)


def test_resized_crops_interpolate_like_torch_inside_the_crop():
    image = torch.rand(1, 3, 40, 40) * 255
    crop = resized_crops(image, torch.tensor([[5, 3, 29, 35]]), 48)
    reference = torch.nn.functional.interpolate(image[:, :, 3:35, 5:29], size=(48, 48), mode="bilinear",
                                                align_corners=False)
    assert torch.allclose(crop[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1], atol=1e-3)


def test_cutmix_pastes_one_box_of_a_partner_and_mixup_blends():
    torch.manual_seed(3)
    images = torch.arange(8, dtype=torch.float32)[:, None, None, None].expand(8, 3, 16, 16).contiguous()
    result = cutmix(images, alpha=1.0)
    mixed = result.images
    changed = mixed[:, 0] != images[:, 0]
    assert changed.any()
    box = changed.any(0)  # one box for the whole batch
    rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
    assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    for i in range(8):
        values = mixed[i, 0][box].unique()
        assert len(values) == 1  # the pasted box comes from one partner image
        assert values.item() == result.partner[i]  # ... the partner it names
    assert result.own_fraction == pytest.approx(1 - box.float().mean().item())  # the area outside the box
    blended = mixup(images, alpha=0.8).images
    assert ((blended >= 0) & (blended <= 7)).all() and not torch.equal(blended, images)


def test_mixed_cross_entropy_weighs_both_labels_by_the_own_fraction():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    mixed = cutmix(torch.rand(6, 3, 16, 16))
    own = mixed.own_fraction
    expected = own * F.cross_entropy(logits, labels) + (1 - own) * F.cross_entropy(logits, labels[mixed.partner])
    assert mixed_cross_entropy(logits, labels, mixed).item() == pytest.approx(expected.item())
    assert 0.0 <= own <= 1.0
    plain = mix_batch(torch.rand(6, 3, 16, 16), "none")
    assert plain.partner is None
    assert mixed_cross_entropy(logits, labels, plain).item() == pytest.approx(F.cross_entropy(logits, labels).item())


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_student_learns_from_frozen_teacher(tmp_path):
    teacher_path = train_teacher(tmp_path / "teacher.pt")
    L.seed_everything(0)
    model = make_student(teacher_path)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    recorder = LossRecorder()
    trainer = L.Trainer(max_epochs=12, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                        callbacks=[recorder, RDEDValidationSchedule(every=4, last_fraction=0.5)])
    data = SquaresData(ipc=8, val_per_class=8, batch_size=8)
    trainer.fit(model, data)
    assert all(torch.equal(teacher_before[k], v) for k, v in model.teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert not model.teacher.training and model.student.training
    losses = recorder.losses
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])
    summary = model.summary()
    assert summary["final_top1"] > 0.5  # chance is 0.25
    assert summary["validations"] == 2 and summary["best_epoch"] in (7, 11)  # epochs 8 and 12 of 12
    assert summary["best_top1"] >= summary["final_top1"]

    trainer.save_checkpoint(tmp_path / "student.ckpt")
    saved = torch.load(tmp_path / "student.ckpt", weights_only=False)
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])
    restored = FKDStudent.load_from_checkpoint(tmp_path / "student.ckpt")
    assert restored.best_top1 == model.best_top1
    assert all(torch.equal(v, model.student.state_dict()[k]) for k, v in restored.student.state_dict().items())
    assert all(torch.equal(v, teacher_before[k]) for k, v in restored.teacher.state_dict().items())


def test_summary_file_and_unmixed_accuracy(tmp_path):
    teacher_path = train_teacher(tmp_path / "teacher.pt", steps=1)
    model = make_student(teacher_path, track_unmixed_accuracy=True, mixing="mixup")
    assert model.temperature == 4.0
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0, enable_checkpointing=False,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""))
    trainer.fit(model, SquaresData(ipc=2, val_per_class=2, batch_size=8))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_top1"] == summary["best_top1"] and summary["epochs"] == 1
    assert "train/top1_unmixed" in trainer.logged_metrics


def validation_metrics(model: FKDStudent, devices: int, root) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    (result,) = trainer.validate(model, SquaresData(ipc=1, val_per_class=10, batch_size=4))
    return result


def test_validation_under_ddp_equals_single_process(tmp_path):
    teacher_path = train_teacher(tmp_path / "teacher.pt", steps=1)
    torch.manual_seed(0)
    model = make_student(teacher_path)
    single = validation_metrics(model, 1, tmp_path)
    ddp = validation_metrics(model, 2, tmp_path)
    assert 0 < single["val/top1"] < 1  # a random student: some but not all right
    for key in ("val/top1", "val/top5"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6)


def test_a_1000_class_teacher_is_cut_to_the_data_classes(tmp_path):
    teacher = build_model("convnet_d3", 1000, image_size=SIZE, width=8)
    torch.save(teacher.state_dict(), tmp_path / "imagenet_teacher.pt")
    folders = ["n01440764", "n03000684"]  # tench (ImageNet output 0) and chain saw, two ImageNette classes
    options = dict(teacher="convnet_d3", student="convnet_d3",
                   teacher_checkpoint=str(tmp_path / "imagenet_teacher.pt"), teacher_classes="imagenet1k",
                   teacher_kwargs={"width": 8}, student_kwargs={"width": 8}, model_image_size=SIZE, lr=1e-3)
    module = FKDStudent(**options)
    data = SimpleNamespace(class_mapping=ClassMapping.for_folders(folders))
    module.hparams.teacher_outputs = module._teacher_outputs(data)
    module._build(len(folders))
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = teacher(images)[:, [0, imagenet_wnids().index("n03000684")]]
        assert torch.allclose(module.teacher(images), expected)
        reloaded = FKDStudent(**module.hparams)  # what load_from_checkpoint does: the cut is in the hyper-parameters
        assert torch.allclose(reloaded.teacher(images), expected)
    assert module.student(images).shape == (3, 2)
    with pytest.raises(DataError, match="not among the teacher's 1000"):
        module._teacher_outputs(SimpleNamespace(class_mapping=ClassMapping.for_folders(["cat", "dog"])))
    assert FKDStudent(**{**options, "teacher_classes": None})._teacher_outputs(data) is None  # the data's own classes
    with pytest.raises(ValueError, match="1000 ImageNet outputs, not 2"):  # never a silent new head on hub weights
        FKDStudent(**{**options, "teacher_checkpoint": None, "teacher_pretrained": True, "num_classes": 2})


def test_one_batch_size_rule_for_fit_and_matrix(tmp_path):
    """``batch_size: rded`` is applied by the data module from the IPC and the class count (RDED's rule)."""
    from patchdd.datamodules.distilled import DistilledDataModule
    from student_helpers import write_synthetic_export

    write_synthetic_export(tmp_path / "ipc2", ipc=2)
    module = DistilledDataModule(synthetic_dir=str(tmp_path / "ipc2"), ipc=2)
    assert module.batch_size == rded_batch_size(2, len(CLASSES)) == min(10, 2 * len(CLASSES))
    assert DistilledDataModule(synthetic_dir=str(tmp_path / "ipc2"), batch_size=7).batch_size == 7
    assert rded_batch_size(10, 1000) == 100 and rded_batch_size(50, 1000) == 200  # ImageNet-1K: not 200 at IPC 10


def test_convnet_norm_option():
    from patchdd.training.zoo import build_model

    norms = {norm: {type(m).__name__ for m in build_model("convnet_d3", 10, image_size=32, width=8, norm=norm)
                    .modules()} for norm in ("instance", "batch", "none")}
    assert "GroupNorm" in norms["instance"] and "BatchNorm2d" not in norms["instance"]
    assert "BatchNorm2d" in norms["batch"] and "GroupNorm" not in norms["batch"]
    assert not {"GroupNorm", "BatchNorm2d"} & norms["none"]
    with pytest.raises(ValueError, match="unknown ConvNet norm"):
        build_model("convnet_d3", 10, image_size=32, norm="layer")


def test_rded_validation_resize_rule(imagefolder_root):
    from patchdd.datamodules.real import ImageFolderDataModule

    sizes = {s: ImageFolderDataModule(str(imagefolder_root), image_size=s).eval_resize for s in (224, 128, 64)}
    assert sizes == {224: 256, 128: 144, 64: 72}


def test_cifar_presets_stack_into_rdeds_cifar100_special_case():
    import subprocess
    import sys

    import yaml

    configs = [REPO / "configs/student" / name for name in
               ("rded_defaults.yaml", "cifar10_convnet.yaml", "cifar100_convnet.yaml")]
    result = subprocess.run([sys.executable, "-m", "patchdd", "fit", *[a for p in configs for a in ("-c", str(p))],
                             "--print_config"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["lr"] == 0.002 and data["batch_size"] == 25  # RDED's CIFAR-100 ConvNet-D3 case
    assert model["student_kwargs"] == {"norm": "batch"} == model["teacher_kwargs"]
    assert data["real"]["class_path"].endswith("CIFARDataModule") and data["real"]["init_args"]["variant"] == "cifar100"


def fit_summary(tmp_path: Path, teacher: Path, devices: int) -> tuple[dict, dict]:
    """(summary.json, protocol.json) of a one-epoch student fit on a 16-image set, global batch 8."""
    from lightning.pytorch.loggers import CSVLogger

    from patchdd.datamodules.distilled import DistilledDataModule
    from patchdd.datamodules.real import ImageFolderDataModule
    from patchdd.lightning_modules.student import PROTOCOL_FILE, SUMMARY_FILE

    real = ImageFolderDataModule(str(tmp_path / "real"), image_size=SIZE, eval_resize=SIZE, num_workers=0)
    data = DistilledDataModule(synthetic_dir=str(tmp_path / "syn" / "ipc4"), real=real, batch_size=8)
    run = tmp_path / f"devices{devices}"
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=devices,
                        strategy="ddp_spawn" if devices > 1 else "auto", logger=CSVLogger(run, name="", version=""),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(make_student(teacher, min_teacher_top1=0), data)
    return json.loads((run / SUMMARY_FILE).read_text()), json.loads((run / PROTOCOL_FILE).read_text())


def test_the_batch_size_is_global_under_ddp(tmp_path):
    """Two CPU ranks take half the batch each: the same optimizer steps per epoch as one rank, the protocol card
    records the world size and the batch per device; a batch the devices do not divide is a clear error."""
    from student_helpers import write_real_folder, write_synthetic_export

    write_real_folder(tmp_path / "real", per_class=2, seed=0)
    write_synthetic_export(tmp_path / "syn" / "ipc4", ipc=4)
    teacher = train_teacher(tmp_path / "teacher.pt", steps=1)
    one, one_card = fit_summary(tmp_path, teacher, devices=1)
    two, two_card = fit_summary(tmp_path, teacher, devices=2)
    assert one["optimizer_steps"] == two["optimizer_steps"] == 2  # 16 images / global batch 8
    assert (one_card["batch_size"], one_card["world_size"], one_card["device_batch_size"]) == (8, 1, 8)
    assert (two_card["batch_size"], two_card["world_size"], two_card["device_batch_size"]) == (8, 2, 4)

    from patchdd.datamodules.distilled import DistilledDataModule

    data = DistilledDataModule(synthetic_dir=str(tmp_path / "syn" / "ipc4"), batch_size=6)
    data.trainer = SimpleNamespace(world_size=4)
    with pytest.raises(ValueError, match="global batch size 6 does not divide over 4 devices"):
        data.device_batch_size


def test_a_cpu_process_group_is_destroyed_before_the_interpreter_exits(tmp_path):
    """Lightning leaves a gloo group (CPU ranks) to the interpreter's shutdown, which aborts a finished rank in about
    one exit in six (the DDP test above failed so once in CI); importing the Lightning modules registers its
    destruction."""
    import subprocess
    import sys

    script = ("import atexit, torch.distributed as dist, patchdd.lightning_modules\n"
              f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
              "atexit._run_exitfuncs()\n"
              "print(dist.is_initialized())")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_the_idc_protocol_validates_fp32_every_hundredth_of_its_epochs_with_its_own_resize(capsys):
    """Minimax's train.py: validate when the 1-based epoch is a multiple of epochs // 100; fp32; Resize(224) ->
    CenterCrop(224). The idc config replaces RDED's cadence, bf16 and Resize(256)."""
    import yaml

    from patchdd import cli
    from patchdd.training.kd import idc_validates

    assert [e + 1 for e in range(2000) if idc_validates(e, 2000)][:3] == [20, 40, 60]
    assert sum(idc_validates(e, 2000) for e in range(2000)) == 100 and idc_validates(1999, 2000)
    assert all(idc_validates(e, 7) for e in range(7))  # fewer epochs than validations: every epoch
    with pytest.raises(SystemExit):
        cli.main(["fit", "-c", "configs/student/rded_defaults.yaml", "-c", "configs/student/imagewoof.yaml", "-c",
                  "configs/student/idc.yaml", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["precision"] == "32-true"
    assert [c["class_path"].split(".")[-1] for c in config["trainer"]["callbacks"]] == ["IDCValidationSchedule",
                                                                                      "ModelCheckpoint"]
    assert config["data"]["init_args"]["real"]["init_args"]["eval_resize"] == 224
