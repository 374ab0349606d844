"""Generative branch II's fine-tune pieces: DiffFit on diffusers' DiT, the memory banks and their losses, the
learned-variance bound, EMA, and a short DiffFit + memory fine-tune of a tiny DiT on toy data (CPU, seconds)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from patchdd.generation.memory import MemoryBank, max_similarity_keep, memory_losses
from patchdd.priors.difffit import DiffFitScales, difffit_trainable
from patchdd.priors.dit import load_dit_prior
from patchdd.priors.objectives import normal_kl, variational_bound_terms
from patchdd.training.optim import ExponentialAverage
from tiny_dit import SCHEDULE, save_tiny_dit, tiny_dit


def inputs(batch: int = 3):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, 8, 8, generator=generator), torch.randint(0, 1000, (batch,), generator=generator),
            torch.randint(0, 4, (batch,), generator=generator))


# --- DiffFit --------------------------------------------------------------------------------------------------


def test_difffit_trains_biases_the_one_label_table_and_the_scales_only():
    prior = tiny_dit(["a", "b", "c", "d"])
    model = prior.transformer
    model.requires_grad_(True)
    trainable = difffit_trainable(model)
    assert all(n.endswith(".bias") or n.endswith("class_embedder.embedding_table.weight") for n in trainable)
    assert sum("embedding_table" in n for n in trainable) == 1  # tied: one table
    assert not model.transformer_blocks[0].norm1.linear.weight.requires_grad  # the adaLN matrices stay frozen
    assert set(trainable) == {n for n, _ in model.named_parameters() if n.endswith(".bias")} | {
        "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"}
    z, t, y = inputs()
    with torch.no_grad():
        before = model(z, t, y).sample
        scales = DiffFitScales(model, blocks=1)
        assert torch.equal(model(z, t, y).sample, before)  # every scale starts at 1
        assert sum(p.numel() for p in scales.parameters()) == 16 * (3 + 1 + 1 + 1)  # width 16, one block
        for p in scales.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
        scaled = model(z, t, y).sample
        assert not torch.allclose(scaled, before)
        folded = scales.folded(model)  # the scales multiplied into the linear layers: a plain DiT, no hooks
        assert torch.allclose(folded(z, t, y).sample, scaled, atol=1e-5)
        assert sum(p.numel() for p in folded.parameters()) > sum(p.numel() for p in model.parameters())  # untied


# --- memory banks and their losses ------------------------------------------------------------------------------


def test_banks_keep_their_capacity_and_evict_by_their_rule():
    fifo, adaptive = MemoryBank(3, "fifo"), MemoryBank(3, "max_similarity")
    vectors = torch.eye(4)
    for bank in (fifo, adaptive):
        bank.add(0, vectors[:3])
        bank.add(0, vectors[:1] * 2)  # a duplicate of the first direction
        bank.add(1, vectors[3:].requires_grad_())
        assert len(bank.get(0)) == 3 and len(bank.get(1)) == 1 and not bank.get(1).requires_grad
    assert torch.equal(fifo.get(0), torch.stack([vectors[1], vectors[2], 2 * vectors[0]]))  # the oldest went
    assert sorted(F.normalize(adaptive.get(0)).argmax(1).tolist()) == [0, 1, 2]  # one copy of the duplicate went
    unit = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.2]]), dim=1)
    sums = (unit @ unit.T).sum(1)
    assert max_similarity_keep(unit, 3).tolist() == [i for i in range(4) if i != int(sums.argmax())]
    with pytest.raises(ValueError, match="eviction"):
        MemoryBank(3, "lru")


def test_adaptive_banks_end_less_redundant_than_fifo():
    """Seed 001's claim as a property: the same stream (clustered vectors) leaves the self-adaptive bank with a lower
    mean pairwise cosine than the FIFO bank."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=generator)
    fifo, adaptive = MemoryBank(16, "fifo"), MemoryBank(16, "max_similarity")
    for step in range(40):
        centre = centres[0] if step % 5 else centres[step // 5 % 4]  # mostly one cluster
        batch = centre + 0.3 * torch.randn(4, 32, generator=generator)
        fifo.add(0, batch)
        adaptive.add(0, batch)
    assert adaptive.mean_similarity(0) < fifo.mean_similarity(0) - 0.1


def test_memory_losses():
    e = torch.eye(4)
    real, generated = MemoryBank(4), MemoryBank(4)
    x0 = e[:1].clone().requires_grad_()
    labels = torch.tensor([0])
    assert float(memory_losses(x0, labels, real, generated, 1.0, 1.0)) == 0.0  # no generated memory yet
    real.add(0, e[:1])
    generated.add(0, e[1:2])
    assert abs(float(memory_losses(x0, labels, real, generated, 0.3, 0.7))) < 1e-6  # x0's direction, orthogonal
    real.banks[0] = e[2:3]
    assert math.isclose(float(memory_losses(x0, labels, real, generated, 0.3, 0.7)), 0.3, abs_tol=1e-6)
    generated.banks[0] = e[:1]
    loss = memory_losses(x0, labels, real, generated, 0.3, 0.7)
    assert math.isclose(float(loss), 1.0, abs_tol=1e-6)  # 0.3 * (1 - 0) + 0.7 * 1
    loss.backward()
    assert x0.grad is not None and not real.get(0).requires_grad
    # two classes, equal terms: averaged over the classes; the legacy accumulation counts class k n - k + 1 times
    for c in (1, 2):
        real.add(c, e[2:3])
        generated.add(c, e[:1])
    x0s, three = e[:1].repeat(3, 1), torch.tensor([0, 1, 2])
    per_class = 1.0 / 3
    assert math.isclose(float(memory_losses(x0s, three, real, generated, 0.3, 0.7)), 3 * per_class, abs_tol=1e-6)
    legacy = memory_losses(x0s, three, real, generated, 0.3, 0.7, legacy_accumulation=True)
    assert math.isclose(float(legacy), (3 + 2 + 1) * per_class, abs_tol=1e-6)


# --- the learned-variance bound and EMA ---------------------------------------------------------------------------


def test_variational_bound_is_the_closed_form_kl_and_zero_when_exact():
    alphas = DDPMScheduler(**SCHEDULE).alphas_cumprod
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)
    t = torch.tensor([400, 37])
    abar = alphas[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    exact = variational_bound_terms(alphas, x0, noisy, t, noise, -torch.ones_like(x0))  # v = -1: the posterior's
    assert torch.allclose(exact, torch.zeros(2, dtype=exact.dtype), atol=1e-6)
    eps, v = noise + 0.1 * torch.randn(2, 4, 4, 4, generator=generator), torch.rand(2, 4, 4, 4, generator=generator)
    bits = variational_bound_terms(alphas, x0, noisy, t, eps, v)
    for i, step in enumerate(t.tolist()):  # the Gaussian KL written out, in bits
        a, a_prev = alphas[step].double(), alphas[step - 1].double()
        beta = 1 - a / a_prev
        post_var = beta * (1 - a_prev) / (1 - a)
        mean = lambda z0: (beta * a_prev.sqrt() * z0 + (1 - a_prev) * (1 - beta).sqrt() * noisy[i]) / (1 - a)  # noqa: E731
        model_var = torch.exp((v[i] + 1) / 2 * beta.log() + (1 - v[i]) / 2 * post_var.log())
        kl = 0.5 * (torch.log(model_var / post_var) + (post_var + (mean(x0[i]) - mean(
            (noisy[i] - (1 - a).sqrt() * eps[i]) / a.sqrt())) ** 2) / model_var - 1)
        assert torch.isclose(bits[i], kl.mean() / math.log(2), rtol=1e-4)
    assert torch.allclose(normal_kl(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3)), torch.zeros(3))


