"""ONNX export and its validation against PyTorch."""

from evit_deploy.export.onnx import ExportResult, export_onnx
from evit_deploy.export.validate import ValidationReport, validate_onnx
from evit_deploy.metadata import read_onnx_metadata

__all__ = ["ExportResult", "ValidationReport", "export_onnx", "read_onnx_metadata", "validate_onnx"]
