"""ONNX Runtime backend: providers in the order TensorRT, CUDA, CPU, whichever are installed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from evit_deploy.engines.precheck import topk_ks
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.export.precision import model_precision
from evit_deploy.metadata import ArtifactMetadata, load_onnx, onnx_metadata
from evit_deploy.runtime.base import Backend, NodeTime, cpu_name

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def choose_providers(
    available: list[str], device: str | None = None, requested: list[str] | None = None
) -> list[str]:
    """Requested providers (full or short names) if installed, else the preferred installed ones;
    device 'cpu' forces the CPU provider, 'cuda' drops it to a fallback."""
    if requested:
        chosen = [PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
        missing = [p for p in chosen if p not in available]
        if missing:
            raise UsageError(
                f"ONNX Runtime provider(s) {', '.join(missing)} not installed here; available: "
                f"{', '.join(available)}"
            )
        return chosen
    if device == "cpu":
        return ["CPUExecutionProvider"]
    preferred = [p for p in PROVIDER_ORDER if p in available]
    if device and device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise UsageError(
                "device cuda needs onnxruntime-gpu (pip install 'evit-deploy[gpu]'); this "
                f"onnxruntime has {', '.join(available)}"
            )
    return preferred


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    options = ("providers", "threads")
    profiles = True

    def __init__(
        self,
        path: str | Path,
        device: str | None = None,
        providers: list[str] | None = None,
        threads: int | None = None,
    ):
        import onnxruntime as ort

        self.path = Path(path)
        graph = load_onnx(self.path)  # graph and initializer types, not the weights
        self.metadata = onnx_metadata(graph, self.path)
        self.threads = threads
        self.providers = choose_providers(ort.get_available_providers(), device, providers)
        try:
            self.session = ort.InferenceSession(
                os.fspath(self.path), session_options(threads), providers=self.providers
            )
        except Exception as exc:
            raise EvitDeployError(
                f"ONNX Runtime cannot load {self.path}: {str(exc).splitlines()[0]}"
            ) from exc
        check_graph_io(self.session, self.metadata, self.path.name)
        check_token_plan(graph, self.metadata, self.path.name)
        active = self.session.get_providers()
        self.provider = active[0]
        self.device_name = cpu_name() if self.provider == "CPUExecutionProvider" else _gpu_name()
        # A reduced-precision file says so in its metadata (int8, fp16); an FP16 graph keeps
        # float32 I/O, so its weights tell it apart otherwise. It runs as it is on every provider.
        meta_precision = self.metadata.precision
        self.precision = meta_precision if meta_precision != "fp32" else model_precision(graph)
        self.input_name = self.metadata.input_name
        self.output_name = self.metadata.output_name

    def close(self) -> None:
        self.session = None

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def profile(self, batch: np.ndarray, runs: int) -> list[NodeTime]:
        """ONNX Runtime's profiler on a second session with the same settings: per-node kernel
        times, the first (warm-up) run left out. A node that ORT fused or rewrote is named
        'ONNX_NAME/FusionName'; nodes it added (layout transposes) have no ONNX source."""
        import onnxruntime as ort

        with tempfile.TemporaryDirectory(prefix="evit-ort-profile-") as folder:
            options = session_options(self.threads)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(folder) / "profile")
            session = ort.InferenceSession(os.fspath(self.path), options, providers=self.providers)
            for _ in range(runs + 1):
                session.run([self.output_name], {self.input_name: batch})
            events = json.loads(Path(session.end_profiling()).read_text())
        warmup = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
        known = {node.name for node in load_onnx(self.path).graph.node}
        times: dict[tuple[str, str], float] = {}
        for event in events:
            if (event.get("cat") != "Node" or not event["name"].endswith("_kernel_time")
                    or event["ts"] < warmup["ts"] + warmup["dur"]):
                continue
            key = (event["name"].removesuffix("_kernel_time"), event["args"]["op_name"])
            times[key] = times.get(key, 0.0) + event["dur"] / 1000 / runs
        return [
            NodeTime(name, op, ms, tuple(s for s in (name.split("/")[0],) if s in known))
            for (name, op), ms in times.items()
        ]


def session_options(threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle intra-op threads would otherwise spin for a while after each run, stealing the cores
    # from whatever runs next (the other variant of an interleaved bench, PyTorch, the server's
    # preprocessing): measured, that slowed the next PyTorch run several-fold.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


def check_graph_io(session, metadata: ArtifactMetadata, source: str) -> None:
    """The graph's input and output must be what its metadata says (an ONNX edited after export
    would otherwise fail on the first batch with ONNX Runtime's multi-line message)."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    size = metadata.img_size
    expected = [3, size, size]
    shape = inputs.get(metadata.input_name)
    logits = outputs.get(metadata.output_name)
    if shape is None or logits is None or (
        len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected))
    ) or len(logits) != 2 or (isinstance(logits[1], int) and logits[1] != metadata.num_classes):
        raise EvitDeployError(
            f"{source}'s graph does not match its evit-deploy metadata (metadata: input "
            f"'{metadata.input_name}' [batch, {', '.join(map(str, expected))}] -> output "
            f"'{metadata.output_name}' [batch, {metadata.num_classes}]; graph: inputs {inputs}, "
            f"outputs {outputs}); was it edited after export? Re-export it with `evit-deploy export`"
        )


def check_token_plan(graph, metadata: ArtifactMetadata, source: str) -> None:
    """The graph's TopK counts must be the metadata's token plan: a graph swapped under copied
    metadata would otherwise run and answer with another model's logits."""
    found = topk_ks(graph.graph)
    if found != list(metadata.topk_k):
        raise EvitDeployError(
            f"{source}'s graph does not match its evit-deploy metadata (metadata: TopK K "
            f"{list(metadata.topk_k)}; graph: {found}); was it edited after export? Re-export it "
            f"with `evit-deploy export`"
        )


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "gpu"
    except Exception:
        return "gpu"
