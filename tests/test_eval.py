"""eval: class folders and labels files map to the right classes, accuracy counts what the model
predicts, and PyTorch and the exported ONNX give the same numbers on the same folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY, config_for, random_model
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from evit_deploy.analysis.evaluate import evaluate
from evit_deploy.cli import app
from evit_deploy.data.labels import imagenet_classes
from evit_deploy.data.samples import Sample, find_samples, read_labels_file, spread_subset
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.model import EvitOverrides
from evit_deploy.preprocess import preprocess
from evit_deploy.runtime import Predictor

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights")

# The session's shared tiny export (its extra kept-token outputs do not matter to eval).
CONFIG = config_for(TINY, 0.7)
CLASS_IDS = (1, 7, 500)  # a subset of ImageNet: sorted-folder order would give 0, 1, 2
PER_CLASS = 4

runner = CliRunner()


def draw_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        x1, y1 = x0 + rng.integers(8, size[0] // 2), y0 + rng.integers(8, size[1] // 2)
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    return image


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """An ImageNet-val-style folder: three WordNet-id folders of drawn images (PNG, JPEG, gray)."""
    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    for class_id in CLASS_IDS:
        folder = root / imagenet_classes()[class_id][0]
        folder.mkdir()
        for i in range(PER_CLASS):
            image = draw_image(rng, (int(rng.integers(64, 120)), int(rng.integers(64, 120))))
            if i == 1:
                image.save(folder / f"img{i}.JPEG", quality=90)
            elif i == 2:
                image.convert("L").save(folder / f"img{i}.png")
            else:
                image.save(folder / f"img{i}.png")
    (root / imagenet_classes()[CLASS_IDS[0]][0] / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, onnx_export):
    """The same random weights as a checkpoint and as their validated ONNX export."""
    checkpoint = tmp_path_factory.mktemp("eval_artifacts") / "tiny.pth"
    torch.save({"model": random_model(TINY, 0.7).state_dict()}, checkpoint)
    return {"pth": checkpoint, "onnx": onnx_export(CONFIG, with_token_indices=True).path}


def run_eval(artifact, dataset, tmp_path, *extra) -> dict:
    out = tmp_path / f"{artifact.name}.json"
    result = runner.invoke(
        app, ["eval", str(artifact), str(dataset), "--batch", "5", "--json-out", str(out), *extra]
    )
    assert result.exit_code == 0, result.output
    assert "img/s" in result.output
    return json.loads(out.read_text())


def test_pytorch_and_onnx_agree_on_the_same_folder(artifacts, dataset, tmp_path):
    from_pth = run_eval(artifacts["pth"], dataset, tmp_path, "--keep-rate", "0.7")
    from_onnx = run_eval(artifacts["onnx"], dataset, tmp_path)
    assert from_pth["images"] == from_onnx["images"] == len(CLASS_IDS) * PER_CLASS
    assert (from_pth["backend"], from_onnx["backend"]) == ("pytorch", "onnxruntime")
    assert from_pth["top1_correct"] == from_onnx["top1_correct"]
    assert from_pth["top5_correct"] == from_onnx["top5_correct"]
    assert from_onnx["images_per_s"] > 0
    samples = find_samples(dataset, 1000)
    batch = preprocess([s.path for s in samples], CONFIG.img_size)
    torch_top1 = Predictor(artifacts["pth"], evit=EvitOverrides(keep_rate=0.7)).logits(batch).argmax(1)
    onnx_top1 = Predictor(artifacts["onnx"]).logits(batch).argmax(1)
    assert np.array_equal(torch_top1, onnx_top1)


def test_accuracy_counts_the_predicted_classes(artifacts, dataset, tmp_path):
    """Label every image with what the model predicts (100 % top-1), then with a class it ranks
    last (0 % top-5): the metric cannot be right by accident."""
    predictor = Predictor(artifacts["onnx"])
    samples = find_samples(dataset, 1000)
    logits = predictor.logits(preprocess([s.path for s in samples], CONFIG.img_size))
    relative = [s.path.relative_to(dataset).as_posix() for s in samples]
    right = tmp_path / "right.txt"
    right.write_text("".join(f"{r}\t{c}\n" for r, c in zip(relative, logits.argmax(1))))
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("".join(f"{r} {c}\n" for r, c in zip(relative, logits.argmin(1))))
    assert run_eval(artifacts["onnx"], dataset, tmp_path, "--labels", str(right))["top1"] == 1.0
    worst = run_eval(artifacts["onnx"], dataset, tmp_path, "--labels", str(wrong), "--force")
    assert worst["top1"] == 0.0 and worst["top5"] == 0.0
    second = np.argsort(-logits, axis=1)[:, 1]
    samples_second = [Sample(s.path, int(c)) for s, c in zip(samples, second)]
    result = evaluate(predictor, samples_second, batch_size=3)
    assert (result.top1, result.top5) == (0.0, 1.0)


def test_wordnet_folders_get_their_imagenet_index(dataset):
    samples = find_samples(dataset, 1000)
    assert len(samples) == len(CLASS_IDS) * PER_CLASS  # notes.txt is not an image
    assert sorted({s.target for s in samples}) == list(CLASS_IDS)
    for sample in samples:
        assert imagenet_classes()[sample.target][0] == sample.path.parent.name


def test_other_folders_use_sorted_order_or_ask_for_labels(tmp_path):
    for name in ("dog", "cat"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / name / "a.png")
    samples = find_samples(tmp_path, 2)
    assert {s.path.parent.name: s.target for s in samples} == {"cat": 0, "dog": 1}
    with pytest.raises(UsageError, match="--labels"):
        find_samples(tmp_path, 1000)
    labels = tmp_path / "labels.csv"
    labels.write_text("# folder, class\ncat,n01443537\ndog,3\n")
    samples = find_samples(tmp_path, 1000, labels)
    assert {s.path.parent.name: s.target for s in samples} == {"cat": 1, "dog": 3}


def test_labels_file_for_a_flat_folder(tmp_path):
    for name in ("ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"):
        Image.new("RGB", (32, 32)).save(tmp_path / name, format="JPEG")
    with pytest.raises(UsageError, match="no class folders"):
        find_samples(tmp_path, 1000)
    labels = tmp_path / "val.txt"
    labels.write_text(
        "ILSVRC2012_val_00000001 n01440764 0 0 10 10\nILSVRC2012_val_00000002.JPEG 65\n"
    )
    samples = find_samples(tmp_path, 1000, labels)
    assert [s.target for s in samples] == [0, 65]
    labels.write_text("ILSVRC2012_val_00000001.JPEG 65\n")
    with pytest.raises(EvitDeployError, match="no class for 1 image"):
        find_samples(tmp_path, 1000, labels)
    labels.write_text("a.JPEG 3\nb.JPEG tench\n")
    with pytest.raises(EvitDeployError, match=r"val.txt:2"):
        read_labels_file(labels)
    labels.write_text("ILSVRC2012_val_00000001.JPEG 1000\nILSVRC2012_val_00000002.JPEG 1\n")
    with pytest.raises(EvitDeployError, match="outside the model's 0..999"):
        find_samples(tmp_path, 1000, labels)


def test_limit_spreads_over_every_class(dataset):
    samples = find_samples(dataset, 1000)
    subset = spread_subset(samples, len(CLASS_IDS))
    assert sorted(s.target for s in subset) == list(CLASS_IDS)
    assert spread_subset(samples, 10_000) == samples
    with pytest.raises(UsageError):
        spread_subset(samples, 0)


def test_cli_errors_are_one_line(artifacts, tmp_path):
    result = runner.invoke(app, ["eval", str(artifacts["onnx"]), str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "data folder not found" in result.output
    result = runner.invoke(
        app, ["eval", str(artifacts["onnx"]), str(tmp_path), "--keep-rate", "0.7"]
    )
    assert result.exit_code == 2 and "for checkpoints" in result.output
