"""The ``reference`` profile: each generative method, by default, as its public code runs it.

Each test pins one behaviour against a transcription of the reference's few lines of math (D3HR's
``group_sampling.py`` / ``dit_inversion_save_statistic.py``, Minimax's ``train_dit.py``, Li et al.'s ``train_dit.py``,
D4M's ``gen_prototype.py``) on an analytic case or a tiny model; the paper readings stay one option away.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from patchdd.generation.group_sampling import group_sample, group_scores
from patchdd.generation.memory import MemoryBank, memory_losses
from patchdd.generation.plan import D3HROptions, D4MOptions
from patchdd.generation.profiles import apply_profile, profile_label
from patchdd.generation.sampling import ddim_sample, ddim_schedulers
from tiny_dit import ARCHITECTURES, save_tiny_dit


def gradient_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 // width, ys * 255 // height, rng.integers(0, 255, (height, width))], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


# --- D3HR ---------------------------------------------------------------------------------------------------------


def d3hr_code_group_sampling(mean, std, ipc: int, blocks: int, block: int):
    """D3HR's ``main`` loop over ``select_algorithm_batch`` (seed i * 12345, blocks of ``block`` groups)."""
    best, best_score = None, float("inf")
    for i in range(blocks):
        torch.manual_seed(i * 12345)
        samples = torch.normal(mean.expand(block, ipc, -1), std.expand(block, ipc, -1))
        mean_diff = torch.norm(torch.mean(samples, dim=1) - mean, dim=1)
        std_diff = torch.norm(torch.std(samples, dim=1) - std, dim=1)
        centred = (samples - samples.mean(dim=1, keepdim=True)) / samples.std(dim=1, keepdim=True)
        n = samples.size(2)
        skew = torch.sum(centred ** 3, dim=2) * (n / ((n - 1) * (n - 2)))
        scores = mean_diff + std_diff + 0.1 * torch.norm(skew, dim=1)
        score, index = torch.min(scores, dim=0)
        if score < best_score:
            best, best_score = samples[index], score
    return best, float(best_score)


def test_group_sampling_draws_and_chooses_d3hr_codes_groups():
    generator = torch.Generator().manual_seed(0)
    mean, std = torch.randn(48, generator=generator), torch.rand(48, generator=generator) + 0.5
    options = D3HROptions()
    assert (options.seeding, options.score_variant, options.restart_offset, options.final_steps) == \
        ("d3hr_code", "d3hr_code", 1, "d3hr_code")
    expected, expected_score = d3hr_code_group_sampling(mean, std, ipc=4, blocks=3, block=50)
    for per_batch in (1, 2):  # the winner does not depend on how many blocks are scored at once
        chosen = group_sample(mean, std, 4, 150, 0, "n01440764", block_size=50, blocks_per_batch=per_batch,
                              variant="d3hr_code", seeding="d3hr_code")
        assert torch.equal(chosen.latents, expected)
        assert chosen.score == pytest.approx(expected_score, rel=1e-6)
    other_class = group_sample(mean, std, 4, 150, 0, "n01443537", 50, variant="d3hr_code", seeding="d3hr_code")
    assert torch.equal(other_class.latents, expected)  # the code draws the same groups for every class
    hashed = group_sample(mean, std, 4, 150, 0, "n01443537", 50, variant="d3hr_code", seeding="hashed")
    assert not torch.equal(hashed.latents, expected)
    assert float(group_scores(expected[None], mean, std, variant="d3hr_code")) == pytest.approx(expected_score, 1e-6)


