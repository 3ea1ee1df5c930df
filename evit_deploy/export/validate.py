"""Prove an artifact is the same function as the FP32 model (Polygraphy-style).

A candidate (the exported graph on ONNX Runtime, a reduced-precision graph, another runtime) and
the FP32 reference run the same inputs at a batch size other than the traced one: seeded random
tensors, a natural photograph, and optionally a folder of held-out images. Compared: logits (max
abs diff relative to the logits' scale), top-1 class, and the tokens every drop block keeps, read
from the TopK indices (exposed as extra outputs for the check; the shipped graph keeps its single
output). Kept tokens are compared as sets of original patches: their order does not change the
function.

FP32 must match within REL_TOLERANCE, top-1 included, with the same kept tokens everywhere (a
difference is excused only at a genuine near-tie of the reference). A reduced precision cannot
match bit for bit, so it is judged by what changes (GATES, one table for every reduced precision)
on the held-out folder's row: the answers (top-1 agreement, and the accuracy drop where the images'
classes are known), the kept tokens (the mean share of FP32's kept patches still kept, at the first
and at every drop block) and, where the folder has objects.json, the object patches kept. The share
of images keeping exactly FP32's patches is reported, not gated: one boundary patch swapping with a
near-equal neighbour changes the set, not the answer. Other rows are reported, not gated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from PIL import ImageOps

from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.metadata import INPUT_NAME, OUTPUT_NAME, ArtifactMetadata
from evit_deploy.model.config import EvitConfig
from evit_deploy.model.vit import kept_patch_ids
from evit_deploy.data.objects import object_patches_of, patch_recall, square_side
from evit_deploy.data.samples import find_images, find_samples
from evit_deploy.preprocess import SAMPLE_IMAGE, load_image, preprocess
from evit_deploy.precisions import BF16, FP16, FP32, INT8
from evit_deploy.stats import share_text

REL_TOLERANCE = 1e-4  # FP32: max |candidate - reference| <= REL_TOLERANCE * max |reference|
NEAR_TIE_GAP = 1e-4  # relative gap between the K-th and (K+1)-th class attention at the boundary
VALIDATION_BATCH = 3
DIR_CHUNK = 50  # --validate-dir images per comparison run


@dataclass(frozen=True)
class Gates:
    """What a reduced precision must show against FP32 on held-out images."""

    precision: str
    min_top1_agreement: float = 0.995
    max_accuracy_drop: float = 0.3  # top-1 points; gated where the images' classes are known
    min_first_overlap: float = 0.99  # mean share of FP32's kept patches kept, first drop block
    min_overlap: float = 0.95  # ... at every drop block
    max_recall_drop: float = 1.0  # object recall points per drop block; where objects.json is

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"top-1 agreement >= {self.min_top1_agreement:.1%}, accuracy drop <= "
            f"{self.max_accuracy_drop:g} points (known classes), kept-token overlap >= "
            f"{self.min_first_overlap:.0%} at the first drop block and >= {self.min_overlap:.0%} at "
            f"every one, object recall <= {self.max_recall_drop:g} point(s) below FP32's (objects.json)"
        )


GATES = {precision: Gates(precision) for precision in (FP16, BF16, INT8)}


def gates_for(precision: str) -> Gates:
    """The gates a candidate in `precision` is judged by. FP32 on a runtime other than the
    reference's (`optimize`) has other arithmetic too, so it is held to the same gates."""
    return GATES.get(precision) or Gates(precision)


@dataclass(frozen=True)
class Outputs:
    """What one run of a model gives the comparison."""

    logits: np.ndarray
    indices: list[np.ndarray]  # each drop block's TopK indices [B, K]
    scores: list[np.ndarray] | None = None  # each drop block's class attention [B, N] (PyTorch)


Runner = Callable[[np.ndarray], Outputs]


