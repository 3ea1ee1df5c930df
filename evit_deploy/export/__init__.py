"""ONNX export and its validation against PyTorch.

The names below are imported on first use (PEP 562): the torch-free modules of this package
(precision, score_path) are read by `info`, `doctor` and the engine settings, which must not pay
for importing torch.
"""

from importlib import import_module

_HOMES = {
    "ExportResult": "evit_deploy.export.onnx",
    "export_onnx": "evit_deploy.export.onnx",
    "ValidationReport": "evit_deploy.export.validate",
    "validate_onnx": "evit_deploy.export.validate",
    "read_onnx_metadata": "evit_deploy.metadata",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'evit_deploy.export' has no attribute '{name}'")
    return getattr(import_module(_HOMES[name]), name)
