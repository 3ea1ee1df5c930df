"""TensorRT backend: an evit-deploy engine run with the TensorRT 10/11 name-based I/O API.

I/O buffers are torch CUDA tensors (no pycuda). Each run sets the input shape for its batch,
points the execution context at the buffers and enqueues with execute_async_v3 on a private CUDA
stream, bracketed by CUDA events that measure the GPU compute time. Output buffers grow when a
larger batch arrives and are reused for smaller ones. One execution context holds per-call state,
so the backend is not thread-safe (the Predictor serialises calls). TensorRT's messages go to the
process-wide logger (engines.tensorrt.tensorrt_logger); each load and run marks where its own
messages start.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from evit_deploy.engines.header import check_compatible, read_engine
from evit_deploy.engines.tensorrt import require_tensorrt_gpu, tensorrt_logger, torch_dtype_name
from evit_deploy.errors import EvitDeployError
from evit_deploy.runtime.base import Backend


class TensorRTBackend(Backend):
    name = "tensorrt"
    thread_safe = False

    def __init__(self, path: str | Path, device: str | None = None):
        import torch

        self.path = Path(path)
        # The header first: a damaged file or a foreign plan is reported as such on any machine.
        header, plan = read_engine(self.path)
        trt, gpu = require_tensorrt_gpu(
            device,
            f"loading {self.path.name} (built with TensorRT {header.tensorrt_version} for "
            f"{header.gpu_name})",
        )
        warning = check_compatible(
            header, trt.__version__, gpu.name, gpu.compute_capability, self.path.name
        )
        if warning:
            warnings.warn(warning, stacklevel=2)
        self.header = header
        self.metadata = header.metadata
        self.precision = header.precision
        self.device_name = gpu.name
        self.provider = f"TensorRT {trt.__version__}"
        self.device = torch.device("cuda", gpu.index)
        self._logger = tensorrt_logger(trt)
        loading = self._logger.start(f"load {self.path.name}")
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(plan)
            loading.raise_if_interrupted()
            if self.engine is None:
                raise EvitDeployError(
                    f"TensorRT cannot load {self.path.name} ("
                    + (" | ".join(loading.errors[-3:]) or "no details")
                    + "); rebuild it with `evit-deploy build-engine`"
                )
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise EvitDeployError(
                    f"TensorRT cannot create an execution context for {self.path.name} (out of GPU memory?)"
                )
            self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [self.metadata.input_name]:
            raise EvitDeployError(
                f"{self.path.name} has inputs {inputs}, expected ['{self.metadata.input_name}']"
            )
        self.input_name = inputs[0]
        self.output_names = [n for n in names if n not in inputs]
        self._dtypes = {
            n: getattr(torch, torch_dtype_name(self.engine.get_tensor_dtype(n).name)) for n in names
        }
        low, _, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(low[0]), int(high[0])
        self._buffers: dict[str, torch.Tensor] = {}
        self._shape: tuple[int, ...] | None = None  # the input shape the context has
        self._gpu_ms: list[float] = []
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def prepare(self, batch: np.ndarray):
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(batch))
        return tensor.to(self.device, self._dtypes[self.input_name]).contiguous()

    def run_prepared(self, prepared) -> dict:
        """Run on a CUDA input tensor; returns every output (views into reused buffers, valid
        until the next run) once the stream has finished."""
        import torch

        batch = int(prepared.shape[0])
        if not self.min_batch <= batch <= self.max_batch:
            raise EvitDeployError(
                f"batch {batch} is outside {self.path.name}'s profile [{self.min_batch}, "
                f"{self.max_batch}]; the Predictor splits and pads batches, or rebuild with "
                f"--min-batch/--max-batch"
            )
        context = self.context
        shape = tuple(prepared.shape)
        running = self._logger.start(f"run {self.path.name}, batch {batch}")
        if shape != self._shape:  # the whole shape: run_prepared takes any tensor
            if not context.set_input_shape(self.input_name, shape):
                raise EvitDeployError(
                    f"TensorRT rejected input shape {shape} for {self.path.name}: "
                    + (" | ".join(running.errors[-3:]) or "no details")
                )
            self._shape = shape
        context.set_tensor_address(self.input_name, prepared.data_ptr())
        outputs = {name: self._output(name) for name in self.output_names}
        for name, tensor in outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the input copy
        with torch.cuda.device(self.device):
            self._start.record(self.stream)
            ok = context.execute_async_v3(self.stream.cuda_stream)
            self._end.record(self.stream)
        self.stream.synchronize()
        running.raise_if_interrupted()
        if not ok:
            raise EvitDeployError(
                f"TensorRT failed to run {self.path.name}: "
                + (" | ".join(running.errors[-3:]) or "no details")
            )
        self._gpu_ms.append(self._start.elapsed_time(self._end))
        return outputs

    def close(self) -> None:
        """The execution context before the engine, the engine before the runtime (TensorRT's
        order), then the output buffers."""
        self.context = None
        self.engine = None
        self._runtime = None
        self._buffers.clear()

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_all(batch)[self.metadata.output_name]

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output as numpy (logits float32; token indices where the engine has them)."""
        outputs = self.run_prepared(self.prepare(batch))
        return {
            name: (t.float() if t.is_floating_point() else t).cpu().numpy()
            for name, t in outputs.items()
        }

    def take_gpu_compute_ms(self) -> list[float]:
        taken, self._gpu_ms = self._gpu_ms, []
        return taken

    def _output(self, name: str):
        """A buffer of the shape TensorRT infers for the current input shape, grown on demand."""
        import torch

        shape = tuple(self.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise EvitDeployError(f"TensorRT could not infer the shape of output '{name}': {shape}")
        count = int(np.prod(shape))
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < count:
            buffer = torch.empty(count, dtype=self._dtypes[name], device=self.device)
            self._buffers[name] = buffer
        return buffer[:count].view(shape)
