"""DiffFit on diffusers' DiT, as Minimax and Li et al. fine-tune DiT-XL/2: biases, the one label table and learnable
per-channel scales (gamma) on the first blocks train; everything else, the adaLN modulation matrices included,
stays frozen.

The trainable set is named explicitly: a substring filter on "norm" (Minimax's) would catch diffusers'
``norm1.linear.weight``, the 223 M-parameter adaLN matrices, which Meta's DiT has no "norm" in the name of. The
scales are not in diffusers: forward hooks multiply the q / k / v projections (attention gamma 1, 3 x width),
the attention output (attention gamma 2 times the block's gamma 1: both scale that tensor, before the adaLN gate,
with which a per-channel product commutes) and the MLP output (the block's gamma 2), all initialised to 1. For
export the scales are folded into those linear layers (W <- diag(gamma) W, b <- gamma b): the exported DiT is a plain
one that ``DiTPipeline`` loads.
"""

from __future__ import annotations

import torch
from torch import nn

from patchdd.priors.dit import untied_copy


def difffit_trainable(transformer: nn.Module) -> list[str]:
    """Freeze the DiT except every bias and the (tied) label table; the names left trainable."""
    transformer.requires_grad_(False)
    table = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    table.requires_grad_(True)
    for name, parameter in transformer.named_parameters():
        if name.endswith(".bias"):
            parameter.requires_grad_(True)
    return [name for name, parameter in transformer.named_parameters() if parameter.requires_grad]


def scaled_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers of a block whose outputs the scales multiply."""
    return {"to_q": block.attn1.to_q, "to_k": block.attn1.to_k, "to_v": block.attn1.to_v,
            "to_out": block.attn1.to_out[0], "ff_out": block.ff.net[-1]}


class DiffFitScales(nn.Module):
    """The gamma scales of the first ``blocks`` transformer blocks, applied by forward hooks.

    Args:
        transformer: the DiT (``DiTTransformer2DModel``) to scale.
        blocks: how many blocks, from the first, get scales (Minimax: 14 of DiT-XL/2's 28).
    """

    def __init__(self, transformer: nn.Module, blocks: int = 14) -> None:
        super().__init__()
        width = transformer.transformer_blocks[0].attn1.to_q.out_features
        count = min(blocks, len(transformer.transformer_blocks))
        self.attention_qkv = nn.ParameterList([nn.Parameter(torch.ones(3 * width)) for _ in range(count)])
        self.attention_out = nn.ParameterList([nn.Parameter(torch.ones(width)) for _ in range(count)])
        self.block_attention = nn.ParameterList([nn.Parameter(torch.ones(width)) for _ in range(count)])
        self.block_mlp = nn.ParameterList([nn.Parameter(torch.ones(width)) for _ in range(count)])
        self._handles: list = []
        self.attach(transformer)

    def factors(self, index: int) -> dict[str, torch.Tensor]:
        """The per-output-channel factor of each scaled linear layer of block ``index``."""
        q, k, v = self.attention_qkv[index].chunk(3)
        return {"to_q": q, "to_k": k, "to_v": v, "to_out": self.attention_out[index] * self.block_attention[index],
                "ff_out": self.block_mlp[index]}

    def attach(self, transformer: nn.Module) -> None:
        for index in range(len(self.attention_qkv)):
            linears = scaled_linears(transformer.transformer_blocks[index])
            for name, linear in linears.items():
                hook = (lambda module, inputs, output, i=index, n=name: output * self.factors(i)[n].to(output.dtype))
                self._handles.append(linear.register_forward_hook(hook))

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def folded(self, transformer: nn.Module) -> nn.Module:
        """An untied copy of ``transformer`` with the scales multiplied into its linear layers (no hooks)."""
        self.detach_hooks()
        try:
            copy = untied_copy(transformer)
        finally:
            self.attach(transformer)
        for index in range(len(self.attention_qkv)):
            linears = scaled_linears(copy.transformer_blocks[index])
            for name, factor in self.factors(index).items():
                linears[name].weight.mul_(factor.view(-1, 1).to(linears[name].weight))
                if linears[name].bias is not None:
                    linears[name].bias.mul_(factor.to(linears[name].bias))
        return copy
