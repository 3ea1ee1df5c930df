"""Train the shapes EViT that ships with evit-deploy: deit_tiny, EViT on during training.

The official EViT recipe, shrunk to a 2-core CPU: from scratch, keep rate 1.0 for a warm-up, then
a cosine shrink to the target keep rate (0.7 at blocks 3, 6, 9, fused token), AdamW with a linear
warm-up and cosine decay. Most steps run at low resolution (112 px: a quarter of the tokens, about
a third of the time per step); the last ones at 224 px, pos_embed resampled bicubically. Images
are generated on the fly by evit_deploy.data.shapes (seed 1 for training; held-out sets use other
seeds), never repeated.

    .venv/bin/python benchmarks/train_shapes.py --output build/shapes_train

Writes, in --output: log.jsonl (one line per logged step: loss, train accuracy, lr, keep rate,
resolution, held-out accuracy at the eval steps), last.pt (resumable with --resume), NAME.safetensors
(fp16 weights, timm keys; --name, default shapes_evit_tiny), labels.txt and MODEL_CARD.md.
`--init WEIGHTS` fine-tunes from a trained model instead of starting from scratch (the paper's
higher-resolution EViT; benchmarks/train_paper_claims.sh runs the whole comparison).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from evit_deploy.data.shapes import CLASSES, make_sample
from evit_deploy.model.checkpoint import read_state_dict, resample_pos_embed
from evit_deploy.model.config import IMAGENET_MEAN, IMAGENET_STD, EvitConfig, plan_tokens
from evit_deploy.model.vit import EViT

TRAIN_SEED = 1
HELDOUT_SEED = 3  # the held-out set of the card and the README: dataset shapes --seed 3
HELDOUT_COUNT = 2000
NO_DECAY = ("pos_embed", "cls_token")
EVAL_SEED = 2  # the running held-out check; the final numbers use other seeds (make_card.py)


@dataclass
class Recipe:
    model: str = "deit_tiny_patch16_224"
    keep_rate: float = 0.7
    drop_loc: tuple[int, ...] = (3, 6, 9)
    batch: int = 32
    # Progressive resizing: (input size, steps) in order. Shape is learnt far faster per second
    # at 112 px (measured); 160 and 224 px adapt the model to the final patch scale.
    phases: str = "112:5800,160:700,224:900"
    lr: float = 2.5e-4  # 5e-4 learnt shape slower than 2e-4 in 1100-step probes
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 300
    keep_warmup_steps: int = 600  # keep rate 1.0 until here
    keep_shrink_steps: int = 3000  # then cosine to keep_rate over this many steps
    clip_grad: float = 1.0
    seed: int = 0
    threads: int = 2

    @property
    def schedule(self) -> list[tuple[int, int]]:
        """[(img_size, steps)] from `phases`."""
        return [tuple(int(x) for x in part.split(":")) for part in self.phases.split(",")]

    @property
    def total_steps(self) -> int:
        return sum(steps for _, steps in self.schedule)

    def img_size_at(self, step: int) -> int:
        for size, steps in self.schedule:
            if step < steps:
                return size
            step -= steps
        return self.schedule[-1][0]


def keep_rate_at(recipe: Recipe, step: int) -> float:
    """1.0 during the keep warm-up, then the official cosine shrink to the target (at once when
    keep_shrink_steps is 0: a fine-tune of a model already trained with EViT)."""
    if step < recipe.keep_warmup_steps:
        return 1.0
    if recipe.keep_shrink_steps <= 0:
        return recipe.keep_rate
    t = min(1.0, (step - recipe.keep_warmup_steps) / recipe.keep_shrink_steps)
    return recipe.keep_rate + (1 - recipe.keep_rate) * 0.5 * (1 + math.cos(math.pi * t))


def lr_at(recipe: Recipe, step: int) -> float:
    """Linear warm-up, then one cosine decay over the whole run (all phases)."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / (recipe.total_steps - recipe.warmup_steps)
    return recipe.min_lr + (recipe.lr - recipe.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def set_keep_rate(model: EViT, keep_rate: float) -> None:
    """Change the blocks' TopK K in place (the schedule changes it while training)."""
    config = model.config
    plan = plan_tokens(
        config.num_patches, config.arch.depth, keep_rate, config.drop_loc, config.fuse_token
    )
    for block, tokens in zip(model.blocks, plan):
        block.keep = tokens.keep


def init_weights(model: EViT, seed: int) -> None:
    """timm's ViT init: truncated normal(0.02) weights, zero biases, unit LayerNorm."""
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(param)
        elif param.ndim == 1:
            torch.nn.init.ones_(param)
        elif name == "cls_token":
            torch.nn.init.normal_(param, std=1e-6)
        else:
            torch.nn.init.trunc_normal_(param, std=0.02)


class ShapesStream(torch.utils.data.Dataset):
    """Sample i of the seed, normalised; index -> image, so workers need no shared state."""

    def __init__(self, seed: int, img_size: int, length: int):
        self.seed, self.img_size, self.length = seed, img_size, length
        self.mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(3, 1, 1) * 255
        self.std = np.asarray(IMAGENET_STD, np.float32).reshape(3, 1, 1) * 255

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        sample = make_sample(self.seed, index, self.img_size)
        chw = sample.image.transpose(2, 0, 1).astype(np.float32)
        return torch.from_numpy((chw - self.mean) / self.std), sample.label


def resize_model(model: EViT, img_size: int) -> EViT:
    """The same weights at another input size (pos_embed resampled)."""
    config = EvitConfig(
        model.config.model, model.config.keep_rate, model.config.drop_loc,
        model.config.fuse_token, img_size, model.config.num_classes,
    )
    resized = EViT(config)
    state = model.state_dict()
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], config.num_patches)
    resized.load_state_dict(state)
    return resized


