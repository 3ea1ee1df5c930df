"""OpenVINO backend (CPU): an exported .onnx (or OpenVINO IR .xml) in FP32 or BF16.

BF16 is OpenVINO's inference precision hint: the CPU plugin runs matrix multiplies and most other
nodes in bfloat16 (8 significant bits). EViT ranks tokens by the class token's attention, and
scores that are close in FP32 can swap order in BF16, so by default the score path of every drop
block (the Q.K^T MatMul, softmax, class-row slice, head mean and TopK; found by structure as in
evit_deploy.export.score_path) stays in FP32:

- Each node is marked with OpenVINO's `precise` runtime attribute (ov::disable_fp16_compression),
  which the CPU plugin honours in BF16 too (it keeps such a node in its original precision).
- The attribute is not copied when a transformation replaces a node, and the CPU plugin replaces
  Softmax-8 by Softmax-1 and folds the scale multiply and K's transpose into the MatMul. So those
  nodes are first rewritten into the form the plugin keeps: Softmax-1, MatMul(Q * scale, K,
  transpose_b).
- Python can set the attribute only as a plain string; the IR serializer writes it as the real
  attribute, and reading the IR back gives the plugin what it checks. So the marked model makes
  one round trip through a temporary IR before it is compiled.

Whether it worked is read back from the compiled model (`score_path_precisions`).

An INT8 file (QDQ: static, nncf) runs its quantized multiplies in INT8 whatever the hint; the hint
decides the rest (layer norms, GELU, softmax, attention's float parts, reorders). With the default
FP32 those run in FP32 where the BF16 model runs them in BF16; BF16 runs them in BF16 too, with the
same score-path pin ('int8+bf16'). A dynamically quantized file (MatMulInteger) gains nothing from
INT8 here: the plugin converts the integers back and runs its multiplies in FP32.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

from evit_deploy.export.score_path import LayerInfo, topk_score_layers
from evit_deploy.export.validate import Outputs, Runner
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.install import OPENVINO_INSTALL
from evit_deploy.metadata import ArtifactMetadata
from evit_deploy.precisions import BF16, FP32, check_precision, chosen_at_load, run_precision
from evit_deploy.runtime.base import Backend, NodeTime, cpu_name

HINTS = {FP32: "f32", BF16: BF16}
METADATA_KEY = "evit_deploy"  # IR: the metadata props under this rt_info section
PRECISE = "precise_0"  # ov::DisableFP16Compression's runtime-info key
TAIL_BF16 = "enforceBF16evenForGraphTail"  # CPU plugin: convert even nodes that feed an output
OV_KINDS = {"TopK": "TOPK", "Softmax": "SOFTMAX", "MatMul": "MATRIX_MULTIPLY", "Constant": "CONSTANT"}


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise UsageError(f"the openvino backend needs OpenVINO: {OPENVINO_INSTALL}") from None
    return openvino


def check_inference_precision(precision: str) -> str:
    """An inference precision OpenVINO can be asked for, and BF16 only where the CPU has it."""
    check_precision(precision, chosen_at_load("openvino"), "OpenVINO")
    if precision == BF16:
        from evit_deploy.runtime.cpu_features import missing_bf16, probe_cpu

        problem = missing_bf16(probe_cpu())
        if problem:
            raise UsageError(f"--precision bf16: {problem}")
    return precision


def read_model(path: str | Path):
    """(ov.Model, metadata) of an exported .onnx, or of an IR .xml written by evit-deploy."""
    ov = import_openvino()
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from evit_deploy.metadata import load_onnx, onnx_metadata

        metadata = onnx_metadata(load_onnx(path), path)  # its external data checked too
    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:
        raise EvitDeployError(f"OpenVINO cannot read {path}: {str(exc).strip().splitlines()[0]}") from exc
    if path.suffix.lower() != ".onnx":
        metadata = ir_metadata(model, path)
    return model, metadata


def ir_metadata(model, source: str | Path) -> ArtifactMetadata:
    if not model.has_rt_info([METADATA_KEY]):
        return ArtifactMetadata.from_props({}, str(source))  # the one 'no metadata' error
    section = model.get_rt_info()[METADATA_KEY]
    props = {key: model.get_rt_info([METADATA_KEY, key]).astype(str) for key in section}
    return ArtifactMetadata.from_props(props, str(source))


def stamp_ir_metadata(model, metadata: ArtifactMetadata) -> None:
    for key, value in metadata.to_props().items():
        model.set_rt_info(value, [METADATA_KEY, key])


def model_layers(model) -> tuple[list[LayerInfo], dict]:
    """The model's ops as LayerInfo (unique op names, outputs named 'op:port'), and name -> op."""
    layers, ops = [], {}
    for op in model.get_ordered_ops():
        name = op.get_name()
        ops[name] = op
        inputs = tuple(
            f"{value.get_node().get_name()}:{value.get_index()}" for value in op.input_values()
        )
        outputs = tuple(f"{name}:{port}" for port in range(op.get_output_size()))
        layers.append(LayerInfo(name, OV_KINDS.get(op.get_type_name(), op.get_type_name().upper()), inputs, outputs))
    return layers, ops


