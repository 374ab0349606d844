"""The diffusion-prior trainer: loss and conditioning functions, a few `cli.py fit` steps, the SD-layout export."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from patchdd import cli
from patchdd.data.sources import IMAGENET_MEAN, IMAGENET_STD, ClassMapping
from patchdd.data.toy import write_toy_dataset
from patchdd.priors.sd import load_prior
from patchdd.errors import PriorUnavailableError
from patchdd.priors.sd import build_prior, save_prior
from patchdd.lightning_modules.diffusion_prior import DiffusionPrior, export_checkpoint
from patchdd.priors.objectives import (
    candidate_prompts,
    class_prompts,
    drop_prompts,
    noise_prediction_loss,
    prompt_errors,
    timestep_loss_weights,
    to_vae_range,
)
from patchdd.priors.sd import encode_prompts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "prior" / "toy.yaml"


class ScaledInput(torch.nn.Module):
    """A stand-in UNet: predicts ``gain * noisy latent + mean of the text embedding``."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, sample, timestep, encoder_hidden_states):
        bias = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=self.gain * sample + bias)


def toy_component_configs() -> dict:
    return yaml.safe_load(CONFIG.read_text())["model"]["init_args"]


def test_noise_prediction_loss_matches_hand_computation():
    scheduler = DDPMScheduler(num_train_timesteps=10, beta_start=0.1, beta_end=0.5, beta_schedule="linear")
    latents = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 3.0]]]])  # (2, 1, 1, 2)
    noise = torch.tensor([[[[0.3, 0.1]]], [[[-1.0, 2.0]]]])
    timesteps = torch.tensor([0, 3])
    text = torch.tensor([[[1.0, 3.0]], [[0.0, 0.0]]])  # embedding means 2 and 0
    betas = [0.1 + (0.5 - 0.1) * i / 9 for i in range(10)]
    errors = []
    for b, t in enumerate(timesteps.tolist()):
        alpha_bar = math.prod(1 - beta for beta in betas[: t + 1])
        for z, eps in zip(latents[b].flatten().tolist(), noise[b].flatten().tolist()):
            noisy = math.sqrt(alpha_bar) * z + math.sqrt(1 - alpha_bar) * eps
            prediction = 0.5 * noisy + text[b].mean().item()
            errors.append((prediction - eps) ** 2)
    loss = noise_prediction_loss(ScaledInput(0.5), scheduler, latents, text, noise, timesteps)
    assert loss.item() == pytest.approx(sum(errors) / len(errors), rel=1e-5)


def test_prompt_errors_rank_the_prompt_that_predicts_the_noise_first():
    scheduler = DDPMScheduler(num_train_timesteps=10)
    latents, noise = torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5)
    timesteps = torch.tensor([2, 7])
    # the stand-in predicts eps = embedding mean: image 0's prompts are off by 1, 0, 2; image 1's by 0, 3, 1
    means = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]])
    embeddings = means.view(2, 3, 1, 1).expand(2, 3, 1, 8)
    errors = prompt_errors(ScaledInput(1.0), scheduler, latents, embeddings, noise, timesteps)
    assert torch.allclose(errors, means.square())


def test_candidate_prompts_put_the_own_class_first_then_distinct_others():
    labels = torch.tensor([3, 0, 9, 3])
    candidates = candidate_prompts(labels, 10, 4, torch.Generator().manual_seed(0))
    assert candidates.shape == (4, 4) and torch.equal(candidates[:, 0], labels)
    assert all(len(set(row.tolist())) == 4 for row in candidates)
    everything = candidate_prompts(labels, 10, 10, torch.Generator().manual_seed(1))
    assert all(sorted(row.tolist()) == list(range(10)) for row in everything)
    with pytest.raises(ValueError, match="candidates"):
        candidate_prompts(labels, 10, 11)


def test_v_weighting_is_one_over_alpha_bar_and_can_be_capped():
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    timesteps = torch.tensor([0, 500, 999])
    assert torch.equal(timestep_loss_weights(scheduler, timesteps, "epsilon"), torch.ones(3))
    weights = timestep_loss_weights(scheduler, timesteps, "v")
    assert torch.allclose(weights, 1 / scheduler.alphas_cumprod[timesteps])
    assert weights[0] == pytest.approx(1.0, abs=1e-3) and weights[2] > 100
    assert timestep_loss_weights(scheduler, timesteps, "v", max_weight=5.0)[2] == 5.0
    with pytest.raises(ValueError, match="weighting"):
        timestep_loss_weights(scheduler, timesteps, "snr")


def test_weighted_loss_is_the_weighted_mean_of_per_sample_losses():
    scheduler = DDPMScheduler(num_train_timesteps=10)
    latents, noise = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    text = torch.tensor([1.0, 3.0]).view(2, 1, 1)  # per-sample squared errors 1 and 9
    loss = noise_prediction_loss(ScaledInput(1.0), scheduler, latents, text, noise, torch.tensor([1, 2]),
                                 torch.tensor([2.0, 0.5]))
    assert loss.item() == pytest.approx((2 * 1 + 0.5 * 9) / 2)


def test_drop_prompts_replaces_the_configured_fraction_by_the_null_prompt():
    labels = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_prompts(labels, null_id=10, fraction=0.15, generator=torch.Generator().manual_seed(1))
    is_null = dropped == 10
    assert abs(is_null.float().mean().item() - 0.15) < 0.01
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert torch.equal(drop_prompts(labels, 10, 0.0), labels)
    assert bool((drop_prompts(labels, 10, 1.0) == 10).all())
    with pytest.raises(ValueError, match="fraction"):
        drop_prompts(labels, 10, 1.5)