def test_exponential_average_swaps_in_and_out():
    weight = torch.nn.Parameter(torch.zeros(2))
    ema = ExponentialAverage({"w": weight}, decay=0.5)
    with torch.no_grad():
        weight.fill_(4.0)
    ema.update({"w": weight})
    with ema.swapped({"w": weight}):
        assert torch.equal(weight, torch.full((2,), 2.0))
    assert torch.equal(weight, torch.full((2,), 4.0))


# --- a short fine-tune ------------------------------------------------------------------------------------------


def test_difffit_memory_finetune_exports_a_plain_dit_with_the_ema_weights(toy_root, tmp_path):
    from patchdd.datamodules.real import ImageFolderDataModule
    from patchdd.lightning_modules.dit_prior import DiTDiffusionPrior, MemoryOptions

    folders = sorted(p.name for p in (toy_root / "train").iterdir())
    source = save_tiny_dit(tmp_path / "source", folders, sample_size=16)  # learned variance: mse + vb
    module = DiTDiffusionPrior(pretrained=str(source), finetune="difffit", gamma_blocks=1, ema_decay=0.9,
                               memory=MemoryOptions(real_capacity=4, gen_capacity=4, eviction="max_similarity"),
                               export_dir=str(tmp_path / "tuned"), warmup_steps=1)
    before = {n: p.detach().clone() for n, p in module.transformer.named_parameters()}
    data = ImageFolderDataModule(str(toy_root), image_size=64, eval_resize=64, train_scale=(1.0, 1.0), batch_size=8,
                                 num_workers=0)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, data)
    changed = {n for n, p in module.transformer.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(".bias") or "embedding_table" in n for n in changed)
    assert all(len(bank.get(c)) <= 4 for bank in module.banks for c in bank.banks)
    assert "train/memory_loss" in trainer.logged_metrics
    tuned = load_dit_prior(str(tmp_path / "tuned"))  # a plain DiT: the scales are folded in
    z, t, _ = inputs(2)
    y = torch.tensor([0, 1])
    with torch.no_grad(), module.ema.swapped(module.trained_parameters()):
        expected = module.transformer(z.repeat(1, 1, 2, 2), t, y).sample
    assert torch.allclose(tuned.transformer(z.repeat(1, 1, 2, 2), t, y).sample, expected, atol=1e-5)