@dataclass(frozen=True)
class CaseResult:
    """One input set compared. FP32: a kept-token difference is excused only where the reference
    itself was a near-tie at the keep boundary (fp32 noise can flip it); such images are counted
    in `near_ties` and left out of the logit comparison, since different tokens give other
    logits. Reduced precision (`gates`): judged by the gates where `gated`, else reported."""

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
    kept_identical: tuple[float, ...] = ()  # per drop block: images keeping the same patches
    kept_overlap: tuple[float, ...] = ()  # per drop block: mean share of its kept patches also kept
    accuracy: float | None = None  # the candidate's top-1 where the images' classes are known
    reference_accuracy: float | None = None
    object_recall: tuple[float, ...] = ()  # per drop block, where the images' objects are known
    reference_object_recall: tuple[float, ...] = ()
    gates: Gates | None = None  # None: FP32
    gated: bool = True

    @property
    def images_compared(self) -> int:
        return self.batch if self.compared < 0 else self.compared

    @property
    def tolerance(self) -> float:
        return REL_TOLERANCE * self.logit_scale

    @property
    def accuracy_drop(self) -> float | None:
        """Top-1 points lost against the reference (positive: worse)."""
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return 100 * (self.reference_accuracy - self.accuracy)

    def missed_gates(self) -> list[str]:
        """What this row misses, in words; empty when it passes."""
        if self.gates is None:
            missed = []
            if self.max_abs_diff > self.tolerance:
                missed.append(f"max abs diff {self.max_abs_diff:.3g} > tolerance {self.tolerance:.3g}")
            if self.top1_agreement < 1.0:
                missed.append(f"top-1 agreement {self.top1_agreement:.1%}")
            if self.unexplained:
                missed.append(f"{self.unexplained} image(s) keep other tokens without a near-tie")
            if self.near_ties >= self.batch:
                missed.append("every image is a near-tie: nothing left to compare")
            return missed
        if not self.gated:
            return []
        g = self.gates
        missed = []
        if self.top1_agreement < g.min_top1_agreement:
            missed.append(f"top-1 agreement {share_text(self.top1_agreement)} < {g.min_top1_agreement:.1%}")
        drop = self.accuracy_drop
        if drop is not None and drop > g.max_accuracy_drop:
            missed.append(f"accuracy drop {drop:.2f} points > {g.max_accuracy_drop:g}")
        if self.kept_overlap and self.kept_overlap[0] < g.min_first_overlap:
            missed.append(
                f"kept-token overlap {share_text(self.kept_overlap[0])} at the first drop block "
                f"< {g.min_first_overlap:.0%}"
            )
        low = [j for j, share in enumerate(self.kept_overlap) if share < g.min_overlap]
        if low:
            missed.append(
                "kept-token overlap "
                + ", ".join(f"{share_text(self.kept_overlap[j])} at drop block {j + 1}" for j in low)
                + f" < {g.min_overlap:.0%}"
            )
        for j, drop in enumerate(self.recall_drops):
            if drop > g.max_recall_drop:
                missed.append(f"object recall {drop:.2f} points below FP32's at drop block {j + 1} > {g.max_recall_drop:g}")
        return missed

    @property
    def recall_drops(self) -> list[float]:
        """Object recall points lost against the reference, per drop block ([] where unknown)."""
        return [100 * (r - c) for r, c in zip(self.reference_object_recall, self.object_recall)]

    @property
    def passed(self) -> bool:
        return not self.missed_gates()


