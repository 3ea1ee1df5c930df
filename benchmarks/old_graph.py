"""The EViT graph from before the fusion-friendly export (commit 4a2cac2), for benchmarks only.

Its drop blocks compute softmax(QK^T) explicitly and read its class row (the official code's form,
which keeps runtimes from fusing those blocks' attention), and the kept tokens come from
torch.gather with an index broadcast to [B, K, C] (Expand + GatherElements). It is the same
function as the package's graph; export_onnx validates it against the patched PyTorch model as
usual. A plain ViT has no drop block, so its graph is the same in both.

    PYTHONPATH=. python benchmarks/old_graph.py [--model deit_small_patch16_224] [--keep-rate 0.7]
        [--with-token-indices] -o build/old_evit.onnx
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import warnings

import onnx
import torch
import torch.nn.functional as F

from evit_deploy.export import export_onnx
from evit_deploy.model import EvitConfig, build_model, vit


@contextlib.contextmanager
def old_graph():
    """Inside, every EViT runs (and so exports) as the graph before the fusion-friendly one."""
    forward, gather = vit.Attention.forward, vit.gather_tokens
    vit.Attention.forward, vit.gather_tokens = explicit_attention, broadcast_gather
    try:
        yield
    finally:
        vit.Attention.forward, vit.gather_tokens = forward, gather


def explicit_attention(self, x: torch.Tensor, need_cls_attn: bool):
    """Attention.forward before 4a2cac2: fused SDPA only where no class attention is needed."""
    batch, tokens, dim = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if need_cls_attn:
        attn = ((q @ k.transpose(-2, -1)) * self.class_attention.scale).softmax(dim=-1)
        out, cls_attn = attn @ v, attn[:, :, 0, 1:].mean(dim=1)
    else:
        out, cls_attn = F.scaled_dot_product_attention(q, k, v), None
    return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim)), cls_attn


def broadcast_gather(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """gather_tokens before 4a2cac2: the index broadcast over the channels."""
    return torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--keep-rate", type=float, default=0.7)
    parser.add_argument("--with-token-indices", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="random weights (the package's baselines use 0)")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights are intended: speed only
        model = build_model(EvitConfig(args.model, args.keep_rate), seed=args.seed)
    with old_graph():
        export_onnx(model, args.output, force=True, with_token_indices=args.with_token_indices)
    ops = collections.Counter(node.op_type for node in onnx.load(args.output, load_external_data=False).graph.node)
    print(f"wrote {args.output}: " + ", ".join(f"{op} {ops[op]}" for op in ("Softmax", "MatMul", "GatherElements", "Gather", "Expand")))


if __name__ == "__main__":
    main()
