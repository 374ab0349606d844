"""The DiT priors compute Meta's DiT (facebookresearch/DiT ``models.py``), not diffusers' variant of it.

The reference below is a transcription of Meta's math (``TimestepEmbedder.timestep_embedding``, ``LabelEmbedder``,
``DiTBlock``, ``FinalLayer``, ``unpatchify``, ``get_2d_sincos_pos_embed``) written on the weights of a diffusers
``DiTTransformer2DModel``; a loaded prior must agree with it to 1e-5 on random weights.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchdd.priors.dit import load_dit_prior
from tiny_dit import save_tiny_dit

FOLDERS = ["n01440764", "n01443537", "n01484850"]


def meta_timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def meta_pos_embed(dim: int, grid: int) -> torch.Tensor:
    def one_axis(d: int, positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return torch.from_numpy(np.concatenate([one_axis(dim // 2, w), one_axis(dim // 2, h)], axis=1)).float()


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def meta_forward(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Meta's ``DiT.forward`` on the weights of a diffusers DiT (eps 1e-6 in every LayerNorm)."""
    config = model.config
    p, heads, width = config.patch_size, config.num_attention_heads, model.inner_dim
    tokens = model.pos_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = tokens + meta_pos_embed(width, config.sample_size // p)[None]
    embedder = model.transformer_blocks[0].norm1.emb
    mlp = embedder.timestep_embedder
    c = mlp.linear_2(F.silu(mlp.linear_1(meta_timestep_embedding(t)))) + embedder.class_embedder.embedding_table(y)
    for block in model.transformer_blocks:
        chunks = block.norm1.linear(F.silu(c)).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks
        h = modulate(F.layer_norm(tokens, (width,), eps=1e-6), shift_msa, scale_msa)
        n, length, _ = h.shape
        q, k, v = (proj(h).view(n, length, heads, -1).transpose(1, 2)
                   for proj in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v))
        attended = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
        tokens = tokens + gate_msa.unsqueeze(1) * block.attn1.to_out[0](attended.transpose(1, 2).reshape(n, length, -1))
        h = modulate(F.layer_norm(tokens, (width,), eps=1e-6), shift_mlp, scale_mlp)
        hidden = F.gelu(block.ff.net[0].proj(h), approximate="tanh")
        tokens = tokens + gate_mlp.unsqueeze(1) * block.ff.net[2](hidden)
    shift, scale = model.proj_out_1(F.silu(c)).chunk(2, dim=1)
    out = model.proj_out_2(modulate(F.layer_norm(tokens, (width,), eps=1e-6), shift, scale))
    side, channels = config.sample_size // p, model.out_channels
    out = out.reshape(n, side, side, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(n, channels, side * p, side * p)


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return save_tiny_dit(tmp_path_factory.mktemp("dit") / "tiny", FOLDERS)


def randomised(transformer) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def test_a_loaded_dit_computes_metas_dit(dit_dir):
    transformer = load_dit_prior(str(dit_dir)).transformer
    randomised(transformer)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([0, 600, 999]), torch.tensor([0, 2, 3])  # 3: the null class
    ours = transformer(x, t, y, return_dict=False)[0]
    with torch.no_grad():
        reference = meta_forward(transformer, x, t, y)
    assert (ours - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max())


def test_diffusers_math_stays_one_option_away_and_differs(dit_dir):
    meta, plain = load_dit_prior(str(dit_dir)).transformer, load_dit_prior(str(dit_dir), meta_dit=False).transformer
    randomised(meta)
    randomised(plain)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([300, 900]), torch.tensor([1, 0])
    with torch.no_grad():
        gap = (plain(x, t, y, return_dict=False)[0] - meta_forward(plain, x, t, y)).abs().max()
    assert gap > 1e-3  # diffusers divides the frequencies by 127 and uses eps 1e-5: not Meta's DiT
    assert plain.transformer_blocks[0].norm3.eps == 1e-5 and meta.transformer_blocks[1].norm3.eps == 1e-6
    assert all(b.norm1.emb.time_proj.downscale_freq_shift == 0 for b in meta.transformer_blocks)
