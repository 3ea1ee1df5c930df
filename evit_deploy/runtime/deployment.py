"""A deployment folder: the artifact `evit-deploy optimize` chose, and deployment.json saying how
to run it (backend, precision, load options) and why (the gates it passed, what was measured, on
which machine). Everything that loads an artifact accepts the folder and runs it as recorded;
options given explicitly still win."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from evit_deploy.errors import EvitDeployError

DEPLOYMENT_FILE = "deployment.json"
FORMAT = "evit-deploy deployment"
VERSION = 1


@dataclass(frozen=True)
class Deployment:
    folder: Path
    artifact: Path  # inside folder
    backend: str
    precision: str
    options: dict  # load_backend options (openvino: precision)
    record: dict  # the whole deployment.json

    @property
    def machine(self) -> dict:
        return self.record.get("machine", {})


def is_deployment(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / DEPLOYMENT_FILE).is_file()


def read_deployment(folder: str | Path) -> Deployment:
    folder = Path(folder)
    path = folder / DEPLOYMENT_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT:
            raise ValueError(f"format is not '{FORMAT}'")
        if record.get("version") != VERSION:
            raise ValueError(f"version {record.get('version')}, this evit-deploy reads {VERSION}")
        artifact = folder / record["artifact"]
        if Path(record["artifact"]).name != record["artifact"]:
            raise ValueError("artifact must be a file name inside the folder")
        deployment = Deployment(
            folder, artifact, str(record["backend"]), str(record["precision"]), dict(record["options"]), record
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvitDeployError(f"cannot read {path}: {exc}") from None
    if not artifact.is_file():
        raise EvitDeployError(f"{path} names {record['artifact']}, which is not in {folder}")
    return deployment


def resolve_artifact(path: str | Path, backend: str, options: dict) -> tuple[Path, str, dict]:
    """(artifact file, backend, options) to load: a deployment folder's recorded ones (the options
    only where its backend is the one used; options given explicitly win), anything else as it
    is. Warns when the folder was chosen on another machine."""
    if not is_deployment(path):
        return Path(path), backend, options
    deployment = read_deployment(path)
    chosen = deployment.backend if backend == "auto" else backend
    recorded = deployment.options if chosen == deployment.backend else {}
    recorded_machine, here = deployment.machine, this_machine()
    if recorded_machine and recorded_machine != here:
        warnings.warn(
            f"{path} was optimized on another CPU ({machine_text(recorded_machine)}; this one: "
            f"{machine_text(here)}): the fastest faithful path may differ here (run `evit-deploy "
            "optimize` again)",
            stacklevel=3,
        )
    return deployment.artifact, chosen, {**recorded, **{k: v for k, v in options.items() if v is not None}}


def this_machine() -> dict:
    """The CPU as deployment.json records it: its name and the instruction sets that decide which
    precision is fastest."""
    from evit_deploy.runtime.cpu_features import probe_cpu

    cpu = probe_cpu(with_openvino=False)
    return {"name": cpu.name, "features": [label for label, present in cpu.flags.items() if present]}


def machine_text(machine: dict) -> str:
    return f"{machine.get('name') or 'unknown CPU'}, {', '.join(machine.get('features', [])) or 'no listed features'}"