class CrashAtStep(L.Callback):
    """A crash (kill -9 in effect: nothing after it is saved) once ``step`` optimizer steps are checkpointed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_memory_finetune_cut_mid_epoch_resumes_exactly(toy_root, tmp_path, num_workers):
    """Shuffle order, worker augmentations, noise, label dropout, optimiser, EMA and banks all continue as in the
    uncut run: the resumed weights are bit-identical."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from patchdd.datamodules.real import ImageFolderDataModule
    from patchdd.lightning_modules.dit_prior import DiTDiffusionPrior, MemoryOptions

    folders = sorted(p.name for p in (toy_root / "train").iterdir())
    source = save_tiny_dit(tmp_path / "source", folders, sample_size=16, learn_sigma=False)

    def fit(run: str, crash: int | None = None, resume: bool = False) -> DiTDiffusionPrior:
        L.seed_everything(0)
        module = DiTDiffusionPrior(pretrained=str(source), finetune="difffit", gamma_blocks=1, ema_decay=0.9,
                                   memory=MemoryOptions(real_capacity=3, gen_capacity=3), latent_mode="sample",
                                   warmup_steps=2, decay_fraction=0.3)
        data = ImageFolderDataModule(str(toy_root), image_size=64, eval_resize=64, batch_size=5,
                                     num_workers=num_workers, persistent_workers=False)  # 5 batches an epoch
        callbacks = [ModelCheckpoint(tmp_path / run, every_n_train_steps=1, save_last=True)]
        trainer = L.Trainer(max_steps=9, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                            callbacks=callbacks + ([CrashAtStep(crash)] if crash else []))
        trainer.fit(module, data, ckpt_path=str(tmp_path / run / "last.ckpt") if resume else None)
        return module

    whole = fit("whole")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit("cut", crash=7)  # in the second epoch, two batches into it
    resumed = fit("cut", resume=True)
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    for bank_a, bank_b in zip(whole.banks, resumed.banks):
        assert all(torch.equal(bank_a.get(c), bank_b.get(c)) for c in bank_a.banks)
    assert all(torch.equal(a, b) for a, b in zip(whole.ema.state().values(), resumed.ema.state().values()))
