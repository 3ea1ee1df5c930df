"""Commands for serving: serve (Triton via PyTriton), client, loadtest and triton-repo."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from evit_deploy import interrupt
from evit_deploy.cli.app import command, console, err_console
from evit_deploy.cli.options import (
    BACKEND, DEVICE, FORCE, PRECISION, Output, evit_options, output_options, precision_options,
    settings_text,
)
from evit_deploy.cli.progress import stages
from evit_deploy.cli.render import predictions_table, print_load_test
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.model.config import EvitOverrides


@command()
@evit_options()
def serve(
    artifact: Path = typer.Argument(..., help=".onnx or .plan/.engine (or a .pth/.safetensors checkpoint)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Triton HTTP port (KServe v2); gRPC, metrics and REST default to port+1, +2, +3."),
    grpc_port: Optional[int] = typer.Option(None, help="Triton gRPC port (default: port+1)."),
    metrics_port: Optional[int] = typer.Option(None, help="Triton Prometheus metrics port (default: port+2)."),
    rest_port: Optional[int] = typer.Option(None, help="REST front for image uploads and /metrics (default: port+3)."),
    model_name: str = typer.Option("evit", help="Model name on the Triton protocol."),
    max_batch: int = typer.Option(64, help="Largest batch the dynamic batcher forms."),
    max_delay_ms: float = typer.Option(5.0, help="Longest a request waits for others to batch with."),
    max_queue: int = typer.Option(1024, help="Queued requests beyond this are answered 503 at once."),
    workers: int = typer.Option(1, help="Model instances, each with its own Predictor (CPU threads are split)."),
    backend: str = BACKEND,
    device: Optional[str] = DEVICE,
    precision: Optional[str] = PRECISION,
    max_body_mb: float = typer.Option(10.0, help="Largest image upload on the REST front (413 beyond)."),
    body_timeout: float = typer.Option(60.0, help="Seconds an upload may take to arrive in full (408 beyond)."),
    min_upload_rate: float = typer.Option(4.0, help="KB/s an upload must keep up after its first 5 s (408 below)."),
    max_restarts: int = typer.Option(3, help="Times the model backend is started again after it dies, within 10 minutes; then exit 1."),
    shutdown_timeout: int = typer.Option(30, help="Seconds to finish in-flight requests on Ctrl-C / SIGTERM."),
    verbose: bool = typer.Option(False, "--verbose", help="Print Triton's own log."),
    evit: EvitOverrides = EvitOverrides(),
) -> None:
    """Serve an artifact with Triton Inference Server.

    Through PyTriton: dynamic batching, HTTP/gRPC, health, Prometheus metrics, plus a REST
    endpoint for JPEG/PNG uploads. Ctrl-C or SIGTERM stops it gracefully, with exit status 0."""
    from evit_deploy.serve import EvitServer, ServeOptions

    options = ServeOptions(
        host=host, port=port, grpc_port=grpc_port, metrics_port=metrics_port, rest_port=rest_port,
        model_name=model_name, max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
        workers=workers, max_body_mb=max_body_mb, body_timeout_s=body_timeout,
        min_upload_kb_per_s=min_upload_rate, max_restarts=max_restarts, shutdown_timeout_s=shutdown_timeout,
        verbose=verbose,
    )
    if not verbose:  # PyTriton's notes (Triton exiting with failure when serve restarts it): serve says it
        logging.getLogger("pytriton").setLevel(logging.CRITICAL)
    server = EvitServer(artifact, options, backend=backend, device=device, evit=evit,
                        backend_options=precision_options(precision))
    started = False
    try:
        with stages(f"loading {artifact.name} and starting Triton Inference Server"):
            server.start()
        started = True
        meta, urls, backend_info = server.metadata, server.urls, server.predictors[0].backend
        console.print(
            f"[bold green]serving[/] {artifact.name} ({settings_text(meta)}) on "
            f"{backend_info.name} ({backend_info.provider}) as Triton model '{model_name}': batches up to "
            f"{server.max_batch}, wait up to {max_delay_ms:g} ms, queue {max_queue}, {workers} instance(s)"
        )
        console.print(f"tensors (KServe v2)  POST {urls['http']}/v2/models/{model_name}/infer   gRPC {urls['grpc']}")
        console.print(f"images               POST {urls['rest']}/v1/models/{model_name}/predict  (JPEG/PNG body)")
        console.print(f"health               GET  {urls['http']}/v2/health/ready")
        console.print(f"metrics              GET  {urls['rest']}/metrics  (Triton's {urls['metrics']} + batch sizes)")
        console.print("Ctrl-C or SIGTERM stops after in-flight requests finish", style="dim")
        server.wait()
    except KeyboardInterrupt:
        if not started:
            raise
        interrupt.handled()  # a stop is how a server ends: exit 0 once in-flight requests finish
        err_console.print("stopping: finishing in-flight requests")
    finally:
        server.stop()
    err_console.print("stopped")


@command()
@output_options()
def client(
    images: list[Path] = typer.Argument(..., metavar="IMAGE...", help="JPEG/PNG files to classify on a running server."),
    url: str = typer.Option("http://127.0.0.1:8000", help="The server's Triton HTTP URL."),
    rest_url: Optional[str] = typer.Option(None, help="The server's REST front (default: --url's port + 3)."),
    model_name: str = typer.Option("evit", help="Model name on the server."),
    topk: int = typer.Option(5, help="Classes to report per image."),
    out: Output = Output(),
) -> None:
    """Classify images on a running `evit-deploy serve`.

    The images are uploaded to its REST front."""
    from evit_deploy.client import Client

    missing = [str(image) for image in images if not image.is_file()]
    if missing:
        raise EvitDeployError(f"image not found: {', '.join(missing)}")
    with Client(url, model_name, rest_url=rest_url) as remote:
        results = [remote.predict_image(image, topk=topk) for image in images]
    if not out.as_json:
        console.print(predictions_table(f"model '{model_name}' at {url}", images, results))
    out.emit([{"image": str(i), **r} for i, r in zip(images, results)])


@command()
@evit_options()
@output_options()
def loadtest(
    url: str = typer.Argument("http://127.0.0.1:8000", help="The server's Triton HTTP URL."),
    concurrency: int = typer.Option(32, help="Concurrent clients (threads, one connection each)."),
    requests: int = typer.Option(2000, help="Requests in all."),
    batch: int = typer.Option(1, help="Images per request."),
    model_name: str = typer.Option("evit", help="Model name on the server."),
    artifact: Optional[Path] = typer.Option(
        None, help="Check each answer against Predictor.logits at batch 1 on this artifact "
        "(default: against the first answer for the same input)."
    ),
    max_seconds: float = typer.Option(600.0, help="Stop sending after this long."),
    evit: EvitOverrides = EvitOverrides(),
    out: Output = Output(),
) -> None:
    """Load a server with concurrent clients and check answers.

    Latency percentiles, throughput, errors and wrong answers; exits 1 if any request failed or
    was answered with a wrong result."""
    from evit_deploy.client import load_test
    from evit_deploy.runtime.backends import check_overrides

    if artifact is None and evit:
        raise UsageError("the EViT settings (--model, --keep-rate, ...) go with --artifact")
    if artifact is not None:
        check_overrides(artifact, "auto", evit)
    with stages(f"{requests} requests from {concurrency} clients to {url}"):
        result = load_test(
            url, model=model_name, concurrency=concurrency, requests=requests, batch=batch,
            artifact=artifact, evit=evit, max_seconds=max_seconds,
        )
    if not out.as_json:
        print_load_test(result, url, model_name, concurrency, batch)
    out.emit(result.to_dict())
    if result.errors or result.mismatches:
        raise typer.Exit(1)


@command(name="triton-repo")
def triton_repo(
    artifact: Path = typer.Argument(..., help=".onnx, or an evit-deploy .plan/.engine."),
    output: Path = typer.Option(..., "--output", "-o", help="Model repository folder (created if missing)."),
    model_name: str = typer.Option("evit", help="Model name (the folder under --output)."),
    instances: int = typer.Option(1, help="Model instances per device (instance_group count)."),
    max_batch: int = typer.Option(64, help="max_batch_size (capped at a TensorRT engine's profile max)."),
    preferred_batch: str = typer.Option("", help="Preferred batch sizes for the dynamic batcher, e.g. 16,32."),
    max_queue_delay_us: int = typer.Option(100, help="Dynamic batcher's max_queue_delay_microseconds."),
    max_queue: int = typer.Option(1024, help="Queue limit (rejected beyond; 0: unbounded)."),
    kind: str = typer.Option("auto", help="Instance kind for ONNX: auto, gpu or cpu (plans: gpu)."),
    force: bool = FORCE,
    platform: str = typer.Option("auto", help="auto (from the file), onnxruntime, tensorrt, or openvino (Triton's OpenVINO backend, CPU)."),
    precision: str = typer.Option("fp32", help="--platform openvino: fp32 (serves the ONNX) or bf16 (writes OpenVINO IR, TopK scores FP32)."),
    threads: Optional[int] = typer.Option(None, help="--platform openvino: inference threads per instance (default: all cores)."),
) -> None:
    """Write a Triton model repository for an artifact.

    config.pbtxt, the model and its labels, for Triton Inference Server."""
    from evit_deploy.serve.triton_repo import write_triton_repo

    result = write_triton_repo(
        artifact, output, model_name=model_name, instances=instances, max_batch=max_batch,
        preferred_batch=preferred_batch, max_queue_delay_us=max_queue_delay_us, max_queue=max_queue,
        kind=kind, force=force, platform=platform, precision=precision, threads=threads,
    )
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    console.print(f"[bold green]wrote[/] {result.model_dir} ({result.spec.platform}, max_batch_size {result.spec.max_batch_size}, {instances} instance(s))")
    console.print(f"next            tritonserver --model-repository {escape(str(output.resolve()))}", soft_wrap=True)

