"""The report's configuration and the names of its output files."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from engine.runtime import EngineError

_logger = logging.getLogger(__name__)

MARKER = ".engine-report"
MAX_HEATMAP_CLASSES = 30
OUTPUTS = ("index.html", "index-*.html", "classes", "thumbs", "report.json")
IMPORTED = "import:"
QUERY_BLOCK = 4096


@dataclass(frozen=True)
class ReportConfig:
    """per_class: rejected rows shown per class page; thumb: thumbnail size in px (longer side);
    neighbors: nearest neighbors per shown row (0: none); heatmap_classes: classes in the
    similarity heatmap (2-30); classes_per_page: classes per list page; workers: threads
    reading shards (None: up to 4)."""

    per_class: int = 24
    thumb: int = 96
    neighbors: int = 5
    heatmap_classes: int = 20
    classes_per_page: int = 100
    workers: int | None = None

    def __post_init__(self):
        limits = {
            "per_class": (1, 10_000),
            "thumb": (16, 512),
            "neighbors": (0, 50),
            "heatmap_classes": (2, MAX_HEATMAP_CLASSES),
            "classes_per_page": (1, 10_000),
            "workers": (1, 64),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if value is None and name == "workers":
                continue
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not low <= value <= high:
                raise EngineError(f"{name.replace('_', '-')}: got {value!r}, expected an integer in [{low}, {high}]")
            object.__setattr__(self, name, int(value))  # numpy integers would not serialise to JSON
