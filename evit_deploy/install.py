"""How to install what a feature needs, in one place: doctor lists these, and every error that
names a missing package quotes them. Standard library only, so doctor works on a broken install."""

from __future__ import annotations


def extra(name: str) -> str:
    """The install line for one of the package's extras (pyproject.toml)."""
    return f"pip install 'evit-deploy[{name}]', or in a clone pip install -e '.[{name}]'"


SERVE_INSTALL = extra("serve")
PLOT_INSTALL = extra("plot")
OPENVINO_INSTALL = extra("openvino")
TENSORRT_INSTALL = extra("tensorrt")
ORT_GPU_INSTALL = "pip uninstall onnxruntime && pip install onnxruntime-gpu"
TORCH_CUDA_INSTALL = (
    "a CUDA build of PyTorch and an NVIDIA driver "
    "(pip install torch --index-url https://download.pytorch.org/whl/cu126)"
)
