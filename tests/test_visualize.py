"""visualize: the picture shows exactly the patches the model kept, from PyTorch and from ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY, config_for, random_model
from PIL import Image
from typer.testing import CliRunner

from evit_deploy.analysis.visualize import (
    FUSED,
    MASK_COLOR,
    MASKED,
    figure_size,
    panel_origin,
    patch_states,
    shade,
)
from evit_deploy.cli import app
from evit_deploy.errors import EvitDeployError
from evit_deploy.metadata import stamp_metadata
from evit_deploy.metadata import ArtifactMetadata
from evit_deploy.preprocess import preprocess, resize_and_crop

# The session's shared tiny export with kept-token outputs (test_export uses it too).
CONFIG = config_for(TINY, 0.7)
SIZE = CONFIG.img_size
PATCH = CONFIG.arch.patch_size
GRID = CONFIG.grid_size
DROP_BLOCKS = [b.block for b in CONFIG.token_plan if b.keep is not None]

runner = CliRunner()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, onnx_export):
    """The same random weights as a checkpoint, as an ONNX with kept-token outputs, and as an
    ONNX whose metadata declares none; plus a noise image (no patch can look like a mask)."""
    folder = tmp_path_factory.mktemp("visualize")
    model = random_model(TINY, 0.7)
    checkpoint = folder / "tiny.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    onnx_path = onnx_export(CONFIG, with_token_indices=True).path
    plain = onnx.load(str(onnx_path))
    stamp_metadata(plain, ArtifactMetadata.from_config(CONFIG))
    no_indices = folder / "no_indices.onnx"
    onnx.save(plain, str(no_indices))
    image = folder / "noise.png"
    noise = np.random.default_rng(2).integers(0, 256, (250, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(image)
    return {
        "model": model,
        "pth": checkpoint,
        "onnx": onnx_path,
        "no_indices": no_indices,
        "image": image,
    }


def expected_states(model, image) -> list[dict[int, str]]:
    """Per drop block, every patch's state, walked independently of the visualize code from the
    model's own TopK indices: tokens are tracked as lists of original patch ids."""
    batch = torch.from_numpy(preprocess([image], CONFIG.img_size))
    with torch.no_grad():
        _, indices = model(batch, return_token_indices=True)
    tokens = [[p] for p in range(CONFIG.num_patches)]  # patches each token carries
    alive = set(range(CONFIG.num_patches))
    panels = []
    for idx in indices:
        kept = [tokens[i] for i in idx[0].tolist()]
        dropped = [t for i, t in enumerate(tokens) if i not in set(idx[0].tolist())]
        now_alive = {t[0] for t in kept if len(t) == 1 and t[0] in alive}
        states = {}
        for p in range(CONFIG.num_patches):
            if p in now_alive:
                states[p] = "alive"
            elif p in alive:
                states[p] = "fused"
            else:
                states[p] = "masked"
        panels.append(states)
        fused = [p for t in dropped for p in t]
        tokens = [*kept, fused]  # the fused token carries every patch merged into it
        alive = now_alive
    return panels


def test_figure_masks_exactly_the_dropped_patches(artifacts, tmp_path):
    output = tmp_path / "figure.png"
    result = runner.invoke(
        app,
        [
            "visualize",
            str(artifacts["pth"]),
            str(artifacts["image"]),
            "-o",
            str(output),
            "--keep-rate",
            "0.7",
        ],
    )
    assert result.exit_code == 0, result.output
    figure = np.asarray(Image.open(output).convert("RGB"))
    panels = 1 + len(DROP_BLOCKS)
    assert (figure.shape[1], figure.shape[0]) == figure_size(panels, CONFIG.img_size)
    crop = np.asarray(resize_and_crop(Image.open(artifacts["image"]).convert("RGB"), SIZE))
    x0, y0 = panel_origin(0, SIZE)
    assert np.array_equal(figure[y0 : y0 + SIZE, x0 : x0 + SIZE], crop)
    seen = set()
    for j, states in enumerate(expected_states(artifacts["model"], artifacts["image"])):
        x0, y0 = panel_origin(j + 1, SIZE)
        for patch, state in states.items():
            r, c = divmod(patch, GRID)
            ys, xs = (
                slice(y0 + r * PATCH, y0 + (r + 1) * PATCH),
                slice(x0 + c * PATCH, x0 + (c + 1) * PATCH),
            )
            drawn = figure[ys, xs]
            original = crop[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH]
            if state == "alive":
                assert np.array_equal(drawn, original), (j, patch)
            elif state == "fused":
                assert np.array_equal(drawn, shade(original)), (j, patch)
            else:
                assert (drawn == np.array(MASK_COLOR, np.uint8)).all(), (j, patch)
            seen.add(state)
        kept = sum(s == "alive" for s in states.values())
        assert kept in (
            CONFIG.token_plan[DROP_BLOCKS[j]].keep,
            CONFIG.token_plan[DROP_BLOCKS[j]].keep - 1,
        )
    assert seen == {"alive", "fused", "masked"}


