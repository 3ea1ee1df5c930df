"""A model's own class names and input transform, from its checkpoint to every runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import TINY, assert_one_line_error, config_for, fresh_model, run_cli
from evit_deploy.data.samples import find_samples
from evit_deploy.errors import EvitDeployError
from evit_deploy.export import export_onnx
from evit_deploy.metadata import read_onnx_metadata
from evit_deploy.model import build_model
from evit_deploy.runtime import Predictor
from evit_deploy.data.labels import class_names

NAMES = ["zebra", "apple", "mango", "kiwi", "lemon", "fig", "date", "plum"]  # not in sorted order


@pytest.fixture(scope="module")
def named_checkpoint(tmp_path_factory):
    """An 8-class deit_tiny safetensors checkpoint with crop_pct 1.0 in its header and a
    labels.txt beside it, as the shipped shapes model comes."""
    folder = tmp_path_factory.mktemp("named")
    model = fresh_model(config_for(TINY, num_classes=len(NAMES)), seed=3)
    path = folder / "model.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path),
        metadata={"crop_pct": "1.0", "mean": "[0.5, 0.5, 0.5]", "std": "[0.25, 0.25, 0.25]"},
    )
    (folder / "labels.txt").write_text("\n".join(NAMES) + "\n")
    return path


@pytest.fixture(scope="module")
def named_onnx(named_checkpoint, tmp_path_factory):
    model = build_model(config_for(TINY), named_checkpoint)
    out = tmp_path_factory.mktemp("named_onnx") / "named.onnx"
    export_onnx(model, out, with_token_indices=True)
    return out


def test_checkpoint_carries_names_and_transform(named_checkpoint):
    model = build_model(config_for(TINY), named_checkpoint)
    assert model.config.num_classes == 8
    assert model.classes == NAMES
    transform = model.preprocessing
    assert (transform.crop_pct, transform.mean, transform.std) == (1.0, (0.5,) * 3, (0.25,) * 3)


def test_export_stores_them_and_predictor_uses_them(named_onnx, named_checkpoint):
    meta = read_onnx_metadata(named_onnx)
    assert meta.classes == NAMES and meta.crop_pct == 1.0 and meta.mean == [0.5] * 3
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    for artifact in (named_onnx, named_checkpoint):
        prediction = Predictor(artifact).predict(image, topk=3)[0]
        assert prediction.labels == [NAMES[c] for c in prediction.class_ids]


def test_transform_is_applied(named_onnx):
    """crop_pct 1.0 and mean/std 0.5/0.25 from the metadata: a 224 px image goes in unresized,
    so the logits equal those of the hand-normalised pixels."""
    image = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    predictor = Predictor(named_onnx)
    by_hand = ((image.astype(np.float32) / 255 - 0.5) / 0.25).transpose(2, 0, 1)[None]
    logits = predictor.logits(np.ascontiguousarray(by_hand))
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    got = predictor.predict(image, topk=8)[0]
    assert got.class_ids == list(np.argsort(-probs[0], kind="stable"))
    assert np.allclose(got.probs, np.sort(probs[0])[::-1], atol=1e-5)


def test_labels_option_overrides_and_count_is_checked(named_checkpoint, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"thing {i}" for i in range(8)))
    model = build_model(config_for(TINY), named_checkpoint, labels=other)
    assert model.classes == [f"thing {i}" for i in range(8)]
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    with pytest.raises(EvitDeployError, match="gives 2 class names .* for a model with 8 classes"):
        build_model(config_for(TINY), named_checkpoint, labels=short)
    done = run_cli(
        "export", "--checkpoint", named_checkpoint, "--model", TINY, "--labels", short,
        "-o", tmp_path / "x.onnx",
    )
    assert_one_line_error(done, 1, "gives 2 class names (0 empty) for a model with 8 classes")
    assert not (tmp_path / "x.onnx").exists()


def test_default_names():
    imagenet = read_meta_like(num_classes=1000)
    assert class_names(imagenet)[0] == "tench"
    assert class_names(read_meta_like(num_classes=8)) == tuple(f"class {i}" for i in range(8))


def read_meta_like(num_classes: int):
    from evit_deploy.metadata import ArtifactMetadata

    return ArtifactMetadata.from_config(config_for(TINY, num_classes=num_classes))


def test_damaged_class_list_is_refused(named_onnx):
    from evit_deploy.metadata import ArtifactMetadata

    props = read_onnx_metadata(named_onnx).to_props()
    props["classes"] = json.dumps(NAMES[:5])
    with pytest.raises(EvitDeployError, match="damaged evit-deploy metadata .*5 class names for 8"):
        ArtifactMetadata.from_props(props, "x.onnx")


def test_names_survive_the_props_round_trip(named_onnx):
    """Engine headers and Triton's evit_metadata.json store the metadata as props."""
    from evit_deploy.metadata import ArtifactMetadata

    meta = read_onnx_metadata(named_onnx)
    assert ArtifactMetadata.from_props(meta.to_props(), "engine").classes == NAMES


def test_triton_repo_labels(named_onnx, tmp_path):
    from evit_deploy.serve.triton_repo import write_triton_repo

    result = write_triton_repo(named_onnx, tmp_path / "repo")
    assert (result.model_dir / "labels.txt").read_text().splitlines() == NAMES


def test_eval_maps_folders_by_class_name(tmp_path):
    """Folders named after the model's classes get those classes' ids, not the sorted order."""
    for name in ("zebra", "fig"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    samples = find_samples(tmp_path, 8, class_names=NAMES)
    assert {s.path.parent.name: s.target for s in samples} == {"zebra": 0, "fig": 5}


def test_predict_shows_the_true_class(named_onnx, tmp_path):
    folder = tmp_path / "kiwi"
    folder.mkdir()
    Image.fromarray(np.full((224, 224, 3), 90, np.uint8)).save(folder / "x.png")
    done = run_cli("predict", named_onnx, folder / "x.png", "--topk", "2")
    assert done.returncode == 0, done.stderr
    assert "true class" in done.stdout and "kiwi" in done.stdout


def test_random_weights_take_a_labels_file(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"n{i}" for i in range(1000)))
    with torch.no_grad():
        model = fresh_model(config_for(TINY))
    assert model.classes == []
    assert build_model(config_for(TINY), None, labels=names).classes[999] == "n999"
