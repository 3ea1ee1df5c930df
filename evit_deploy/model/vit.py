"""DeiT / EViT vision transformer with timm-compatible state-dict keys.

Structure and key names follow timm's vision_transformer.py (patch_embed.proj, cls_token, pos_embed,
blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm, head) so official EViT and timm
DeiT checkpoints load as they are. Token counts are fixed by the config, so every TopK has a
constant K and the graph exports with static shapes apart from the batch axis.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evit_deploy.model.config import EvitConfig, Preprocessing

LAYER_NORM_EPS = 1e-6


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class ClassAttention(nn.Module):
    """The class token's attention to the image tokens, averaged over heads ([B, N-1], not
    renormalised: the softmax includes the class key, as in the official code). Only the class
    row is computed, softmax(q_cls K^T * scale) ([B, H, 1, N]): the same numbers as row 0 of the
    full attention map at 1/N of its cost. A module of its own so exported nodes carry its scope
    (`blocks.N.attn.class_attention`): profiles and FP32 islands find EViT's scores by it."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = (q[:, :, :1] @ k.transpose(-2, -1)) * self.scale
        return logits.softmax(dim=-1)[:, :, 0, 1:].mean(dim=1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.class_attention = ClassAttention(self.head_dim**-0.5)

    def forward(
        self, x: torch.Tensor, need_cls_attn: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the attention output and, when asked, the class attention (ClassAttention).

        Every block runs fused attention (SDPA), drop blocks too: the official code reads the class
        row of an explicit softmax(QK^T), which materialises the N x N map and keeps runtimes
        (OpenVINO, TensorRT) from fusing those blocks' attention. The class row is computed on its
        own beside it instead: the same function."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        cls_attn = self.class_attention(q, k) if need_cls_attn else None
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out), cls_attn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as DeiT was trained
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TokenReorganization(nn.Module):
    """EViT's drop step as a module (no parameters), so exported nodes carry its scope
    (`blocks.N.reorganize`) and a profile can tell what dropping tokens costs."""

    def __init__(self, fuse_token: bool):
        super().__init__()
        self.fuse_token = fuse_token

    def forward(
        self, x: torch.Tensor, cls_attn: torch.Tensor, keep: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return reorganize_tokens(x, cls_attn, keep, self.fuse_token)


def reorganize_tokens(
    x: torch.Tensor, cls_attn: torch.Tensor, keep: int, fuse_token: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT's token reorganization: [class, top-`keep` image tokens by class attention (sorted,
    descending), fused token]. The fused token is the class-attention-weighted sum of the dropped
    tokens; zeroing the kept tokens' weights and taking one batched matmul gives the same sum as
    gathering the complement, without the complement's scatter/sort."""
    cls_token, image_tokens = x[:, :1], x[:, 1:]
    _, idx = torch.topk(cls_attn, keep, dim=1, largest=True, sorted=True)
    parts = [cls_token, gather_tokens(image_tokens, idx)]
    if fuse_token:
        dropped_weights = cls_attn.scatter(1, idx, 0.0)
        parts.append(torch.bmm(dropped_weights.unsqueeze(1), image_tokens))
    return torch.cat(parts, dim=1), idx


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tokens[b, idx[b]] for every b ([B, N, C], [B, K] -> [B, K, C]), as one row gather on the
    flattened [B*N, C] tokens: the exported graph is a Gather on a [B*K] index, where torch.gather
    would export an index broadcast to [B, K, C] (Expand + GatherElements), which costs as much at
    every keep rate."""
    batch, count, channels = tokens.shape
    offsets = torch.arange(batch, device=idx.device).unsqueeze(1) * count
    rows = (idx + offsets).reshape(-1)
    return tokens.reshape(batch * count, channels).index_select(0, rows).reshape(batch, -1, channels)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, keep: int | None, fuse: bool):
        super().__init__()
        self.keep = keep
        self.fuse_token = fuse
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, mlp_hidden)
        self.reorganize = TokenReorganization(fuse)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, cls_attn = self.attn(self.norm1(x), need_cls_attn=self.keep is not None)
        x = x + attn_out
        idx = None
        if self.keep is not None:
            x, idx = self.reorganize(x, cls_attn, self.keep)
        return x + self.mlp(self.norm2(x)), idx


class EViT(nn.Module):
    """A DeiT whose blocks in drop_loc keep only the most-attended image tokens.

    keep_rate 1.0 (or an empty drop_loc) is plain DeiT.
    """

    def __init__(self, config: EvitConfig):
        super().__init__()
        self.config = config
        # Where the weights came from, recorded in exported artifacts so a plain-ViT baseline
        # can be rebuilt from the same weights: "random:SEED" or "sha256:DIGEST" of a checkpoint.
        self.weights = "uninitialised"
        self.checkpoint = ""
        # Class names and input transform, when the checkpoint comes with them (else unnamed
        # classes, DeiT's transform): exported artifacts carry them to every runtime.
        self.classes: list[str] = []
        self.preprocessing = Preprocessing()
        arch = config.arch
        dim = arch.embed_dim
        self.patch_embed = PatchEmbed(arch.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, dim))
        self.blocks = nn.ModuleList(
            Block(dim, arch.num_heads, arch.mlp_hidden, plan.keep, config.fuse_token)
            for plan in config.token_plan
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(dim, config.num_classes)

    def forward(
        self, images: torch.Tensor, return_token_indices: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Logits [B, num_classes]; with return_token_indices also the TopK indices of every drop
        block ([B, K], int64, positions in that block's image tokens, descending score)."""
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        indices = []
        for block in self.blocks:
            x, idx = block(x)
            if idx is not None:
                indices.append(idx)
        # Only the class token feeds the head, and LayerNorm is per token: normalise just it.
        logits = self.head(self.norm(x[:, 0]))
        if return_token_indices:
            return logits, tuple(indices)
        return logits


def init_random_weights(model: EViT, seed: int = 0) -> EViT:
    """Seeded random weights for speed tests and unit tests (predictions are meaningless).

    timm's init (std 0.02) gives almost uniform attention, where top-k choices are near-ties that
    rounding noise can flip. Query/key weights are drawn larger so the class attention is peaky and
    the kept tokens are well separated, as in a trained model.
    """
    generator = torch.Generator().manual_seed(seed)
    dim = model.config.arch.embed_dim
    qk_std = (6.0 / dim) ** 0.5  # attention logits with std ~6
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif ".norm" in name or name.startswith("norm."):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        for block in model.blocks:
            qk = block.attn.qkv.weight[: 2 * dim]
            qk.copy_(torch.randn(qk.shape, generator=generator) * qk_std)
        model.pos_embed.mul_(25.0)  # positions distinguishable even for flat image regions
    model.weights = f"random:{seed}"
    return model


def kept_patch_ids(indices: list, num_patches: int, fuse_token: bool) -> list:
    """Map each drop block's TopK indices (positions in that block's current tokens) to the
    original patch each kept token came from ([B, K] each). A fused token made in drop block j
    (the j-th drop, from 0) is numbered num_patches + j. Works on numpy arrays or tensors."""
    if not indices:
        return []
    batch = indices[0].shape[0]
    ids = np.broadcast_to(np.arange(num_patches), (batch, num_patches))
    kept_ids = []
    for j, idx in enumerate(indices):
        kept = np.take_along_axis(ids, np.asarray(idx), axis=1)
        kept_ids.append(kept)
        ids = np.concatenate([kept, np.full((batch, 1), num_patches + j)], 1) if fuse_token else kept
    return kept_ids
