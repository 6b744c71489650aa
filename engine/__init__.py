"""engine: a CLIP embedding cache and CLIPCleaner selection engine for noisy labels.

The public API, imported lazily (nothing runs at import time)::

    from engine import Cache, embed_shards, EmbedConfig, select_samples, SelectConfig
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EngineError": "engine.runtime",
    "Cache": "engine.cache",
    "EmbedConfig": "engine.embed",
    "embed_shards": "engine.embed",
    "write_prompts": "engine.embed",
    "load_model": "engine.models",
    "list_model_names": "engine.models",
    "load_classes": "engine.classes",
    "import_npz": "engine.importer",
    "SelectConfig": "engine.select",
    "SelectionResult": "engine.select",
    "select_samples": "engine.select",
    "selection_metrics": "engine.select",
    "fit_linear": "engine.classifiers",
    "zeroshot_log_probs": "engine.classifiers",
    "CLASSIFIERS": "engine.classifiers",
    "Selection": "engine.results",
    "Neighbors": "engine.results",
    "Training": "engine.results",
    "IndexConfig": "engine.index",
    "build_index": "engine.index",
    "knn_all": "engine.index",
    "TrainConfig": "engine.train",
    "train_head": "engine.train",
    "train_with_baselines": "engine.train",
    "load_head": "engine.train",
    "predict": "engine.train",
    "select_from_cache": "engine.stages",
    "diagnose_from_cache": "engine.stages",
    "index_from_cache": "engine.stages",
    "train_from_cache": "engine.stages",
    "predict_from_cache": "engine.stages",
    "ShapesConfig": "engine.synthetic",
    "write_shards": "engine.synthetic",
    "ReportConfig": "engine.report",
    "write_report": "engine.report",
    "PackConfig": "engine.pack",
    "pack_dataset": "engine.pack",
    "export_cache": "engine.export",
    "export_table": "engine.export",
    "export_shards": "engine.export",
    "ShardExportConfig": "engine.export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return __all__
