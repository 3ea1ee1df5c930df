"""ONNX export and its validation against PyTorch."""

from evit_deploy.export.onnx import ExportResult, export_onnx, read_onnx_metadata
from evit_deploy.export.validate import ValidationReport, validate_onnx

__all__ = ["ExportResult", "ValidationReport", "export_onnx", "read_onnx_metadata", "validate_onnx"]
