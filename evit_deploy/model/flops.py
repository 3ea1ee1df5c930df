"""Multiply-accumulate counts with the actual token count of every block.

Counted as the paper does (fvcore-style, matmuls only): patch embedding, per block qkv, q@k^T,
attn@v, proj and the two MLP layers, and the head. A drop block runs attention on the tokens that
enter it and its MLP on the tokens that leave it; LayerNorm, softmax, GELU and the token
reorganization itself are a rounding error and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from evit_deploy.model.config import EvitConfig


@dataclass(frozen=True)
class BlockMacs:
    block: int
    tokens_attn: int  # class token included
    tokens_mlp: int
    attention: int
    mlp: int


def block_macs(config: EvitConfig) -> list[BlockMacs]:
    arch = config.arch
    dim, hidden = arch.embed_dim, arch.mlp_hidden
    rows = []
    for plan in config.token_plan:
        n_attn, n_mlp = plan.tokens_in + 1, plan.tokens_out + 1
        attention = n_attn * dim * 3 * dim + 2 * n_attn * n_attn * dim + n_attn * dim * dim
        mlp = 2 * n_mlp * dim * hidden
        rows.append(BlockMacs(plan.block, n_attn, n_mlp, attention, mlp))
    return rows


def count_macs(config: EvitConfig) -> int:
    arch = config.arch
    patch_embed = config.num_patches * 3 * arch.patch_size**2 * arch.embed_dim
    head = arch.embed_dim * config.num_classes
    return patch_embed + sum(b.attention + b.mlp for b in block_macs(config)) + head


def count_params(config: EvitConfig) -> int:
    """Parameters (token reorganization adds none): computed, so no model has to be built."""
    arch = config.arch
    dim, hidden = arch.embed_dim, arch.mlp_hidden
    per_block = 2 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (
        dim * hidden + hidden + hidden * dim + dim
    )
    patch_embed = 3 * arch.patch_size**2 * dim + dim
    return (
        patch_embed
        + dim  # cls_token
        + (config.num_patches + 1) * dim  # pos_embed
        + arch.depth * per_block
        + 2 * dim  # final norm
        + dim * config.num_classes
        + config.num_classes
    )
