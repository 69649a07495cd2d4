"""Writing results: strict JSON (inf as the string "inf", NaN as null), CSV, and a console summary. Shared by
the evaluate, segmentation and memorization tools; every file is written atomically."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from utils.atomic import atomic_path


def skipped(reason: str) -> dict:
    return {"skipped": True, "reason": reason}


def json_safe(value):
    """Plain JSON types: numpy scalars/arrays converted, +-inf -> "inf"/"-inf", NaN -> None, paths -> str."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(data: dict, path: Path, overwrite: bool) -> Path:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    return path


def write_csv(rows: list[dict], path: Path, overwrite: bool) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with atomic_path(path, overwrite) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return path


def _csv_value(value):
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else repr(float(value))
    return value


def format_value(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.4g}")
    return str(value)


def print_summary(title: str, metrics: dict) -> None:
    """One line per metric: its value, or `skipped: <reason>`."""
    print(title)
    width = max((len(name) for name in metrics), default=0)
    for name, entry in metrics.items():
        if entry.get("skipped"):
            print(f"  {name:<{width}}  skipped: {entry['reason']}")
        else:
            extra = f" ± {format_value(entry['std'])}" if "std" in entry else ""
            print(f"  {name:<{width}}  {format_value(entry.get('value'))}{extra}")
