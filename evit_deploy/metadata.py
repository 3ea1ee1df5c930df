"""What a runtime needs to know about an artifact, carried inside it (ONNX metadata_props, and the
TensorRT engine header). Runtimes read settings from here instead of asking the user again.

An ONNX file's metadata is read by a scan of its top-level protobuf fields, without the onnx
package or parsing the graph, so `evit-deploy info` on an exported model answers at once."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import BinaryIO

from evit_deploy.version import __version__
from evit_deploy.errors import EvitDeployError
from evit_deploy.model.config import (
    CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATION, EvitConfig, Preprocessing,
)
from evit_deploy.precisions import FP32

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def token_index_output_name(block: int) -> str:
    return f"kept_indices_block{block}"


@dataclass(frozen=True)
class ArtifactMetadata:
    model: str
    keep_rate: float
    drop_loc: list[int]
    fuse_token: bool
    img_size: int
    num_classes: int
    tokens_per_block: list[int]
    topk_k: list[int]
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    crop_pct: float = CROP_PCT
    interpolation: str = INTERPOLATION
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    token_index_outputs: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # the model's class names; [] = unnamed
    checkpoint: str = ""  # absolute path of the source checkpoint; "" for random weights
    weights: str = ""  # "random:SEED" or "sha256:DIGEST" of the checkpoint
    evit_deploy_version: str = __version__
    precision: str = FP32  # the graph's: fp32, or int8 for a quantized file
    quantization: dict = field(default_factory=dict)  # int8: method, calibration set
    fp32_islands: list[str] = field(default_factory=list)  # fp16: the parts kept in FP32
    # how the file was validated (ValidationReport.record): gates, passed, missed, held-out numbers,
    # and accepted_failed_gates where it was written despite a missed gate
    validation: dict = field(default_factory=dict)

    @property
    def gates_missed(self) -> list[str]:
        """The gates this file missed and was written anyway (--accept-failed-gates); [] if none."""
        return list(self.validation.get("missed", [])) if self.validation.get("accepted_failed_gates") else []

    @classmethod
    def from_model(cls, model, with_token_indices: bool = False) -> "ArtifactMetadata":
        """The metadata of an EViT module: its config, weights provenance, class names and the
        preprocessing its checkpoint was trained with."""
        return cls.from_config(
            model.config, model.checkpoint, model.weights, with_token_indices,
            classes=list(model.classes), **model.preprocessing.to_dict(),
        )

    @classmethod
    def from_config(
        cls,
        config: EvitConfig,
        checkpoint: str = "",
        weights: str = "",
        with_token_indices: bool = False,
        **extra,
    ) -> "ArtifactMetadata":
        """extra: classes and the preprocessing fields (mean, std, crop_pct, interpolation)."""
        plan = config.token_plan
        drop_blocks = [b.block for b in plan if b.keep is not None]
        return cls(
            model=config.model,
            keep_rate=config.keep_rate,
            drop_loc=list(config.drop_loc),
            fuse_token=config.fuse_token,
            img_size=config.img_size,
            num_classes=config.num_classes,
            tokens_per_block=[b.tokens_in for b in plan],
            topk_k=[b.keep for b in plan if b.keep is not None],
            token_index_outputs=[token_index_output_name(b) for b in drop_blocks]
            if with_token_indices
            else [],
            checkpoint=checkpoint,
            weights=weights,
            **extra,
        )

    def to_config(self) -> EvitConfig:
        return EvitConfig(
            self.model,
            self.keep_rate,
            tuple(self.drop_loc),
            self.fuse_token,
            self.img_size,
            self.num_classes,
        )

    def preprocessing(self) -> Preprocessing:
        """The input transform, validated (a damaged crop_pct would make preprocessing costly)."""
        return Preprocessing(tuple(self.mean), tuple(self.std), self.crop_pct, self.interpolation)

    def to_dict(self) -> dict:
        """Typed JSON values (lists, numbers, booleans), for files and --json output."""
        return asdict(self)

    def to_props(self) -> dict[str, str]:
        """Flat string key/values (ONNX metadata_props); non-strings JSON-encoded."""
        return {
            k: v if isinstance(v, str) else json.dumps(v) for k, v in asdict(self).items()
        }

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "artifact") -> "ArtifactMetadata":
        names = {f.name: f for f in fields(cls)}
        missing = [f.name for f in names.values() if f.name not in props and _required(f)]
        if missing:
            raise EvitDeployError(
                f"{source} carries no evit-deploy metadata (missing {', '.join(missing)}), so its "
                f"input size, normalisation and token plan are unknown: re-export it from its "
                f"checkpoint with `evit-deploy export`"
            )
        try:
            values = {
                name: props[name] if f.type == "str" else json.loads(props[name])
                for name, f in names.items()
                if name in props
            }
            values.setdefault("validation", _earlier_validation(props))
            metadata = cls(**values)
            metadata.to_config()  # the same validation as the settings of an export
            metadata.preprocessing()  # and as a checkpoint's input transform
            if metadata.classes and len(metadata.classes) != metadata.num_classes:
                raise ValueError(
                    f"{len(metadata.classes)} class names for {metadata.num_classes} classes"
                )
        except (TypeError, ValueError, EvitDeployError) as exc:
            raise EvitDeployError(
                f"{source} has damaged evit-deploy metadata ({exc}); re-export it with "
                f"`evit-deploy export`"
            ) from None
        return metadata


def _earlier_validation(props: dict[str, str]) -> dict:
    """What files written before the `validation` field said of missed gates (fp16:
    gates_missed; int8: inside quantization), so that they still say so."""
    if "gates_missed" in props:
        missed = json.loads(props["gates_missed"])
        return {"missed": missed, "accepted_failed_gates": bool(missed)}
    quantization = json.loads(props.get("quantization", "{}"))
    if "validation" in quantization:
        return {**quantization["validation"], "accepted_failed_gates": quantization.get("accepted_failed_gates", False)}
    return {}


def _required(f) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def load_onnx(path: str | Path):
    """An ONNX file's graph and metadata (external weights not loaded); a missing, empty or
    unparsable file is one EvitDeployError."""
    import onnx

    path = _onnx_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise _unreadable(path) from exc
    check_external_data(model, path)
    return model


def check_external_data(model, path: Path) -> None:
    """Weights stored beside an ONNX file must stay in its folder: a location that leads out of it
    (`../x.bin`, an absolute path) would read any file on the machine as weights."""
    from onnx import TensorProto

    folder = path.resolve().parent
    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        if not (folder / location).resolve().is_relative_to(folder):
            raise EvitDeployError(
                f"{path}: the weights of {tensor.name} are stored outside its folder ({location}); "
                "external data must be a file beside the model"
            )


def read_onnx_metadata(path: str | Path) -> ArtifactMetadata:
    """The evit-deploy metadata of an exported file, its graph skipped (no onnx import either):
    ModelProto.metadata_props is field 14, each entry a key (1) and a value (2)."""
    path = _onnx_file(path)
    props = {}
    try:
        with open(path, "rb") as stream:
            end = stream.seek(0, 2)
            stream.seek(0)
            for _, entry in _length_fields(stream, end, {14}):
                pair = dict(_length_fields(io.BytesIO(entry), len(entry), {1, 2}))
                props[pair.get(1, b"").decode()] = pair.get(2, b"").decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise _unreadable(path) from exc
    return ArtifactMetadata.from_props(props, str(path))


def _length_fields(stream: BinaryIO, end: int, wanted: set[int]) -> Iterator[tuple[int, bytes]]:
    """(field number, bytes) of the length-delimited fields in `wanted` of a protobuf message that
    ends at `end`, every other field skipped; ValueError where the bytes are no such message."""
    while stream.tell() < end:
        number, wire_type = divmod(_varint(stream), 8)
        if wire_type == 2:
            length = _varint(stream)
            if stream.tell() + length > end:
                raise ValueError(f"field {number} runs past the end")
            if number in wanted:
                yield number, stream.read(length)
            else:
                stream.seek(length, 1)
        elif wire_type == 0:
            _varint(stream)
        elif wire_type in (1, 5):  # fixed 64 and 32 bits
            stream.seek(8 if wire_type == 1 else 4, 1)
        else:
            raise ValueError(f"wire type {wire_type}")


def _varint(stream: BinaryIO) -> int:
    value = shift = 0
    while byte := stream.read(1):
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
    raise ValueError("cut short")


def _onnx_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise EvitDeployError(f"ONNX file not found: {path}")
    if path.is_dir():
        raise EvitDeployError(f"{path} is a directory; give an ONNX file")
    if path.stat().st_size == 0:
        raise EvitDeployError(f"ONNX file {path} is empty (0 bytes); export it again")
    return path


def _unreadable(path: Path) -> EvitDeployError:
    return EvitDeployError(f"cannot read ONNX file {path} (truncated or corrupted?)")


def stamp_metadata(model, metadata: ArtifactMetadata) -> None:
    """Write `metadata` into a loaded ONNX model (onnx.ModelProto), replacing what it carried."""
    import onnx

    del model.metadata_props[:]
    for key, value in metadata.to_props().items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    model.producer_name = "evit-deploy"
    model.producer_version = metadata.evit_deploy_version


def onnx_metadata(model, source: str | Path) -> ArtifactMetadata:
    """The evit-deploy metadata stamped on a loaded ONNX model (onnx.ModelProto); refused when it
    has none."""
    return ArtifactMetadata.from_props({p.key: p.value for p in model.metadata_props}, str(source))