def score_path_ops(model) -> list:
    """The ops on every TopK's score path, TopK first (graph order of the drop blocks)."""
    layers, ops = model_layers(model)
    return [ops[name] for name in topk_score_layers(layers)]


def topk_ops(model) -> list:
    return [op for op in model.get_ordered_ops() if op.get_type_name() == "TopK"]


def _constant_scalar(value) -> bool:
    node = value.get_node()
    return node.get_type_name() == "Constant" and int(np.prod(node.get_output_shape(0) or [1])) == 1


def _swaps_last_axes(node) -> bool:
    """A Transpose by a constant permutation that swaps only the last two axes."""
    if node.get_type_name() != "Transpose":
        return False
    perm = node.input_value(1).get_node()
    if perm.get_type_name() != "Constant":
        return False
    order = [int(v) for v in perm.get_data().reshape(-1)]
    rank = len(order)
    return rank >= 2 and order == [*range(rank - 2), rank - 1, rank - 2]


def pin_score_path(model) -> list[str]:
    """Mark every score-path op `precise` (in place), rewriting the Softmax and the Q.K^T MatMul
    first into the forms the CPU plugin keeps (see the module doc). Returns the friendly names
    of the marked ops (the ONNX node names they came from)."""
    from openvino import opset1, opset13

    marked = []
    for op in score_path_ops(model):
        if op.get_type_name() != "Softmax":
            marked.append(op)
            continue
        value = op.input_value(0)
        scale = None
        node = value.get_node()
        if node.get_type_name() == "Multiply" and _constant_scalar(node.input_value(1)):
            scale, value = node.input_value(1), node.input_value(0)
            marked = [m for m in marked if m is not node]
        matmul = value.get_node()
        rank = op.get_output_partial_shape(0).rank
        if matmul.get_type_name() != "MatMul" or not rank.is_static:
            marked.append(op)  # an unexpected form: marked as it is (checked after compiling)
            continue
        attributes = matmul.get_attributes()
        a, b = matmul.input_value(0), matmul.input_value(1)
        transpose_b = attributes["transpose_b"]
        if not transpose_b and _swaps_last_axes(b.get_node()):
            b, transpose_b = b.get_node().input_value(0), True
        if scale is not None:  # (Q.K^T) * s == (Q * s).K^T; s = head_dim^-0.5, a power of 2 for 64
            a = opset1.multiply(a, scale).output(0)
            a.get_node().set_friendly_name(f"{matmul.get_friendly_name()}/scale")
            marked.append(a.get_node())
        new_matmul = opset13.matmul(a, b, attributes["transpose_a"], transpose_b)
        new_matmul.set_friendly_name(matmul.get_friendly_name())
        softmax = opset1.softmax(new_matmul, rank.get_length() - 1)
        softmax.set_friendly_name(op.get_friendly_name())
        op.output(0).replace(softmax.output(0))
        marked = [m for m in marked if m is not matmul] + [new_matmul, softmax]
    for node in marked:
        node.get_rt_info()[PRECISE] = ""
    return [node.get_friendly_name() for node in marked]


def compile_model(
    model,
    precision: str = FP32,
    threads: int | None = None,
    fp32_topk_scores: bool = True,
    index_outputs: bool = False,
    perf_count: bool = False,
):
    """Compile an ov.Model for the CPU at `precision`. index_outputs: also output each TopK's
    indices (for validation), without changing the precisions the deployed model runs;
    perf_count: keep per-node execution times (profiles)."""
    ov = import_openvino()
    pinned = precision == BF16 and fp32_topk_scores
    if precision == BF16 and not pinned and index_outputs:
        # An output makes the plugin keep the nodes feeding it in FP32 up to the nearest MatMul:
        # the score path would then run in FP32 here but in BF16 in the deployed model.
        for op in score_path_ops(model):
            op.get_rt_info()[TAIL_BF16] = "true"  # RTMap takes str or int; the plugin parses it
    if pinned:
        pin_score_path(model)
    if index_outputs:
        model.add_outputs([op.output(1) for op in topk_ops(model)])
    config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if perf_count:
        config["PERF_COUNT"] = "YES"
    core = ov.Core()
    if not pinned:
        return core.compile_model(model, "CPU", config)
    with tempfile.TemporaryDirectory(prefix="evit-ov-") as tmp:  # the attribute's round trip
        xml = Path(tmp) / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        return core.compile_model(core.read_model(str(xml)), "CPU", config)


def runtime_precisions(compiled, names: set[str]) -> dict[str, str]:
    """Runtime precision of each compiled node that came from one of `names` (friendly names)."""
    found = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        originals = set(info["originalLayersNames"].astype(str).split(","))
        for name in originals & names:
            found[name] = info["runtimePrecision"].astype(str)
    return found