def test_ddim_sampling_takes_d3hr_codes_final_steps():
    scheduler = ddim_schedulers({"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
                                 "beta_end": 0.02}, 50)[0]
    abar = scheduler.alphas_cumprod

    def model_fn(z, t):  # an analytic noise prediction
        return 0.3 * z + 0.001 * t.view(-1, 1, 1, 1).float()

    start = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    reference = start.clone()  # D3HR's ``sample`` loop from start_step 18 (t = 620)
    for t in scheduler.timesteps[18:]:
        t = int(t)
        eps = model_fn(reference, torch.full((2,), t))
        prev = max(1, t - 1000 // 50)
        x0 = (reference - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        reference = abar[prev].sqrt() * x0 + (1 - abar[prev]).sqrt() * eps
    ours = ddim_sample(model_fn, start, scheduler, 18, final_steps="d3hr_code")
    assert torch.allclose(ours, reference, atol=1e-6)
    plain = ddim_sample(model_fn, start, scheduler, 18)
    assert (plain - reference).abs().max() > 1e-3  # DDIM's own last steps end elsewhere
    with pytest.raises(ValueError, match="final_steps"):
        ddim_sample(model_fn, start, scheduler, 18, final_steps="paper")


def test_d3hr_inversion_preprocesses_with_torchvision_itself():
    from torchvision import transforms

    from patchdd.data.scoring_images import torchvision_geometry, torchvision_pixels

    image = gradient_image(640, 427)
    geometry = torchvision_geometry(640, 427, 256)
    assert (geometry.resized_width, geometry.resized_height) == (383, 256)  # truncated, not rounded (384)
    expected = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(256), transforms.PILToTensor()])
    assert torch.equal(torchvision_pixels(image, geometry), expected(image))
    assert geometry.left == round((383 - 256) / 2)


def test_d3hr_inverter_defaults_to_the_codes_skipped_first_step():
    import inspect

    from patchdd.lightning_modules.inversion import LatentInverter

    assert inspect.signature(LatentInverter).parameters["skip_first"].default is True


# --- profiles -----------------------------------------------------------------------------------------------------


def test_a_profile_sets_only_the_options_left_at_their_reference_default():
    paper = apply_profile("d3hr", "paper", D3HROptions())
    assert (paper.restart_offset, paper.score_variant, paper.seeding, paper.final_steps) == (0, "paper", "hashed",
                                                                                          "scheduler")
    assert profile_label("d3hr", paper) == "paper" and profile_label("d3hr", D3HROptions()) == "reference"
    kept = apply_profile("d3hr", "paper", D3HROptions(candidates=5000, restart_offset=2))
    assert (kept.candidates, kept.restart_offset, kept.seeding) == (5000, 2, "hashed")
    assert profile_label("d3hr", kept) == "custom"
    toy = D3HROptions(candidates=4096, block_size=1024)  # fewer candidates: still the reference's procedure
    assert profile_label("d3hr", toy) == "reference"
    suite = apply_profile("d4m", "suite", D4MOptions())
    assert (suite.leftover, suite.order, suite.resize_filter) == ("all", "files", "bicubic")
    with pytest.raises(ValueError, match="not one of d4m's: reference, suite"):
        apply_profile("d4m", "paper", D4MOptions())


# --- Minimax / Li et al. ------------------------------------------------------------------------------------------


def adm_center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's ``center_crop_arr`` as Minimax's ``train_dit.py`` carries it."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y, crop_x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.mark.parametrize("size", [(500, 375), (1200, 900), (375, 500)])
def test_minimax_training_crop_is_adms_center_crop(size):
    from patchdd.data.sources import adm_center_crop, train_transform

    image = gradient_image(*size, seed=2)
    assert np.array_equal(np.asarray(adm_center_crop(image, 256)), adm_center_crop_arr(image, 256))
    torch.manual_seed(0)
    tensor = train_transform(256, (1.0, 1.0), (0.5,) * 3, (0.5,) * 3, crop="center_crop_arr")(image)
    crop = torch.from_numpy(adm_center_crop_arr(image, 256)).permute(2, 0, 1).float() / 127.5 - 1
    assert tensor.shape == (3, 256, 256)
    assert torch.allclose(tensor, crop, atol=1e-5) or torch.allclose(tensor, crop.flip(-1), atol=1e-5)


