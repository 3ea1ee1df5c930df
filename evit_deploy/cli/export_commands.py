"""Commands that make artifacts: export (checkpoint -> validated ONNX), quantize (INT8) and
build-engine (TensorRT). The library is imported inside each command, so `--help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from evit_deploy.cli.app import command, console, err_console
from evit_deploy.cli.options import Output, evit_options, output_options, settings_text
from evit_deploy.cli.progress import stages
from evit_deploy.cli.render import validation_table
from evit_deploy.model.config import EvitOverrides


@command()
@evit_options()
@output_options()
def export(
    checkpoint: Optional[Path] = typer.Option(
        None, help=".pth/.pt (official EViT or timm) or .safetensors; none: random weights."
    ),
    opset: int = typer.Option(18, help="ONNX opset (18 to 23; LayerNorm is a single node)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output .onnx path."),
    with_token_indices: bool = typer.Option(
        False, "--with-token-indices", help="Also output each drop block's kept-token indices."
    ),
    labels: Optional[Path] = typer.Option(
        None, help="Class names, one per line in class-id order (default: labels.txt beside the checkpoint)."
    ),
    validate_dir: Optional[Path] = typer.Option(
        None, help="Also validate on every image in this folder (e.g. held-out data; needed for fp16)."
    ),
    precision: str = typer.Option("fp32", help="fp32, or fp16: FP16 weights and compute with FP32 islands (float32 I/O)."),
    fp32_islands: str = typer.Option(
        "topk_scores", help="fp16 only: what stays FP32, comma-separated: topk_scores (the class attention TopK ranks), layernorm; or none."
    ),
    accept_failed_gates: bool = typer.Option(False, "--accept-failed-gates", help="fp16: write the file even if it misses a precision gate (recorded in its metadata)."),
    evit: EvitOverrides = EvitOverrides(),
    out: Output = Output(),
) -> None:
    """Export a checkpoint to ONNX, validated against PyTorch.

    The ONNX has a dynamic batch and is written only once it matches PyTorch."""
    from evit_deploy.export import export_onnx
    from evit_deploy.export.onnx import check_export_precision, check_opset
    from evit_deploy.export.validate import ValidationFailed
    from evit_deploy.fileio import check_can_write
    from evit_deploy.model.checkpoint import build_model, checkpoint_config

    check_opset(opset)
    if output is not None:
        check_can_write(output, out.force)
    islands = () if fp32_islands.strip() == "none" else tuple(p.strip() for p in fp32_islands.split(",") if p.strip())
    check_export_precision(precision, islands, validate_dir)
    title = "Validation: ONNX Runtime vs PyTorch" + (f" FP32 ({precision}, FP32 islands: {', '.join(islands) or 'none'})" if precision != "fp32" else "")
    try:
        with stages("loading model") as shown:
            config, state = checkpoint_config(checkpoint, evit)
            if output is None:
                output = check_can_write(default_onnx_name(config, precision), out.force)
            net = build_model(config, checkpoint, state=state, labels=labels)
            result = export_onnx(
                net,
                output,
                opset=opset,
                force=out.force,
                with_token_indices=with_token_indices,
                validate_dir=validate_dir,
                precision=precision,
                fp32_islands=islands,
                accept_failed_gates=accept_failed_gates,
                on_step=shown.step,
                on_progress=shown.advance,
            )
    except ValidationFailed as failed:
        (err_console if out.as_json else console).print(validation_table(failed.report, title))
        raise
    meta = result.metadata
    if not out.as_json:
        console.print(validation_table(result.report, title))
        if meta.gates_missed:
            err_console.print(
                f"[yellow]warning:[/] written although it missed the gates (--accept-failed-gates): "
                f"{escape(result.report.failure_summary())}",
                highlight=False, soft_wrap=True,
            )
        summary = [
            f"[bold green]exported[/] {escape(str(result.path))} ({result.size_bytes / 2**20:.1f} MiB, opset {result.opset}, {meta.precision}"
            + (f", FP32 islands: {', '.join(meta.fp32_islands) or 'none'})" if meta.precision == "fp16" else ")"),
            f"model           {settings_text(meta)}",
            f"TopK K          {meta.topk_k or 'none (plain ViT)'}",
            f"tokens/block    {meta.tokens_per_block}",
            f"classes         {len(meta.classes)}: {', '.join(meta.classes)}" if meta.classes
            else f"classes         {meta.num_classes} ({'ImageNet names' if meta.num_classes == 1000 else 'unnamed'})",
            f"next            evit-deploy bench {escape(str(result.path))} --batch 64",
        ]
        for line in summary:
            console.print(line, soft_wrap=True, highlight=False)
    record = {
        "path": str(result.path),
        "size_bytes": result.size_bytes,
        "opset": result.opset,
        "metadata": meta.to_dict(),
        "validation": result.report.to_dict(),
    }
    out.emit(record)


def default_onnx_name(config, precision: str = "fp32") -> str:
    suffix = f"_keep{config.keep_rate:g}" if config.is_evit else ""
    size = f"_{config.img_size}px" if config.img_size != 224 else ""
    kind = f".{precision}" if precision != "fp32" else ""
    return f"{config.model}{suffix}{size}{kind}.onnx"


@command()
@output_options()
def quantize(
    model: Path = typer.Argument(..., help="An FP32 ONNX exported with `evit-deploy export`."),
    calibration: Optional[Path] = typer.Option(None, help="Images to calibrate activation ranges on (static, nncf)."),
    method: str = typer.Option("dynamic", help="dynamic (ONNX Runtime, no calibration; passes the gates on the shipped model), static (ONNX Runtime QDQ) or nncf."),
    calibration_images: int = typer.Option(256, help="Calibrate on at most this many images, spread over the folder."),
    validate_dir: Optional[Path] = typer.Option(None, help="Held-out images (class folders) the INT8 model is judged on."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output path (default: MODEL.int8.onnx)."),
    accept_failed_gates: bool = typer.Option(False, "--accept-failed-gates", help="Write the file even if it misses a precision gate (recorded in its metadata)."),
    out: Output = Output(),
) -> None:
    """Quantize an exported ONNX to INT8, validated against FP32.

    The TopK score path stays in float. The INT8 file is judged against the FP32 one on held-out
    images; nothing is written when a precision gate is missed."""
    from evit_deploy.export.quantize import default_int8_name, quantize_onnx
    from evit_deploy.export.validate import ValidationFailed

    output = output or default_int8_name(model)
    title = f"Validation: INT8 ({method}) vs FP32, ONNX Runtime"
    try:
        with stages(f"quantizing {model.name}") as shown:
            result = quantize_onnx(
                model, output, method=method, calibration_dir=calibration, calibration_images=calibration_images,
                validate_dir=validate_dir, accept_failed_gates=accept_failed_gates, force=out.force,
                on_step=shown.step, on_progress=shown.advance,
            )
    except ValidationFailed as missed:
        (err_console if out.as_json else console).print(validation_table(missed.report, title))
        raise
    meta = result.metadata
    record = {
        "path": str(result.path),
        "size_bytes": result.size_bytes,
        "metadata": meta.to_dict(),
        "validation": result.report.to_dict(),
    }
    if out.as_json:
        out.emit(record)
        return
    console.print(validation_table(result.report, title))
    if not result.report.passed:
        err_console.print(
            f"[yellow]warning:[/] written although it missed the gates (--accept-failed-gates): "
            f"{escape(result.report.failure_summary())}",
            highlight=False, soft_wrap=True,
        )
    calibration_info = meta.quantization.get("calibration")
    console.print(f"[bold green]quantized[/] {escape(str(result.path))} ({result.size_bytes / 2**20:.1f} MiB, int8, {method})", highlight=False)
    fp32 = meta.quantization["fp32_nodes"]
    console.print(f"kept in float   TopK score path: {fp32['topk_score_path']} nodes, fused token: {fp32['fused_token']}", highlight=False)
    if calibration_info:
        console.print(f"calibration     {escape(calibration_info['folder'])} ({calibration_info['images']} images)", highlight=False)
    console.print(f"next            evit-deploy bench {escape(str(result.path))} --batch 1,8", soft_wrap=True, highlight=False)
    out.emit(record)


@command(name="build-engine")
@output_options()
def build_engine_command(
    model: Path = typer.Argument(..., help="An ONNX exported with `evit-deploy export` (FP32, or FP16 from `export --precision fp16`)."),
    fp16: bool = typer.Option(True, "--fp16/--fp32", help="FP16 where the GPU has fast FP16: an FP32 ONNX is converted to FP16 with FP32 islands first, an FP16 ONNX builds as it is; or FP32 throughout (TF32 off). Always a strongly typed network."),
    min_batch: int = typer.Option(1, help="Smallest batch the engine accepts."),
    opt_batch: int = typer.Option(64, help="Batch size the kernels are tuned for."),
    max_batch: int = typer.Option(128, help="Largest batch the engine accepts (the Predictor splits larger ones)."),
    workspace: Optional[float] = typer.Option(None, metavar="GB", help="TensorRT workspace limit in GB (default: the GPU's memory)."),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache file, reused and updated (default: one per TensorRT version and GPU in the evit-deploy cache)."),
    fp32_layers: Optional[list[str]] = typer.Option(None, "--fp32-layers", metavar="PATTERN", help="Converting an FP32 ONNX: also keep ONNX nodes in FP32 whose name contains this text (or matches this glob); repeatable."),
    fp32_topk_scores: bool = typer.Option(True, "--fp32-topk-scores/--fp16-topk-scores", help="Converting an FP32 ONNX: keep the class-attention scores that TopK ranks in FP32."),
    fp32_layernorm: bool = typer.Option(False, "--fp32-layernorm", help="Converting an FP32 ONNX: keep every LayerNorm in FP32."),
    detailed_profile: bool = typer.Option(False, "--detailed-profile", help="Keep per-layer details (types, precisions) in the engine for TensorRT's engine inspector."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Engine path (default: MODEL.fp16.plan or MODEL.fp32.plan)."),
    device: Optional[str] = typer.Option(None, help="cuda or cuda:N (default: the current GPU)."),
    out: Output = Output(),
) -> None:
    """Build a TensorRT engine carrying the model's metadata.

    Strongly typed, dynamic batch, FP16 by default."""
    from evit_deploy.engines.settings import BatchProfile, BuildSettings
    from evit_deploy.engines.tensorrt import build_engine

    islands = [name for name, wanted in (("topk_scores", fp32_topk_scores), ("layernorm", fp32_layernorm)) if wanted]
    settings = BuildSettings(
        precision="fp16" if fp16 else "fp32",
        profile=BatchProfile(min_batch, opt_batch, max_batch),
        workspace_gb=workspace,
        fp32_layers=tuple(fp32_layers or ()),
        fp32_islands=tuple(islands),
        timing_cache=str(timing_cache) if timing_cache else "",
        detailed_profile=detailed_profile,
    )
    with stages(f"building an engine from {model.name}") as shown:
        result = build_engine(model, output, settings, out.force, device, on_step=shown.step)
    header = result.header
    record = {
        "path": str(result.path),
        "size_bytes": result.size_bytes,
        "seconds": result.seconds,
        "timing_cache": str(result.timing_cache),
        "timing_cache_saved": result.timing_cache_saved,
        "converted_to_fp16": result.converted,
        "tensorrt_warnings": result.tensorrt_warnings,
        "header": header.to_dict(),
    }
    if out.as_json:
        out.emit(record)
        return
    profile = header.settings.profile
    console.print(
        f"[bold green]built[/] {result.path} ({result.size_bytes / 2**20:.1f} MiB, "
        f"{header.precision}, strongly typed, {result.seconds:.0f} s)"
    )
    console.print(f"for             TensorRT {header.tensorrt_version}, {header.gpu_name} (compute capability {header.compute_capability})")
    console.print(f"batch profile   min {profile.min}, opt {profile.opt}, max {profile.max}; input {header.input_shape}")
    if header.precision == "fp16":
        source = "converted here from FP32" if result.converted else "FP16 graph as exported"
        islands = ", ".join(header.fp32_islands) or "none"
        console.print(f"FP32 islands    {islands}: {len(header.fp32_layers)} nodes ({source})")
    cache_note = "" if result.timing_cache_saved else " (not saved)"
    console.print(f"timing cache    {result.timing_cache}{cache_note}")
    for message in result.tensorrt_warnings[:5]:
        err_console.print(f"[yellow]TensorRT:[/] {escape(message)}", highlight=False)
    if len(result.tensorrt_warnings) > 5:
        err_console.print(f"[yellow]TensorRT:[/] {len(result.tensorrt_warnings) - 5} more warning(s) (--json lists all)")
    console.print(f"next            evit-deploy bench {escape(str(result.path))} --batch {profile.opt}", soft_wrap=True)
    out.emit(record)

