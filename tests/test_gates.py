"""The precision gates judge what a reduced precision changes: the answers, the kept tokens (as an
overlap, not an exact set) and the object patches kept. Each gate passes and fails here on its own,
and on the shipped model a precision that perturbs the score path still fails the real gates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import evit_deploy
from evit_deploy.data.shapes import write_dataset
from evit_deploy.export.validate import GATES, CaseResult, torch_runner, validate
from evit_deploy.metadata import ArtifactMetadata, onnx_metadata, stamp_metadata
from evit_deploy.model import load_model
from evit_deploy.precisions import BF16, FP16, INT8
from evit_deploy.stats import share_text

SHIPPED = Path(evit_deploy.__file__).parent / "assets" / "shapes" / "shapes_evit_tiny.safetensors"

# a held-out row that passes every gate: what the shipped model's reduced precisions measure
PASSING = CaseResult(
    name="held_out/ (1000 images)", batch=1000, max_abs_diff=0.1, logit_scale=10.0, top1_agreement=0.9985,
    kept_agreement=0.6, order_agreement=0.5, compared=1000, kept_identical=(0.8, 0.5, 0.3),
    kept_overlap=(0.998, 0.985, 0.97), accuracy=0.983, reference_accuracy=0.984,
    object_recall=(0.995, 0.99, 0.87), reference_object_recall=(0.997, 0.995, 0.876), gates=GATES[INT8],
)


def test_one_gate_table_for_every_reduced_precision():
    assert set(GATES) == {FP16, BF16, INT8}
    for gates in GATES.values():
        assert (gates.min_top1_agreement, gates.max_accuracy_drop) == (0.995, 0.3)
        assert (gates.min_first_overlap, gates.min_overlap, gates.max_recall_drop) == (0.99, 0.95, 1.0)


def test_what_reduced_precisions_measure_passes_although_exact_sets_differ():
    assert PASSING.missed_gates() == [] and PASSING.passed
    assert PASSING.kept_identical[-1] < 0.5  # exact-set shares are reported, not gated


@pytest.mark.parametrize(
    "change, missed",
    [
        ({"top1_agreement": 0.9949}, "top-1 agreement 99.49% < 99.5%"),
        ({"accuracy": 0.980}, "accuracy drop 0.40 points > 0.3"),
        ({"kept_overlap": (0.9899, 0.985, 0.97)}, "kept-token overlap 98.99% at the first drop block < 99%"),
        ({"kept_overlap": (0.998, 0.985, 0.9499)}, "kept-token overlap 94.99% at drop block 3 < 95%"),
        ({"object_recall": (0.995, 0.984, 0.87)}, "object recall 1.10 points below FP32's at drop block 2 > 1"),
    ],
)
def test_each_gate_fails_on_its_own(change, missed):
    case = dataclasses.replace(PASSING, **change)
    assert case.missed_gates() == [missed] and not case.passed


def test_unknown_classes_and_objects_are_not_gated_but_a_held_out_folder_is_required():
    unknown = dataclasses.replace(
        PASSING, accuracy=None, reference_accuracy=None, object_recall=(), reference_object_recall=()
    )
    assert unknown.passed and unknown.accuracy_drop is None and unknown.recall_drops == []
    reported = dataclasses.replace(PASSING, top1_agreement=0.5, gated=False)  # not the held-out row
    assert reported.passed


@pytest.mark.parametrize("share, text", [(0.9995, "99.95%"), (0.99999, "99.99%"), (1.0, "100.00%"), (0.5, "50.00%")])
def test_a_disagreement_never_prints_as_all(share, text):
    assert share_text(share) == text


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    model = load_model(SHIPPED)
    held_out = write_dataset(tmp_path_factory.mktemp("gates") / "held_out", 200, seed=11)
    return model, held_out


def noisy_scores(model, relative: float):
    """The model with noise on every drop block's class attention (relative to its spread per
    image): a deliberately broken score path, as an imprecise TopK input would be."""
    generator = torch.Generator().manual_seed(0)

    def add_noise(_module, _inputs, scores):
        noise = torch.randn(scores.shape, generator=generator) * scores.std(dim=1, keepdim=True)
        return scores + relative * noise

    run = torch_runner(model)

    def runner(images):
        hooks = [b.attn.class_attention.register_forward_hook(add_noise) for b in model.blocks if b.keep]
        try:
            return run(images)
        finally:
            for hook in hooks:
                hook.remove()

    return runner


def test_noise_on_the_score_path_fails_the_real_gates_on_the_shipped_model(shipped):
    model, held_out = shipped
    meta = ArtifactMetadata.from_model(model)
    report = validate(torch_runner(model), noisy_scores(model, 0.3), meta, validate_dir=held_out, gates=GATES[BF16])
    held = report.cases[-1]
    assert not report.passed and any("kept-token overlap" in m for m in held.missed_gates())
    assert held.top1_agreement > 0.9  # the answers barely move: only the token gates see it
    assert len(held.object_recall) == 3  # the shapes folder lists its objects
    faithful = validate(torch_runner(model), noisy_scores(model, 1e-4), meta, validate_dir=held_out, gates=GATES[BF16])
    assert faithful.passed, faithful.failure_summary()
    record = faithful.record(held_out)
    assert record["gates"] == GATES[BF16].to_dict() and record["held_out"]["images"] == 200
    assert record["held_out"]["reference_object_recall"][0] > 0.95


def test_files_from_before_the_validation_record_still_say_they_missed_gates():
    meta = ArtifactMetadata.from_config(load_model(SHIPPED).config)
    legacy = onnx.ModelProto()
    stamp_metadata(legacy, meta)
    legacy.metadata_props.append(onnx.StringStringEntryProto(key="gates_missed", value='["held_out: top-1"]'))
    props = [p for p in legacy.metadata_props if p.key != "validation"]
    del legacy.metadata_props[:]
    legacy.metadata_props.extend(props)
    assert onnx_metadata(legacy, "old.onnx").gates_missed == ["held_out: top-1"]
    assert onnx_metadata(legacy, "old.onnx").validation["accepted_failed_gates"]
    # and a current file that passed lists none
    assert ArtifactMetadata.from_config(meta.to_config()).gates_missed == []