def li_code_loss(output: torch.Tensor, labels: np.ndarray, real: dict, gen: dict, lambda_real: float,
                 lambda_gen: float) -> torch.Tensor:
    """Li et al.'s ``train_dit.py`` inner loop (loss terms only; its bank updates do not touch the loss)."""
    def cosine(a, b):
        return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T

    loss, real_loss, gen_loss = torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0)
    label_set = set(labels)
    for c in label_set:
        if len(gen[c]):
            real_loss = real_loss + (1 - cosine(output[labels == c], real[c]).min()) * lambda_real / len(label_set)
            gen_loss = gen_loss + cosine(output[labels == c], gen[c]).max() * lambda_gen / len(label_set)
        loss = loss + real_loss + gen_loss
    return loss


def test_legacy_accumulation_is_li_et_als_loss_exactly():
    generator = torch.Generator().manual_seed(4)
    labels = np.array([100, 9, 36, 9, 68, 3, 100, 36])  # a set of them iterates 3, 100, 68, 36, 9: not sorted
    assert list(set(labels.tolist())) != sorted(set(labels.tolist()))
    x0 = torch.randn(len(labels), 4, 2, 2, generator=generator)
    real, gen = MemoryBank(8), MemoryBank(8)
    real_dict, gen_dict = {}, {}
    for c in set(labels.tolist()):
        gen_dict[c] = torch.randn(3, 16, generator=generator) if c != 68 else torch.empty(0, 16)  # 68: empty
        real_dict[c] = torch.randn(3, 16, generator=generator)
        real.add(c, real_dict[c])
        if len(gen_dict[c]):
            gen.add(c, gen_dict[c])
    expected = li_code_loss(x0.flatten(1), labels, real_dict, gen_dict, 0.002, 0.008)
    ours = memory_losses(x0, torch.from_numpy(labels), real, gen, 0.002, 0.008, legacy_accumulation=True)
    assert torch.allclose(ours, expected, rtol=1e-6, atol=0)
    once = memory_losses(x0, torch.from_numpy(labels), real, gen, 0.002, 0.008)
    assert not torch.allclose(once, expected)


# --- D4M ----------------------------------------------------------------------------------------------------------


def test_d4m_prompts_are_its_label_lines():
    from patchdd.data.subsets import d4m_label, synset_line

    assert d4m_label("n01440764") == "tench, Tinca tinca" == synset_line("n01440764")
    assert (d4m_label("n02012849"), d4m_label("n03126707")) == ("crane,machine", "crane, bird")  # as D4M's file
    assert synset_line("n02012849") == "crane" and d4m_label("toy_circle") == "toy circle"
    assert D4MOptions().prompt_template == "{d4m_label}"


def test_d4m_squashes_bilinearly_as_torchvisions_resize():
    from torchvision import transforms

    from patchdd.data.scoring_images import plan_resize, torchvision_pixels
    from patchdd.workflows.generate import SQUASH_RESIZE

    image = gradient_image(120, 90, seed=3)
    assert SQUASH_RESIZE[D4MOptions().resize_filter] == "torchvision"
    squashed = torchvision_pixels(image, plan_resize(120, 90, 32, square=True))  # the encode pass's whole_image
    assert torch.equal(squashed, transforms.Compose([transforms.Resize((32, 32)), transforms.PILToTensor()])(image))


# --- DiT decoding -------------------------------------------------------------------------------------------------


def test_generation_decodes_with_the_vae_it_is_given(tmp_path):
    from diffusers import AutoencoderKL

    from patchdd.lightning_modules.generation import LatentGenerator
    from patchdd.priors.dit import load_vae, weights_hash

    prior = save_tiny_dit(tmp_path / "dit", ["n01440764", "n01443537"])
    torch.manual_seed(7)
    other = AutoencoderKL.from_config(yaml.safe_load(ARCHITECTURES.read_text())["tiny"]["vae"])
    other.save_pretrained(tmp_path / "ft-mse")  # a hub-style VAE folder (config at its root)
    own = LatentGenerator(str(prior))
    given = LatentGenerator(str(prior), vae=str(tmp_path / "ft-mse"))
    assert weights_hash(given.dit.vae) == weights_hash(other) != weights_hash(own.dit.vae)
    assert weights_hash(load_vae(str(prior))) == weights_hash(own.dit.vae)  # a prior folder: its vae/
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(given.dit.decode(latents), own.dit.decode(latents))