class ValidationFailed(EvitDeployError):
    """An artifact missed its precision gates, so nothing was written. Carries the report, so the
    CLI can print the table before the one-line error."""

    def __init__(self, message: str, report: "ValidationReport"):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ValidationReport:
    cases: list[CaseResult]
    precision: str = FP32
    gates: Gates | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    def record(self, validate_dir: str | Path | None = None) -> dict:
        """What an artifact's metadata keeps of its validation: the gates (or FP32's rules) it was
        held to, whether it passed and what it missed, and the held-out row's numbers."""
        held_out = next((c for c in self.cases if c.gated), None)
        rules = self.gates.to_dict() if self.gates else {"rel_tolerance": REL_TOLERANCE, "near_tie_gap": NEAR_TIE_GAP}
        return {
            "precision": self.precision,
            "gates": rules,
            "passed": self.passed,
            "missed": [f"{c.name}: {m}" for c in self.cases for m in c.missed_gates()],
            "validate_dir": str(Path(validate_dir).resolve()) if validate_dir else None,
            "held_out": None if held_out is None else {
                "images": held_out.batch,
                "top1_agreement": held_out.top1_agreement,
                "accuracy": held_out.accuracy,
                "reference_accuracy": held_out.reference_accuracy,
                "kept_overlap": list(held_out.kept_overlap),
                "kept_identical": list(held_out.kept_identical),
                "object_recall": list(held_out.object_recall),
                "reference_object_recall": list(held_out.reference_object_recall),
            },
        }

    def failure_summary(self) -> str:
        return "; ".join(f"{c.name}: {', '.join(c.missed_gates())}" for c in self.cases if not c.passed)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "precision": self.precision,
            "gates": self.gates.to_dict() if self.gates else None,
            "rel_tolerance": REL_TOLERANCE,
            "near_tie_gap": NEAR_TIE_GAP,
            "cases": [
                {
                    **{k: v for k, v in c.__dict__.items() if k != "gates"},
                    "kept_identical": list(c.kept_identical),
                    "kept_overlap": list(c.kept_overlap),
                    "object_recall": list(c.object_recall),
                    "reference_object_recall": list(c.reference_object_recall),
                    "tolerance": c.tolerance,
                    "accuracy_drop": c.accuracy_drop,
                    "passed": c.passed,
                    "missed": c.missed_gates(),
                }
                for c in self.cases
            ],
        }


