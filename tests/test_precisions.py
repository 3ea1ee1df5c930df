"""The one precision vocabulary: every option that names a precision is judged by its table."""

from __future__ import annotations

import pytest

from evit_deploy.engines.settings import BuildSettings
from evit_deploy.errors import UsageError
from evit_deploy.export.onnx import check_export_precision
from evit_deploy.precisions import PRECISIONS, check_precision, chosen_at_load, run_precision, written_by
from evit_deploy.runtime.openvino_backend import check_inference_precision


def test_the_table_says_which_step_writes_and_which_backend_chooses_each_precision():
    assert set(PRECISIONS) == {"fp32", "fp16", "bf16", "int8"}
    assert written_by("export") == ("fp32", "fp16")
    assert written_by("build-engine") == ("fp32", "fp16")
    assert written_by("quantize") == ("int8",)
    assert chosen_at_load("openvino") == ("fp32", "bf16")
    assert chosen_at_load("onnxruntime") == ()
    # how a model runs: an FP32 file at the chosen precision, an INT8 one with its float parts'
    assert [run_precision("fp32", "bf16"), run_precision("int8", "fp32"), run_precision("int8", "bf16")] == [
        "bf16", "int8", "int8+bf16"]


@pytest.mark.parametrize(
    "check, message",
    [
        (lambda: check_export_precision("bf16", (), None), "export takes precision fp32 or fp16, got 'bf16'"),
        (lambda: BuildSettings("int8"), "build-engine takes precision fp32 or fp16, got 'int8'"),
        (lambda: check_inference_precision("fp16"), "OpenVINO takes precision fp32 or bf16, got 'fp16'"),
        (lambda: check_precision("fp64", ("fp32",), "export"),
         "export takes precision fp32, got 'fp64' (precisions: fp32, fp16, bf16, int8)"),
    ],
)
def test_a_precision_a_step_does_not_take_is_one_usage_error_naming_the_choices(check, message):
    with pytest.raises(UsageError) as refused:
        check()
    assert str(refused.value) == message