class OpenVINOBackend(Backend):
    name = "openvino"
    options = ("precision", "threads", "fp32_topk_scores")
    profiles = True
    thread_safe = False  # one infer request, reused

    def __init__(
        self,
        path: str | Path,
        device: str | None = None,
        precision: str = FP32,
        threads: int | None = None,
        fp32_topk_scores: bool = True,
    ):
        if device not in (None, "auto", "cpu"):
            raise UsageError(f"the openvino backend runs on the CPU here; got --device {device}")

        self.path = Path(path)
        self.threads = threads
        self.requested_precision = precision
        self.precision = check_inference_precision(precision)
        self.fp32_topk_scores = fp32_topk_scores and precision == BF16
        model, self.metadata = read_model(self.path)
        self.score_path = [op.get_friendly_name() for op in score_path_ops(model)]
        try:
            self.compiled = compile_model(model, precision, threads, fp32_topk_scores)
        except Exception as exc:
            raise EvitDeployError(
                f"OpenVINO cannot compile {self.path.name}: {str(exc).strip().splitlines()[0]}"
            ) from exc
        self.request = self.compiled.create_infer_request()
        if self.fp32_topk_scores:
            lowered = sorted(n for n, p in self.score_path_precisions().items() if p != "f32")
            if lowered:  # another OpenVINO version may handle the attribute differently
                warnings.warn(
                    f"OpenVINO {import_openvino().__version__} runs {len(lowered)} TopK score-path "
                    f"node(s) in BF16 despite the FP32 request (e.g. {lowered[0]})",
                    stacklevel=2,
                )
        self.provider = "CPU" + (", TopK scores FP32" if self.fp32_topk_scores else "")
        self.precision = run_precision(self.metadata.precision, precision)
        self.device_name = cpu_name()
        self.output_port = self.compiled.output(self.metadata.output_name)

    def close(self) -> None:
        self.request = self.compiled = self.output_port = None

    def profile(self, batch: np.ndarray, runs: int) -> list[NodeTime]:
        """OpenVINO's performance counters, from a second compilation with the same settings:
        each executed node of the runtime graph with the ONNX nodes it came from (a fused
        attention subgraph names all of them)."""
        model, _ = read_model(self.path)
        compiled = compile_model(
            model, self.requested_precision, self.threads, self.fp32_topk_scores, perf_count=True
        )
        request = compiled.create_infer_request()
        request.infer({self.metadata.input_name: batch})  # warm-up, not counted
        times: dict[str, float] = {}
        for _ in range(runs):
            request.infer({self.metadata.input_name: batch})
            for info in request.get_profiling_info():
                if info.status == info.Status.EXECUTED:
                    times[info.node_name] = times.get(info.node_name, 0.0) + info.real_time.total_seconds() * 1000 / runs
        nodes = []
        for op in compiled.get_runtime_model().get_ops():
            name, info = op.get_friendly_name(), op.get_rt_info()
            if name in times:
                sources = tuple(s for s in info["originalLayersNames"].astype(str).split(",") if s)
                nodes.append(NodeTime(name, info["layerType"].astype(str), times[name], sources))
        return nodes

    def run(self, batch: np.ndarray) -> np.ndarray:
        result = self.request.infer({self.metadata.input_name: batch})
        return np.asarray(result[self.output_port], dtype=np.float32)

    def run_prepared(self, prepared: object) -> None:
        self.request.infer({self.metadata.input_name: prepared}, share_inputs=True, share_outputs=True)

    def score_path_precisions(self) -> dict[str, str]:
        """Runtime precision of every score-path node (what the plugin actually chose)."""
        return runtime_precisions(self.compiled, set(self.score_path))

    def describe(self) -> dict:
        return {**super().describe(), "fp32_topk_scores": self.fp32_topk_scores}


def save_ir(model, metadata: ArtifactMetadata, xml: str | Path) -> Path:
    """Write `model` as OpenVINO IR (.xml + .bin, FP32 weights) carrying the metadata."""
    ov = import_openvino()
    stamp_ir_metadata(model, metadata)
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return Path(xml)


def openvino_runner(
    path: str | Path,
    precision: str = FP32,
    fp32_topk_scores: bool = True,
    threads: int | None = None,
) -> Runner:
    """An .onnx (or IR .xml) on OpenVINO's CPU plugin at `precision`, each TopK's indices exposed
    as extra outputs without changing the precision any node runs in (so BF16 is judged as the
    openvino backend runs it)."""
    model, meta = read_model(path)
    check_inference_precision(precision)
    index_names = [op.output(1) for op in topk_ops(model)]
    compiled = compile_model(model, precision, threads, fp32_topk_scores, index_outputs=True)
    outputs = list(compiled.outputs)
    logits_port = compiled.output(meta.output_name)
    index_ports = outputs[len(outputs) - len(index_names):]
    request = compiled.create_infer_request()

    def run(images: np.ndarray) -> Outputs:
        result = request.infer({meta.input_name: images})
        return Outputs(
            np.asarray(result[logits_port], dtype=np.float32),
            [np.asarray(result[port]).astype(np.int64) for port in index_ports],
        )

    return run