def test_checkpoint_and_onnx_draw_the_same_picture(artifacts, tmp_path):
    common = [str(artifacts["image"]), "-o"]
    from_pth = runner.invoke(
        app,
        [
            "visualize",
            str(artifacts["pth"]),
            *common,
            str(tmp_path / "pth"),
            "--keep-rate",
            "0.7",
        ],
    )
    from_onnx = runner.invoke(
        app, ["visualize", str(artifacts["onnx"]), *common, str(tmp_path / "onnx")]
    )
    assert from_pth.exit_code == 0 and from_onnx.exit_code == 0, from_pth.output + from_onnx.output
    a = np.asarray(Image.open(tmp_path / "pth" / "noise_tokens.png"))
    b = np.asarray(Image.open(tmp_path / "onnx" / "noise_tokens.png"))
    assert np.array_equal(a, b)


def test_onnx_without_index_outputs_is_refused(artifacts, tmp_path):
    result = runner.invoke(
        app,
        ["visualize", str(artifacts["no_indices"]), str(artifacts["image"]), "-o", str(tmp_path)],
    )
    assert result.exit_code == 1
    assert "--with-token-indices" in result.output
    assert not list(tmp_path.iterdir())


def test_bad_requests_fail_before_drawing(artifacts, tmp_path):
    image = str(artifacts["image"])
    cases = [
        (
            ["visualize", str(artifacts["pth"]), image, "--keep-rate", "1.0", "-o", str(tmp_path)],
            2,
            "drops no tokens",
        ),
        (
            ["visualize", str(artifacts["onnx"]), image, "--keep-rate", "0.7", "-o", str(tmp_path)],
            2,
            "for checkpoints",
        ),
        (
            ["visualize", str(artifacts["onnx"]), image, image, "-o", str(tmp_path / "one.png")],
            2,
            "names one file",
        ),
        (
            [
                "visualize",
                str(artifacts["onnx"]),
                str(tmp_path / "missing.jpg"),
                "-o",
                str(tmp_path),
            ],
            1,
            "image not found",
        ),
    ]
    for args, code, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output
    assert not list(tmp_path.iterdir())


def test_existing_figure_needs_force(artifacts, tmp_path):
    output = tmp_path / "figure.png"
    output.write_bytes(b"keep me")
    args = ["visualize", str(artifacts["onnx"]), str(artifacts["image"]), "-o", str(output)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and output.read_bytes() == b"keep me"
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    assert Image.open(output).format == "PNG"


def test_without_fusion_dropped_patches_are_masked_not_shaded():
    # 4 patches (id 4: the first fused token): the first drop removes patch 1, the second patch 3
    kept = [np.array([3, 0, 2]), np.array([2, 4, 0])]
    fused = patch_states(kept, 4, fuse_token=True)
    plain = patch_states(kept, 4, fuse_token=False)
    assert fused[0].tolist() == [0, FUSED, 0, 0] and fused[1].tolist() == [0, MASKED, 0, FUSED]
    assert plain[0].tolist() == [0, MASKED, 0, 0] and plain[1].tolist() == [0, MASKED, 0, MASKED]


def test_corrupt_indices_are_reported():
    with pytest.raises(EvitDeployError, match="earlier drop"):
        patch_states([np.array([0, 1]), np.array([2])], 4, fuse_token=False)