def merge_cases(name: str, parts: list[CaseResult]) -> CaseResult:
    """One row for an input set that was compared in chunks: maxima of the differences,
    agreements weighted by the images each chunk compared."""
    batch = sum(p.batch for p in parts)
    compared = sum(p.images_compared for p in parts)

    def mean(values: list[float | None], weights: list[int]) -> float | None:
        if any(v is None for v in values):
            return None
        return sum(v * w for v, w in zip(values, weights)) / sum(weights)

    sizes = [p.batch for p in parts]
    return CaseResult(
        name=name,
        batch=batch,
        max_abs_diff=max(p.max_abs_diff for p in parts),
        logit_scale=max(p.logit_scale for p in parts),
        top1_agreement=sum(p.top1_agreement * p.images_compared for p in parts) / compared
        if compared else 1.0,
        kept_agreement=mean([p.kept_agreement for p in parts], sizes),
        order_agreement=mean([p.order_agreement for p in parts], sizes),
        near_ties=sum(p.near_ties for p in parts),
        unexplained=sum(p.unexplained for p in parts),
        compared=compared,
        kept_identical=tuple(
            mean([p.kept_identical[j] for p in parts], sizes)
            for j in range(len(parts[0].kept_identical))
        ),
        kept_overlap=tuple(
            mean([p.kept_overlap[j] for p in parts], sizes)
            for j in range(len(parts[0].kept_overlap))
        ),
        accuracy=mean([p.accuracy for p in parts], sizes),
        reference_accuracy=mean([p.reference_accuracy for p in parts], sizes),
        object_recall=tuple(
            mean([p.object_recall[j] for p in parts], sizes) for j in range(len(parts[0].object_recall))
        ) if all(p.object_recall for p in parts) else (),
        reference_object_recall=tuple(
            mean([p.reference_object_recall[j] for p in parts], sizes)
            for j in range(len(parts[0].reference_object_recall))
        ) if all(p.reference_object_recall for p in parts) else (),
        gates=parts[0].gates,
        gated=parts[0].gated,
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


@dataclass(frozen=True)
class InputSet:
    name: str
    images: np.ndarray
    labels: np.ndarray | None = None  # class ids, where known
    objects: list[list[int]] | None = None  # each image's object patches, where known
    held_out: bool = False  # the --validate-dir row: where reduced precisions are gated


def validation_inputs(
    meta: ArtifactMetadata,
    batch: int = VALIDATION_BATCH,
    validate_dir: str | Path | None = None,
    held_out: tuple[list[Path], np.ndarray | None] | None = None,
) -> Iterator[InputSet]:
    """Seeded random tensors and a photograph with mirrored and close-up views, `batch` each;
    then every image under validate_dir in chunks (one name), with their classes where the
    folders name the model's classes (or are ImageNet WordNet ids, or one per class; `held_out`
    where labelled_images found them already), and their object patches where the folder's
    objects.json lists them for this model's patch grid."""
    img_size = meta.img_size
    transform = {k: getattr(meta, k) for k in ("mean", "std", "crop_pct", "interpolation")}
    rng = np.random.default_rng(0)
    photo = load_image(SAMPLE_IMAGE)
    width, height = photo.size
    close_up = photo.crop((width // 5, height // 5, width - width // 5, height - height // 5))
    views = [photo, ImageOps.mirror(photo), close_up, ImageOps.mirror(close_up)]
    yield InputSet("random", rng.standard_normal((batch, 3, img_size, img_size), dtype=np.float32))
    yield InputSet("natural image", preprocess(views[:batch], img_size, **transform))
    if validate_dir is None:
        return
    files, labels = held_out or labelled_images(validate_dir, meta)
    objects = object_patches_of(validate_dir, files) if meta.crop_pct == 1.0 else None
    name = f"{Path(validate_dir).name}/ ({len(files)} images)"
    for start in range(0, len(files), DIR_CHUNK):
        chunk = slice(start, start + DIR_CHUNK)
        # object patches are the model's patches only where the images reach it unscaled
        known = objects is not None and all(square_side(f) == img_size for f in files[chunk])
        yield InputSet(
            name,
            preprocess(files[chunk], img_size, **transform),
            labels[chunk] if labels is not None else None,
            objects[chunk] if known else None,
            held_out=True,
        )


def labelled_images(folder: str | Path, meta: ArtifactMetadata) -> tuple[list[Path], np.ndarray | None]:
    """Every image under `folder`, with class ids where eval would find them (else None)."""
    try:
        samples = find_samples(folder, meta.num_classes, None, meta.classes)
    except EvitDeployError:
        return find_images(folder), None
    return [s.path for s in samples], np.array([s.target for s in samples])


def torch_runner(model) -> Runner:
    """The PyTorch model in FP32 on the CPU, with each drop block's class-attention scores."""
    import torch

    def run(images: np.ndarray) -> Outputs:
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
        return Outputs(logits.numpy(), [i.numpy() for i in indices], [s.numpy() for s in scores])

    return run


def onnx_runner(model: onnx.ModelProto | bytes, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Runner:
    """An ONNX graph on ONNX Runtime, its TopK indices exposed as extra outputs."""
    import onnxruntime as ort

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    exposed, index_names = expose_topk_indices(proto)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=list(providers))

    def run(images: np.ndarray) -> Outputs:
        logits, *indices = session.run([OUTPUT_NAME, *index_names], {INPUT_NAME: images})
        return Outputs(np.asarray(logits, dtype=np.float32), indices)

    return run


def validate(
    reference: Runner,
    candidate: Runner,
    meta: ArtifactMetadata,
    batch: int = VALIDATION_BATCH,
    validate_dir: str | Path | None = None,
    gates: Gates | None = None,
    on_step: Callable[[str, int], None] = lambda text, total: None,
    on_progress: Callable[[int], None] = lambda done: None,
) -> ValidationReport:
    """Compare `candidate` with the FP32 `reference` on the validation inputs (FP32 rules when
    gates is None, else the gates on the held-out row, which is then required). The held-out
    images, most of the time, are a stage of their own: on_step(text, images), then
    on_progress(images done)."""
    if gates is not None and validate_dir is None:
        raise UsageError(
            f"{gates.precision} is judged on held-out images: pass --validate-dir DIR (a folder "
            "of images the model was not trained on, in class folders to measure accuracy)"
        )
    config = meta.to_config()
    parts: dict[str, list[CaseResult]] = {}
    held_out = labelled_images(validate_dir, meta) if validate_dir is not None else None
    done = 0
    for inputs in validation_inputs(meta, batch, validate_dir, held_out):
        if inputs.held_out and done == 0:
            on_step(f"validating on {inputs.name}", len(held_out[0]))
        ref, got = reference(inputs.images), candidate(inputs.images)
        parts.setdefault(inputs.name, []).append(
            compare(inputs.name, ref, got.logits, got.indices, config, inputs.labels, gates, inputs.held_out, inputs.objects)
        )
        if inputs.held_out:
            done += len(inputs.images)
            on_progress(done)
    cases = [chunks[0] if len(chunks) == 1 else merge_cases(name, chunks) for name, chunks in parts.items()]
    return ValidationReport(cases, gates.precision if gates else FP32, gates)


def validate_onnx(
    model,
    onnx_model: bytes,
    batch: int = VALIDATION_BATCH,
    validate_dir: str | Path | None = None,
    gates: Gates | None = None,
    on_step: Callable[[str, int], None] = lambda text, total: None,
    on_progress: Callable[[int], None] = lambda done: None,
) -> ValidationReport:
    """An exported graph on ONNX Runtime's CPU provider against the PyTorch model it came from."""
    meta = ArtifactMetadata.from_model(model)
    return validate(
        torch_runner(model), onnx_runner(onnx_model), meta, batch, validate_dir, gates, on_step, on_progress
    )


def is_near_tie(scores: np.ndarray, keep: int) -> bool:
    """Whether the K-th and (K+1)-th largest scores are within NEAR_TIE_GAP of each other."""
    top = np.sort(scores)[::-1]
    return bool(top[keep - 1] - top[keep] <= NEAR_TIE_GAP * abs(top[keep - 1]))


def compare(
    name: str,
    ref: Outputs,
    got_logits: np.ndarray,
    got_indices: list[np.ndarray],
    config: EvitConfig,
    labels: np.ndarray | None = None,
    gates: Gates | None = None,
    gated: bool = True,
    objects: list[list[int]] | None = None,
) -> CaseResult:
    """Compare one candidate's outputs with the reference's (object recall of both where the
    images' `objects` are known and a reduced precision is judged)."""
    batch = ref.logits.shape[0]
    if len(got_indices) != len(ref.indices):
        raise EvitDeployError(
            f"the exported graph has {len(got_indices)} TopK nodes, the model {len(ref.indices)}"
        )
    ref_ids = kept_patch_ids(ref.indices, config.num_patches, config.fuse_token)
    got_ids = kept_patch_ids(got_indices, config.num_patches, config.fuse_token)
    same_set = np.ones((batch, len(ref_ids)), dtype=bool)
    same_order = np.ones_like(same_set)
    overlap = np.ones(same_set.shape)
    near_tie = np.zeros(batch, dtype=bool)
    for j, (r, g) in enumerate(zip(ref_ids, got_ids)):
        for i in range(batch):
            same_order[i, j] = np.array_equal(ref.indices[j][i], got_indices[j][i])
            same_set[i, j] = np.array_equal(np.sort(r[i]), np.sort(g[i]))
            if not same_set[i, j]:
                overlap[i, j] = len(np.intersect1d(r[i], g[i])) / r.shape[1]
            # Only the first differing block can be judged: later ones see other tokens.
            if gates is None and ref.scores is not None and not same_set[i, j] and same_set[i, :j].all():
                near_tie[i] = is_near_tie(ref.scores[j][i], r.shape[1])
    differs = ~same_set.all(axis=1)
    compared = ~differs | ~near_tie
    diff = np.abs(ref.logits[compared] - got_logits[compared])
    accuracy = reference_accuracy = None
    if labels is not None:
        accuracy = float(np.mean(got_logits.argmax(1) == labels))
        reference_accuracy = float(np.mean(ref.logits.argmax(1) == labels))
    recall = reference_recall = ()
    if objects is not None and gates is not None:
        recall = tuple(float(v) for v in np.nanmean(patch_recall(got_ids, objects, config.num_patches)[0], axis=0))
        reference_recall = tuple(
            float(v) for v in np.nanmean(patch_recall(ref_ids, objects, config.num_patches)[0], axis=0)
        )
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
        unexplained=int((differs & ~near_tie).sum()) if gates is None else 0,
        compared=int(compared.sum()),
        kept_identical=tuple(float(v) for v in same_set.mean(axis=0)),
        kept_overlap=tuple(float(v) for v in overlap.mean(axis=0)),
        accuracy=accuracy,
        reference_accuracy=reference_accuracy,
        object_recall=recall,
        reference_object_recall=reference_recall,
        gates=gates,
        gated=gated,
    )
