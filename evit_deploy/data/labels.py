"""ImageNet-1k class names shipped with the package (index order = sorted WordNet ids)."""

from __future__ import annotations

from functools import cache

from pathlib import Path

IMAGENET_CLASSES = Path(__file__).resolve().parents[1] / "assets" / "imagenet_classes.tsv"


@cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """(wnid, name) for the 1000 classes, in class-index order."""
    rows = IMAGENET_CLASSES.read_text(encoding="utf-8").splitlines()
    return tuple(tuple(row.split("\t", 1)) for row in rows if row)


def class_names(metadata) -> tuple[str, ...]:
    """The artifact's own class names; ImageNet's for a 1000-class head that names none;
    'class N' otherwise."""
    if metadata.classes:
        return tuple(metadata.classes)
    return default_class_names(metadata.num_classes)


@cache
def default_class_names(num_classes: int) -> tuple[str, ...]:
    if num_classes == 1000:
        return tuple(name for _, name in imagenet_classes())
    return tuple(f"class {i}" for i in range(num_classes))
