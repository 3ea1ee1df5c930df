"""Does FP16 change which tokens EViT keeps, and does computing the class-attention scores in FP32
(what `build-engine` does by default) help?

PyTorch, so it runs on CPU as well as on a GPU. Three ways to run the same weights on the same
images, compared with FP32: everything in FP16; FP16 with the Q.K^T product, softmax and head
mean of the drop blocks in FP32 (TensorRT's FP32-pinned score path); and the reference FP32.
Reported: per drop block, the share of images keeping the same set of patches, and top-1
agreement. Weights are seeded random with peaky class attention (init_random_weights).

    PYTHONPATH=. python benchmarks/fp16_topk_scores.py --device cuda --images 256
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch

from evit_deploy.model import EvitConfig, build_model
from evit_deploy.model.vit import EViT, kept_patch_ids


def attention(attn, h: torch.Tensor, scores_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's attention with explicit scores, optionally computed in FP32."""
    batch, tokens, dim = h.shape
    qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if scores_fp32:
        q, k = q.float(), k.float()
    probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return attn.proj(out), probs[:, :, 0, 1:].mean(dim=1)


def reorganize(x: torch.Tensor, scores: torch.Tensor, keep: int, fuse: bool):
    """EViT's token reorganization ranking `scores` in their own precision."""
    _, idx = torch.topk(scores, keep, dim=1, largest=True, sorted=True)
    image = x[:, 1:]
    kept = torch.gather(image, 1, idx.unsqueeze(-1).expand(-1, -1, image.shape[-1]))
    parts = [x[:, :1], kept]
    if fuse:
        weights = scores.scatter(1, idx, 0.0).to(x.dtype)
        parts.append(torch.bmm(weights.unsqueeze(1), image))
    return torch.cat(parts, dim=1), idx


@torch.inference_mode()
def forward(model: EViT, images: torch.Tensor, scores_fp32: bool):
    x = model.patch_embed(images)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    indices = []
    for block in model.blocks:
        if block.keep is None:
            x = block(x)[0]
            continue
        attn_out, scores = attention(block.attn, block.norm1(x), scores_fp32)
        x, idx = reorganize(x + attn_out, scores, block.keep, block.fuse_token)
        indices.append(idx)
        x = x + block.mlp(block.norm2(x))
    return model.head(model.norm(x[:, 0])), indices


def agreement(config: EvitConfig, reference, candidate) -> dict:
    ref_logits, ref_idx = reference
    logits, idx = candidate
    ref_kept = kept_patch_ids([i.cpu().numpy() for i in ref_idx], config.num_patches, config.fuse_token)
    kept = kept_patch_ids([i.cpu().numpy() for i in idx], config.num_patches, config.fuse_token)
    per_block = [
        float(np.mean([set(a) == set(b) for a, b in zip(r, c)])) for r, c in zip(ref_kept, kept)
    ]
    top1 = float((ref_logits.argmax(1) == logits.float().argmax(1)).float().mean())
    return {"kept_same": per_block, "top1_agreement": top1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--keep-rate", type=float, default=0.7)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="Write the results here.")
    args = parser.parse_args()
    started = time.perf_counter()
    config = EvitConfig(args.model, args.keep_rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are the point here
        model = build_model(config).to(args.device)
    images = torch.from_numpy(
        np.random.default_rng(0).standard_normal((args.images, 3, 224, 224), dtype=np.float32)
    )
    variants = {"fp32": (torch.float32, False), "fp16": (torch.float16, False), "fp16, fp32 scores": (torch.float16, True)}
    outputs = {}
    for name, (dtype, scores_fp32) in variants.items():
        model = model.to(dtype)
        runs = [
            forward(model, chunk.to(args.device, dtype), scores_fp32)
            for chunk in images.split(args.batch)
        ]
        logits = torch.cat([r[0].float().cpu() for r in runs])
        indices = [torch.cat([r[1][j].cpu() for r in runs]) for j in range(len(runs[0][1]))]
        outputs[name] = (logits, indices)
    results = {
        "model": config.model,
        "keep_rate": config.keep_rate,
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "images": args.images,
        "drop_blocks": [b.block for b in config.token_plan if b.keep is not None],
        "variants": {name: agreement(config, outputs["fp32"], outputs[name]) for name in ("fp16", "fp16, fp32 scores")},
        "seconds": time.perf_counter() - started,
    }
    print(f"{config.model} keep {config.keep_rate}, {args.images} random images on {results['device']}")
    print(f"{'variant':<20} kept-token sets equal to FP32 per drop block {results['drop_blocks']}   top-1 agreement")
    for name, row in results["variants"].items():
        blocks = "  ".join(f"{v:6.1%}" for v in row["kept_same"])
        print(f"{name:<20} {blocks:<48} {row['top1_agreement']:.1%}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
