"""An independent, deliberately plain EViT forward pass for checking evit_deploy.model.vit.

Written literally after the official code (https://github.com/youweiliang/evit, evit.py and
helpers.py) of Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers
via Token Reorganizations", ICLR 2022 (https://arxiv.org/abs/2202.07800). It takes a timm-keyed
state dict and shares no code with evit_deploy: explicit softmax attention in every block, the
complement of the kept indices computed the official way (scatter + sort, `complement_idx`), the
fused token as an explicit gather-multiply-sum, and the final LayerNorm over all tokens before
taking the class token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

EPS = 1e-6  # timm's ViT LayerNorm epsilon


@dataclass
class ReferenceResult:
    logits: torch.Tensor  # [B, num_classes]
    indices: list[torch.Tensor] = field(default_factory=list)  # TopK idx of each dropping block
    cls_attn: list[torch.Tensor] = field(default_factory=list)  # scores TopK ran on, same order
    drop_blocks: list[int] = field(default_factory=list)  # blocks that actually dropped tokens
    tokens_in: list[int] = field(default_factory=list)  # image tokens entering each block
    tokens_out: list[int] = field(default_factory=list)  # image tokens leaving each block
    patch_ids: list[torch.Tensor] = field(default_factory=list)  # original patch of each kept token


def complement_idx(idx: torch.Tensor, dim: int) -> torch.Tensor:
    """set(range(dim)) - set(idx) over the last axis, ascending (official helpers.py)."""
    a = torch.arange(dim, device=idx.device)
    ndim = idx.ndim
    dims = idx.shape
    n_idx = dims[-1]
    dims = dims[:-1] + (-1,)
    for _ in range(1, ndim):
        a = a.unsqueeze(0)
    a = a.expand(*dims)
    masked = torch.scatter(a, -1, idx, 0)
    compl, _ = torch.sort(masked, dim=-1, descending=False)
    compl = compl.permute(-1, *tuple(range(ndim - 1)))
    compl = compl[n_idx:].permute(*(tuple(range(1, ndim)) + (0,)))
    return compl


def _layer_norm(x, sd, prefix):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], EPS)


def _linear(x, sd, prefix):
    return F.linear(x, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])


@torch.no_grad()
def reference_forward(
    state_dict: dict[str, torch.Tensor],
    images: torch.Tensor,
    *,
    num_heads: int,
    keep_rate: float,
    drop_loc: tuple[int, ...],
    fuse_token: bool,
) -> ReferenceResult:
    """EViT inference with every block written out. `state_dict` must already match the input
    size (pos_embed with 1 + (H/16)^2 tokens)."""
    sd = {k: v.detach().float() for k, v in state_dict.items()}
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    patch = sd["patch_embed.proj.weight"].shape[-1]
    result = ReferenceResult(logits=torch.empty(0))

    # Patch embedding, class token, positions.
    x = F.conv2d(images.float(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=patch)
    x = x.flatten(2).transpose(1, 2)  # B, N, C
    B, num_patches, C = x.shape
    x = torch.cat((sd["cls_token"].expand(B, -1, -1), x), dim=1)
    x = x + sd["pos_embed"]
    # Original patch id of every image token (fused token made in the j-th drop: num_patches + j).
    ids = torch.arange(num_patches).unsqueeze(0).expand(B, -1)

    for i in range(depth):
        p = f"blocks.{i}"
        B, N, C = x.shape
        result.tokens_in.append(N - 1)
        # Attention (official Attention.forward).
        h = _layer_norm(x, sd, f"{p}.norm1")
        qkv = _linear(h, sd, f"{p}.attn.qkv").reshape(B, N, 3, num_heads, C // num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scale = (C // num_heads) ** -0.5
        attn = (q @ k.transpose(-2, -1)) * scale
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        out = _linear(out, sd, f"{p}.attn.proj")
        x = x + out

        # Token reorganization (official Attention.forward tail + Block.forward).
        block_keep = keep_rate if i in drop_loc else 1
        if block_keep < 1:
            left_tokens = math.ceil(block_keep * (N - 1))
            if left_tokens < N - 1:
                assert left_tokens >= 1
                cls_attn = attn[:, :, 0, 1:].mean(dim=1)  # [B, N-1]
                _, idx = torch.topk(cls_attn, left_tokens, dim=1, largest=True, sorted=True)
                index = idx.unsqueeze(-1).expand(-1, -1, C)
                non_cls = x[:, 1:]
                x_others = torch.gather(non_cls, dim=1, index=index)
                kept_ids = torch.gather(ids, 1, idx)
                if fuse_token:
                    compl = complement_idx(idx, N - 1)
                    non_topk = torch.gather(
                        non_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C)
                    )
                    non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)
                    extra_token = torch.sum(
                        non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True
                    )
                    x = torch.cat([x[:, 0:1], x_others, extra_token], dim=1)
                    fused_id = torch.full((B, 1), num_patches + len(result.indices))
                    ids = torch.cat([kept_ids, fused_id], dim=1)
                else:
                    x = torch.cat([x[:, 0:1], x_others], dim=1)
                    ids = kept_ids
                result.indices.append(idx)
                result.cls_attn.append(cls_attn)
                result.drop_blocks.append(i)
                result.patch_ids.append(kept_ids)

        # MLP on the (reduced) token set; exact erf GELU as in DeiT.
        h = _layer_norm(x, sd, f"{p}.norm2")
        h = _linear(F.gelu(_linear(h, sd, f"{p}.mlp.fc1")), sd, f"{p}.mlp.fc2")
        x = x + h
        result.tokens_out.append(x.shape[1] - 1)

    x = _layer_norm(x, sd, "norm")
    result.logits = _linear(x[:, 0], sd, "head")
    return result