def test_class_prompts_put_the_null_prompt_last():
    assert class_prompts(["ring", "star"], "An image of {name}", "An image of .") == [
        "An image of ring", "An image of star", "An image of ."]
    with pytest.raises(ValueError, match="name"):
        class_prompts(["ring"], "An image", "An image of .")


def test_to_vae_range_undoes_the_data_module_normalisation():
    pixels = torch.rand(2, 3, 4, 4)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    restored = to_vae_range((pixels - mean) / std, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(restored, pixels * 2 - 1, atol=1e-6)


def test_a_built_prior_has_an_offline_tokenizer_with_one_prompt_per_class(tmp_path):
    configs = toy_component_configs()
    parts = build_prior(None, configs["unet"], configs["vae"], configs["text_encoder"], configs["scheduler"])
    ids = parts.tokenizer(["An image of ring", "An image of star", "An image of ."]).input_ids
    assert len({tuple(i) for i in ids}) == 3
    assert all(i[0] == parts.text_encoder.config.bos_token_id and i[-1] == parts.text_encoder.config.eos_token_id
               for i in ids)
    assert parts.tokenizer.model_max_length == parts.text_encoder.config.max_position_embeddings


def test_missing_components_give_one_clear_error():
    configs = toy_component_configs()
    with pytest.raises(PriorUnavailableError, match="unet"):
        build_prior(None, None, configs["vae"], configs["text_encoder"], configs["scheduler"])
    with pytest.raises(PriorUnavailableError, match="no/such/prior"):
        build_prior("no/such/prior", None, configs["vae"], configs["text_encoder"], configs["scheduler"])


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return write_toy_dataset(str(tmp_path_factory.mktemp("toy")), num_classes=3, image_size=64,
                             train_per_class=4, val_per_class=2)


@pytest.fixture(scope="module")
def fitted(toy_root, tmp_path_factory) -> Path:
    """Three steps of `cli.py fit -c configs/prior/toy.yaml` (one VAE step, two UNet steps), exported."""
    work = tmp_path_factory.mktemp("prior")
    cli.main(["fit", "-c", str(CONFIG), "--data.root", str(toy_root), "--data.batch_size", "6",
              "--data.num_workers", "0", "--trainer.max_steps", "3", "--model.vae_steps", "1",
              "--model.warmup_steps", "1", "--trainer.check_val_every_n_epoch", "1",
              "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(work / "logs"), "--model.export_dir", str(work / "export")])
    return work


def test_fit_exports_a_folder_that_diffusers_reloads(fitted):
    out = fitted / "export"
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(out, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(out, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    assert scheduler.config.prediction_type == "epsilon" and unet.config.sample_size == 16
    assert vae.config.scaling_factor != pytest.approx(0.18215)  # measured on the latents after the VAE step
    mapping = ClassMapping.load(out / "class_mapping.json")
    assert mapping.names == ("circle", "square", "triangle")
    prompts = class_prompts(mapping.names, "An image of {name}", "An image of .")
    embeddings = encode_prompts(text_encoder, tokenizer, prompts)
    assert embeddings.shape == (4, tokenizer.model_max_length, unet.config.cross_attention_dim)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    pipeline = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, feature_extractor=None)
    assert torch.equal(pipeline.unet.conv_in.weight, unet.conv_in.weight)


def test_the_scoring_pass_loads_the_exported_prior(fitted):
    prior = load_prior(str(fitted / "export"))
    assert prior.downsample_factor == 4 and not any(p.requires_grad for p in prior.parameters())
    mapping = ClassMapping.load(fitted / "export" / "class_mapping.json")
    embeddings = prior.encode_prompts(class_prompts(mapping.names, "An image of {name}", "An image of ."))
    latents = prior.encode_images(torch.zeros(1, 3, 64, 64))
    assert embeddings.shape[0] == 4 and latents.shape == (1, 4, 16, 16)
    assert prior.unet(latents, 10, encoder_hidden_states=embeddings[:1]).sample.shape == latents.shape


def test_validation_logs_loss_text_gain_and_prompt_accuracy(fitted):
    with next((fitted / "logs").rglob("metrics.csv")).open() as fh:
        rows = [row for row in csv.DictReader(fh) if row.get("val/prompt_accuracy")]
    assert rows, "no validation after the VAE phase was logged"
    for row in rows:
        assert 0.0 <= float(row["val/prompt_accuracy"]) <= 1.0 and float(row["val/loss"]) > 0
        assert math.isfinite(float(row["val/text_gain"]))


def test_any_checkpoint_exports_the_same_prior(fitted, tmp_path):
    checkpoint = next((fitted / "logs").rglob("*.ckpt"))
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 3
    out = export_checkpoint(str(checkpoint), str(tmp_path / "again"))
    first = UNet2DConditionModel.from_pretrained(fitted / "export", subfolder="unet").state_dict()
    again = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert ClassMapping.load(out / "class_mapping.json").names == ("circle", "square", "triangle")


def test_a_loaded_prior_freezes_vae_and_text_encoder(tmp_path):
    configs = toy_component_configs()
    parts = build_prior(None, configs["unet"], configs["vae"], configs["text_encoder"], configs["scheduler"])
    parts.vae.register_to_config(scaling_factor=0.5)
    save_prior(tmp_path, parts)
    prior = DiffusionPrior(pretrained=str(tmp_path))  # every component loaded: the SD v1.5 fine-tuning path
    assert prior.latent_scale.item() == pytest.approx(0.5)
    assert all(p.requires_grad for p in prior.unet.parameters())
    assert not any(p.requires_grad for p in prior.vae.parameters())
    assert not any(p.requires_grad for p in prior.text_encoder.parameters())
    assert prior.tokenizer("An image of .").input_ids == parts.tokenizer("An image of .").input_ids
