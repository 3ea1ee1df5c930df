"""TensorRT engines: ONNX pre-check, FP16/FP32 builds, and the engine file with its header.

Modules are imported where used (build: engines.tensorrt; file format: engines.header), so that
importing one of them, e.g. from `evit-deploy doctor`, does not pull in the others' dependencies.
"""