@torch.no_grad()
def accuracy(model: EViT, seed: int, img_size: int, count: int, keep_rate: float) -> float:
    model.eval()
    set_keep_rate(model, keep_rate)
    data = ShapesStream(seed, img_size, count)
    correct = 0
    for start in range(0, count, 100):
        items = [data[i] for i in range(start, min(count, start + 100))]
        images = torch.stack([x for x, _ in items])
        labels = torch.tensor([y for _, y in items])
        correct += int((model(images).argmax(1) == labels).sum())
    model.train()
    return correct / count


def save_weights(model: EViT, path: Path, recipe: Recipe) -> None:
    """fp16 storage (half the size; loading upcasts), with the input transform the model was
    trained with in the header, where evit-deploy reads it (model/checkpoint.py)."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "recipe": json.dumps(asdict(recipe)),
        "mean": json.dumps(list(IMAGENET_MEAN)),
        "std": json.dumps(list(IMAGENET_STD)),
        "crop_pct": "1.0",
        "interpolation": "bicubic",
    }
    save_file(state, str(path), metadata=metadata)
    (path.parent / "labels.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("build/shapes_train"))
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-count", type=int, default=400)
    parser.add_argument("--name", default="shapes_evit_tiny", help="stem of the weights file")
    parser.add_argument("--init", type=Path, help="start from these weights (a fine-tune)")
    parser.add_argument("--stop-after", type=int, metavar="STEPS",
                        help="checkpoint and stop after this many steps of this run (continue with --resume)")
    for name, value in asdict(Recipe()).items():
        if not isinstance(value, tuple):
            parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args()
    recipe = Recipe(**{k: getattr(args, k) for k in asdict(Recipe()) if hasattr(args, k)})
    torch.set_num_threads(recipe.threads)
    args.output.mkdir(parents=True, exist_ok=True)

    config = EvitConfig(
        recipe.model, recipe.keep_rate, recipe.drop_loc, True, recipe.img_size_at(0), len(CLASSES)
    )
    model = EViT(config)
    init_weights(model, recipe.seed)
    if args.init is not None:
        state = read_state_dict(args.init)
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], config.num_patches)
        model.load_state_dict({k: v.float() for k, v in state.items()})
    optimizer = make_optimizer(model, recipe)
    step, elapsed = 0, 0.0
    last = args.output / "last.pt"
    if args.resume and last.exists():
        saved = torch.load(last, weights_only=True)
        if saved["img_size"] != config.img_size:
            model = resize_model(model, saved["img_size"])
            optimizer = make_optimizer(model, recipe)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step, elapsed = saved["step"], saved["elapsed"]
    log_path = args.output / "log.jsonl"
    if log_path.exists():  # the steps after the checkpoint run again: drop their first lines
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        log_path.write_text("".join(line + "\n" for line in kept))
    log = log_path.open("a")
    model.train()
    loader = None
    window = []
    started = time.perf_counter() - elapsed
    stop_at = recipe.total_steps if args.stop_after is None else min(recipe.total_steps, step + args.stop_after)

    def checkpoint(elapsed_s: float) -> None:
        saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "elapsed": elapsed_s, "img_size": model.config.img_size}
        torch.save(saved, last.with_suffix(".tmp"))
        last.with_suffix(".tmp").replace(last)  # a restart mid-write keeps the previous checkpoint

    while step < stop_at:
        img_size = recipe.img_size_at(step)
        if model.config.img_size != img_size:
            model = resize_model(model, img_size).train()
            optimizer = make_optimizer(model, recipe, optimizer)
            loader = None
        if loader is None:
            # Sample indices continue across resolutions and resumes: no image is seen twice.
            data = ShapesStream(TRAIN_SEED, img_size, 10**9)
            sampler = range(step * recipe.batch, 10**9)
            loader = iter(torch.utils.data.DataLoader(
                data, batch_size=recipe.batch, sampler=sampler, num_workers=1, prefetch_factor=4,
                persistent_workers=False,
            ))
        images, labels = next(loader)
        keep_rate = keep_rate_at(recipe, step)
        set_keep_rate(model, keep_rate)
        lr = lr_at(recipe, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad)
        optimizer.step()
        step += 1
        window.append((loss.item(), (logits.argmax(1) == labels).float().mean().item()))
        if step % 50 == 0 or step == recipe.total_steps:
            losses, accs = zip(*window)
            entry = {
                "step": step, "img_size": img_size, "keep_rate": round(keep_rate, 4), "lr": lr,
                "loss": float(np.mean(losses)), "train_acc": float(np.mean(accs)),
                "elapsed_s": round(time.perf_counter() - started, 1),
            }
            window = []
            if step % args.eval_every == 0 or step == recipe.total_steps:
                entry["heldout_acc"] = accuracy(model, EVAL_SEED, img_size, args.eval_count, recipe.keep_rate)
                set_keep_rate(model, keep_rate)
                checkpoint(entry["elapsed_s"])
            log.write(json.dumps(entry) + "\n")
            log.flush()
            print(json.dumps(entry), flush=True)
    if step < recipe.total_steps:
        checkpoint(round(time.perf_counter() - started, 1))
        print(f"stopped at step {step} of {recipe.total_steps}: continue with --resume", flush=True)
        return
    set_keep_rate(model, recipe.keep_rate)
    weights = args.output / f"{args.name}.safetensors"
    save_weights(model, weights, recipe)
    wall_s = time.perf_counter() - started
    write_card(weights, recipe, step, wall_s, args.init)


def write_card(
    weights: Path, recipe: Recipe, steps: int, wall_s: float, init: Path | None = None
) -> None:
    """MODEL_CARD.md beside the weights: recipe, seeds, steps, wall time, held-out accuracy of the
    saved (fp16) weights at the final input size, sha256."""
    import hashlib

    from evit_deploy.model.checkpoint import build_model

    img_size = recipe.schedule[-1][0]
    reloaded = build_model(
        EvitConfig(recipe.model, recipe.keep_rate, recipe.drop_loc, True, img_size, len(CLASSES)),
        weights,
    )
    top1 = accuracy(reloaded, HELDOUT_SEED, img_size, HELDOUT_COUNT, recipe.keep_rate)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    evit = recipe.keep_rate < 1
    kind = (
        f"EViT keep rate {recipe.keep_rate}, drop blocks {','.join(map(str, recipe.drop_loc))}, "
        "fused token" if evit else "plain ViT (keep rate 1.0 throughout: no token is dropped)"
    )
    start = (
        f"fine-tuned from `{init.name}` (its card gives how that was trained)" if init else
        "from scratch"
    )
    schedule = (
        f"keep rate 1.0 for the first {recipe.keep_warmup_steps} steps, then the official cosine "
        f"shrink to {recipe.keep_rate} over {recipe.keep_shrink_steps} steps"
        if evit and recipe.keep_shrink_steps > 0 else f"keep rate {recipe.keep_rate} throughout"
    )
    lines = [
        f"# {weights.stem}: a deit_tiny {'EViT' if evit else 'plain ViT'} trained on the generated "
        "shapes dataset",
        "",
        f"- Architecture: {recipe.model} (5.5 M parameters), {kind}; {len(CLASSES)} classes "
        f"({', '.join(CLASSES)}), names in labels.txt.",
        f"- Input: the generated {img_size} px images as they are (crop_pct 1.0, no resize), "
        "ImageNet mean/std; recorded in the safetensors metadata, so every export carries it.",
        f"- Held-out top-1 at keep {recipe.keep_rate}: **{top1:.2%}** on {HELDOUT_COUNT} images "
        f"(`evit-deploy dataset shapes --count {HELDOUT_COUNT} --seed {HELDOUT_SEED} --img-size "
        f"{img_size}`), measured on these fp16-stored weights (loaded as fp32).",
        f"- Training: {start}, {steps} steps of batch {recipe.batch} ({steps * recipe.batch:,} "
        f"images generated on the fly, seed {TRAIN_SEED}), {wall_s / 60:.0f} min wall time on the "
        "project's 2-core CPU (other jobs shared it).",
        f"- Recipe (`benchmarks/train_shapes.py`): {json.dumps(asdict(recipe))}",
        f"- Schedule: {schedule}; AdamW, lr {recipe.lr:g} after a {recipe.warmup_steps}-step "
        f"warm-up, one cosine decay to {recipe.min_lr:g}; input size "
        + ", then ".join(f"{size} px for {steps} steps" for size, steps in recipe.schedule)
        + " (pos_embed resampled bicubically at each change).",
        "- Training curve: `log.jsonl` of the run (the shipped copy beside these weights).",
        f"- sha256 of {weights.name}: `{digest}`",
        "",
    ]
    (weights.parent / "MODEL_CARD.md").write_text("\n".join(lines), encoding="utf-8")


def make_optimizer(model: EViT, recipe: Recipe, old: torch.optim.Optimizer | None = None):
    """AdamW without weight decay on biases, norms, pos_embed and cls_token. Given the optimizer of
    the same model at another resolution, its state carries over (pos_embed's moments restart:
    their shape changed)."""
    names = [n for n, p in model.named_parameters()]
    decayed = [n for n, p in model.named_parameters() if p.ndim > 1 and n not in NO_DECAY]
    plain = [n for n in names if n not in decayed]
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [params[n] for n in decayed], "weight_decay": recipe.weight_decay},
            {"params": [params[n] for n in plain], "weight_decay": 0.0},
        ],
        lr=recipe.lr,
    )
    if old is not None:
        state = old.state_dict()
        pos_index = (decayed + plain).index("pos_embed")
        state["state"].pop(pos_index, None)
        optimizer.load_state_dict(state)
    return optimizer


if __name__ == "__main__":
    main()
