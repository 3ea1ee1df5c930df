"""Prove an exported graph is the same function as the PyTorch model (Polygraphy-style).

ONNX Runtime and PyTorch run the same inputs at a batch size other than the traced one: seeded
random tensors and a natural photograph. Compared: logits (max abs diff relative to the logits'
scale), top-1 class, and the tokens every drop block keeps, read from the TopK indices that the
check exposes as extra graph outputs (the shipped graph keeps its single output). Kept tokens are
compared as sets of original patches: the order among kept tokens does not change the function.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import ImageOps

from evit_deploy.errors import EvitDeployError
from evit_deploy.metadata import INPUT_NAME, OUTPUT_NAME
from evit_deploy.model.config import EvitConfig
from evit_deploy.model.vit import EViT, kept_patch_ids
from evit_deploy.preprocess import SAMPLE_IMAGE, image_files, load_image, preprocess

REL_TOLERANCE = 1e-4  # max |onnx - torch| <= REL_TOLERANCE * max |torch logits|
NEAR_TIE_GAP = 1e-4  # relative gap between the K-th and (K+1)-th class attention at the boundary
VALIDATION_BATCH = 3
DIR_CHUNK = 50  # --validate-dir images per comparison run


@dataclass(frozen=True)
class CaseResult:
    """One input set compared. A kept-token difference is excused only where the reference itself
    was a near-tie at the keep boundary (fp32 noise can flip it); such images are counted in
    `near_ties` and left out of the logit comparison, since different tokens give other logits."""

    name: str
    batch: int
    max_abs_diff: float
    logit_scale: float
    top1_agreement: float
    kept_agreement: float  # (image, drop block) pairs keeping the same patches
    order_agreement: float  # ... with the indices identical, order included
    near_ties: int = 0
    unexplained: int = 0  # images whose kept tokens differ without a near-tie
    compared: int = -1  # images in the logit comparison (all but excused near-ties); -1: batch

    @property
    def images_compared(self) -> int:
        return self.batch if self.compared < 0 else self.compared

    @property
    def tolerance(self) -> float:
        return REL_TOLERANCE * self.logit_scale

    @property
    def passed(self) -> bool:
        return (
            self.unexplained == 0
            and self.near_ties < self.batch
            and self.max_abs_diff <= self.tolerance
            and self.top1_agreement == 1.0
        )


@dataclass(frozen=True)
class ValidationReport:
    cases: list[CaseResult]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    def failure_summary(self) -> str:
        return "; ".join(
            f"{c.name}: max abs diff {c.max_abs_diff:.3g} (tolerance {c.tolerance:.3g}), "
            f"top-1 agreement {c.top1_agreement:.0%}, kept-token agreement {c.kept_agreement:.0%}"
            f" ({c.unexplained} image(s) differ without a near-tie)"
            for c in self.cases
            if not c.passed
        )

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "rel_tolerance": REL_TOLERANCE,
            "near_tie_gap": NEAR_TIE_GAP,
            "cases": [
                {**c.__dict__, "tolerance": c.tolerance, "passed": c.passed} for c in self.cases
            ],
        }


def merge_cases(name: str, parts: list[CaseResult]) -> CaseResult:
    """One row for an input set that was compared in chunks: maxima of the differences,
    agreements weighted by the images each chunk compared."""
    batch = sum(p.batch for p in parts)
    compared = sum(p.images_compared for p in parts)
    return CaseResult(
        name=name,
        batch=batch,
        max_abs_diff=max(p.max_abs_diff for p in parts),
        logit_scale=max(p.logit_scale for p in parts),
        top1_agreement=sum(p.top1_agreement * p.images_compared for p in parts) / compared
        if compared else 1.0,
        kept_agreement=sum(p.kept_agreement * p.batch for p in parts) / batch,
        order_agreement=sum(p.order_agreement * p.batch for p in parts) / batch,
        near_ties=sum(p.near_ties for p in parts),
        unexplained=sum(p.unexplained for p in parts),
        compared=compared,
    )


def expose_topk_indices(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of the graph that also outputs each TopK's indices (graph order = block order)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    outputs = {o.name for o in exposed.graph.output}
    names = []
    for node in exposed.graph.node:
        if node.op_type == "TopK":
            name = node.output[1]
            names.append(name)
            if name not in outputs:
                exposed.graph.output.append(
                    onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None)
                )
    return exposed, names


def validation_inputs(
    model: EViT, batch: int = VALIDATION_BATCH, validate_dir: str | Path | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, input batch) pairs: seeded random tensors and a photograph with mirrored and
    close-up views, `batch` each; then every image under validate_dir in chunks (one name)."""
    img_size = model.config.img_size
    transform = model.preprocessing.to_dict()
    rng = np.random.default_rng(0)
    photo = load_image(SAMPLE_IMAGE)
    width, height = photo.size
    close_up = photo.crop((width // 5, height // 5, width - width // 5, height - height // 5))
    views = [photo, ImageOps.mirror(photo), close_up, ImageOps.mirror(close_up)]
    yield "random", rng.standard_normal((batch, 3, img_size, img_size), dtype=np.float32)
    yield "natural image", preprocess(views[:batch], img_size, **transform)
    if validate_dir is not None:
        files = image_files(validate_dir)
        name = f"{Path(validate_dir).name}/ ({len(files)} images)"
        for start in range(0, len(files), DIR_CHUNK):
            yield name, preprocess(files[start : start + DIR_CHUNK], img_size, **transform)


def reference_outputs(model: EViT, images: np.ndarray) -> ReferenceOutputs:
    """PyTorch logits, TopK indices, and each drop block's class-attention scores (via hooks)."""
    scores: list[torch.Tensor] = []
    hooks = [
        block.attn.register_forward_hook(lambda _m, _i, out: scores.append(out[1]))
        for block in model.blocks
        if block.keep is not None
    ]
    try:
        with torch.no_grad():
            logits, indices = model(torch.from_numpy(images), return_token_indices=True)
    finally:
        for hook in hooks:
            hook.remove()
    return ReferenceOutputs(
        logits.numpy(), [i.numpy() for i in indices], [s.numpy() for s in scores]
    )


@dataclass(frozen=True)
class ReferenceOutputs:
    logits: np.ndarray
    indices: list[np.ndarray]
    scores: list[np.ndarray]


def validate_onnx(
    model: EViT,
    onnx_model: bytes,
    batch: int = VALIDATION_BATCH,
    validate_dir: str | Path | None = None,
) -> ValidationReport:
    """Run the export and the model on the validation inputs (validation_inputs) and compare."""
    import onnxruntime as ort

    exposed, index_names = expose_topk_indices(onnx.load_from_string(onnx_model))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        exposed.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    parts: dict[str, list[CaseResult]] = {}
    for name, images in validation_inputs(model, batch, validate_dir):
        ref = reference_outputs(model, images)
        got_logits, *got_indices = session.run([OUTPUT_NAME, *index_names], {INPUT_NAME: images})
        parts.setdefault(name, []).append(
            compare(name, ref, got_logits, got_indices, model.config)
        )
    return ValidationReport(
        [chunks[0] if len(chunks) == 1 else merge_cases(name, chunks) for name, chunks in parts.items()]
    )


def is_near_tie(scores: np.ndarray, keep: int) -> bool:
    """Whether the K-th and (K+1)-th largest scores are within NEAR_TIE_GAP of each other."""
    top = np.sort(scores)[::-1]
    return bool(top[keep - 1] - top[keep] <= NEAR_TIE_GAP * abs(top[keep - 1]))


def compare(
    name: str,
    ref: ReferenceOutputs,
    got_logits: np.ndarray,
    got_indices: list[np.ndarray],
    config: EvitConfig,
) -> CaseResult:
    """Compare one backend's outputs with the PyTorch reference."""
    batch = ref.logits.shape[0]
    if len(got_indices) != len(ref.indices):
        raise EvitDeployError(
            f"the exported graph has {len(got_indices)} TopK nodes, the model {len(ref.indices)}"
        )
    ref_ids = kept_patch_ids(ref.indices, config.num_patches, config.fuse_token)
    got_ids = kept_patch_ids(got_indices, config.num_patches, config.fuse_token)
    same_set = np.ones((batch, len(ref_ids)), dtype=bool)
    same_order = np.ones_like(same_set)
    near_tie = np.zeros(batch, dtype=bool)
    for j, (r, g) in enumerate(zip(ref_ids, got_ids)):
        for i in range(batch):
            same_order[i, j] = np.array_equal(ref.indices[j][i], got_indices[j][i])
            same_set[i, j] = np.array_equal(np.sort(r[i]), np.sort(g[i]))
            # Only the first differing block can be judged: later ones see other tokens.
            if not same_set[i, j] and same_set[i, :j].all():
                near_tie[i] = is_near_tie(ref.scores[j][i], r.shape[1])
    differs = ~same_set.all(axis=1)
    compared = ~differs | ~near_tie
    diff = np.abs(ref.logits[compared] - got_logits[compared])
    return CaseResult(
        name=name,
        batch=batch,
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        logit_scale=float(np.max(np.abs(ref.logits))),
        top1_agreement=float(
            np.mean(ref.logits[compared].argmax(1) == got_logits[compared].argmax(1))
        ) if compared.any() else 1.0,
        kept_agreement=float(same_set.mean()) if same_set.size else 1.0,
        order_agreement=float(same_order.mean()) if same_order.size else 1.0,
        near_ties=int((differs & near_tie).sum()),
        unexplained=int((differs & ~near_tie).sum()),
    )
