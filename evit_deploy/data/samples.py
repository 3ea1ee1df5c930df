"""The images of a folder and their classes, as export's validation, quantize's calibration,
eval and bench read them.

Layout: DATA_DIR/<class folder>/<images> as ImageNet val is usually unpacked. Classes come from,
in this order: a labels file (image path or class folder -> class index or WordNet id); folder
names that are the model's own class names (from its metadata); folder names that are ImageNet
WordNet ids (their index in the ImageNet class list, so a subset of the 1000 folders still gets
the right labels); otherwise the sorted folder order, as torchvision's ImageFolder does, when the
folder count equals the model's class count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evit_deploy.data.labels import imagenet_classes
from evit_deploy.errors import EvitDeployError, UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


@dataclass(frozen=True)
class Sample:
    path: Path
    target: int


def find_images(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursively, hidden entries skipped), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvitDeployError(f"image folder not found: {folder}")
    files = sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise EvitDeployError(
            f"no images in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


def imagenet_wnid_index() -> dict[str, int]:
    return {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}


def read_labels_file(path: Path) -> dict[str, int]:
    """`name class` per line (tab, comma or space separated): name is an image path relative to
    the data folder (with or without its suffix) or a class folder; class is an index or an
    ImageNet WordNet id. Blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvitDeployError(f"cannot read labels file {path}: {exc}") from None
    wnids = imagenet_wnid_index()
    labels = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        separator = "\t" if "\t" in line else "," if "," in line else None
        parts = [p.strip() for p in line.split(separator, 1)]
        value = parts[1].split()[0] if len(parts) > 1 and parts[1].strip() else ""
        if value.isdigit():
            labels[parts[0]] = int(value)
        elif value in wnids:
            labels[parts[0]] = wnids[value]
        else:
            raise EvitDeployError(
                f"{path}:{number}: expected 'name class' with a class index or ImageNet WordNet "
                f"id, got '{line}'"
            )
    if not labels:
        raise EvitDeployError(f"labels file {path} has no entries")
    return labels


def find_samples(
    data_dir: str | Path,
    num_classes: int,
    labels_file: str | Path | None = None,
    class_names: Sequence[str] = (),
) -> list[Sample]:
    """Every image under data_dir with its class index, in sorted path order. class_names: the
    model's own names, which folders may be named after."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvitDeployError(f"data folder not found: {data_dir}")
    images = find_images(data_dir)
    if labels_file is not None:
        samples = _samples_from_labels(data_dir, images, read_labels_file(Path(labels_file)))
    else:
        samples = _samples_from_folders(data_dir, images, num_classes, class_names)
    if not samples:
        raise EvitDeployError(f"no images in the class folders of {data_dir}")
    bad = [s for s in samples if not 0 <= s.target < num_classes]
    if bad:
        raise EvitDeployError(
            f"{len(bad)} image(s) have a class outside the model's 0..{num_classes - 1}, e.g. "
            f"{bad[0].path} -> {bad[0].target}"
        )
    return samples


def _samples_from_labels(
    data_dir: Path, images: list[Path], labels: dict[str, int]
) -> list[Sample]:
    samples, unlabelled = [], []
    for path in images:
        relative = path.relative_to(data_dir)
        keys = (relative.as_posix(), relative.with_suffix("").as_posix(), relative.parts[0])
        target = next((labels[k] for k in keys if k in labels), None)
        if target is None:
            unlabelled.append(relative)
        else:
            samples.append(Sample(path, target))
    if unlabelled:
        raise EvitDeployError(
            f"the labels file gives no class for {len(unlabelled)} image(s), e.g. {unlabelled[0]}"
        )
    return samples


def _samples_from_folders(
    data_dir: Path, images: list[Path], num_classes: int, class_names: Sequence[str]
) -> list[Sample]:
    in_folders = [p for p in images if len(p.relative_to(data_dir).parts) > 1]
    folders = sorted({p.relative_to(data_dir).parts[0] for p in in_folders})
    if images and not folders:
        raise UsageError(
            f"{data_dir} has images but no class folders: lay it out as DATA_DIR/<wnid>/<images> "
            "or pass --labels FILE"
        )
    wnids = imagenet_wnid_index()
    if class_names and folders and all(f in class_names for f in folders):
        index = {f: list(class_names).index(f) for f in folders}
    elif num_classes == len(wnids) and folders and all(f in wnids for f in folders):
        index = {f: wnids[f] for f in folders}
    elif len(folders) == num_classes:
        index = {f: i for i, f in enumerate(folders)}
    else:
        raise UsageError(
            f"cannot tell the classes of {data_dir}: its {len(folders)} folders (e.g. "
            f"'{folders[0] if folders else ''}') are not ImageNet WordNet ids, nor one per class "
            f"of the model's {num_classes}; pass --labels FILE"
        )
    return [Sample(p, index[p.relative_to(data_dir).parts[0]]) for p in in_folders]


def spread_subset(samples: Sequence[Sample], limit: int | None) -> list[Sample]:
    """`limit` samples evenly spread over the sorted list, so every class folder is represented
    (the first N of ImageNet val would all be tench)."""
    if limit is None or limit >= len(samples):
        return list(samples)
    if limit <= 0:
        raise UsageError(f"--limit must be positive, got {limit}")
    return [samples[i * len(samples) // limit] for i in range(limit)]
