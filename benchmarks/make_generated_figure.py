"""The README's generated-pairs figure: label maps from the label-map generator and the scans stage 2 made from
them, and a row where only the requested lesion volume changes (a `ddpm.generate sweep=...` folder).

    python -m benchmarks.make_generated_figure --pairs runs/labels-demo-eval/pairs \\
        --sweep runs/labels-demo-eval/sweep --out assets/generated.png

Each column is one axial slice through the centroid of the map's lesion (the sweep: through the lesion of the
row's largest request, the same slice for the whole row), the label map above its scan.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from utils.errors import UserError, exit_on_user_error  # noqa: E402


def read_pairs(folder: Path) -> list[dict]:
    """Rows of `attributes.csv` with the pair's label map and scan loaded (the ddpm.generate layout images_labels)."""
    from dataset.io import load_nifti

    table = folder / "attributes.csv"
    if not table.is_file():
        raise UserError(f"{table}: not found; pass an output folder of python -m ddpm.generate")
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["label"] = load_nifti(folder / "labels" / f"{row['case_id']}.nii.gz")[0].astype(np.int64)
        row["image"] = load_nifti(folder / "images" / f"{row['case_id']}.nii.gz")[0].astype(np.float32)
    return rows


def lesion_slice(label: np.ndarray, lesion: int) -> int:
    """Axial index through the lesion's centroid (the middle slice without a lesion)."""
    where = np.argwhere(label == lesion)
    return int(round(where[:, 2].mean())) if len(where) else label.shape[2] // 2


def sweep_row(rows: list[dict], key: str) -> list[dict]:
    """The sweep's first row: for each requested value (ascending) its first pair, gen<j*n> of value j."""
    values = sorted({float(r[key]) for r in rows})
    return [min((r for r in rows if float(r[key]) == value), key=lambda r: r["case_id"]) for value in values]


def volume_title(row: dict, lesion_name: str) -> str:
    requested = row.get(f"requested_{lesion_name}_volume_ml")
    measured = float(row[f"measured_{lesion_name}_volume_ml"])
    return (f"asked {float(requested):.1f} mL\n" if requested not in (None, "") else "") + f"made {measured:.1f} mL"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, required=True, help="ddpm.generate output: attributes drawn")
    parser.add_argument("--sweep", type=Path, required=True, help="ddpm.generate sweep={lesion_volume_ml:[...]} output")
    parser.add_argument("--n-pairs", type=int, default=5, help="columns of the first block")
    parser.add_argument("--lesion-class", type=int, default=None, help="default: the last class (the demo lesion)")
    parser.add_argument("--lesion-name", default="lesion", help="the lesion class name in attributes.csv")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "assets" / "generated.png")
    parser.add_argument("--overwrite", action="store_true")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddpm.previews import LABEL_COLORMAP
    from utils.atomic import atomic_path, check_writable

    check_writable(args.out, args.overwrite)
    pairs = read_pairs(args.pairs)[: args.n_pairs]
    sweep = read_pairs(args.sweep)
    if not pairs or not sweep:
        raise UserError(f"{args.pairs if not pairs else args.sweep}: attributes.csv lists no pairs")
    label_nc = int(max(int(r["label"].max()) for r in pairs + sweep)) + 1
    lesion = args.lesion_class if args.lesion_class is not None else label_nc - 1
    row = sweep_row(sweep, f"requested_{args.lesion_name}_volume_ml")
    sweep_slice = lesion_slice(row[-1]["label"], lesion)
    columns = max(len(pairs), len(row))
    colours = plt.get_cmap(LABEL_COLORMAP)(np.arange(label_nc) % 20)[:, :3]
    fig, axes = plt.subplots(4, columns, figsize=(1.9 * columns, 8.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    blocks = [(0, pairs, [lesion_slice(r["label"], lesion) for r in pairs]), (2, row, [sweep_slice] * len(row))]
    for top, items, slices in blocks:
        for col, (item, z) in enumerate(zip(items, slices)):
            image = item["image"][:, :, z]
            low, high = np.percentile(item["image"], [1, 99])
            axes[top, col].imshow(colours[item["label"][:, :, z]].transpose(1, 0, 2), origin="lower")
            axes[top, col].set_title(f"{item['case_id']}\n{volume_title(item, args.lesion_name)}", fontsize=8)
            axes[top + 1, col].imshow(image.T, cmap="gray", vmin=low, vmax=high, origin="lower")
    axes[0, 0].text(-0.1, 0.5, "generated map", transform=axes[0, 0].transAxes, rotation=90, va="center",
                    ha="right", fontsize=9)
    axes[1, 0].text(-0.1, 0.5, "its scan", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right",
                    fontsize=9)
    axes[2, 0].text(-0.1, 0.5, "only the volume\nrequest changes", transform=axes[2, 0].transAxes, rotation=90,
                    va="center", ha="right", fontsize=9)
    fig.suptitle("Generated label maps (attributes drawn from training) and their synthetic scans;\nbelow, one noise "
                 "seed with the requested lesion volume swept", fontsize=9)
    fig.tight_layout()
    with atomic_path(args.out, overwrite=args.overwrite) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    print(args.out, flush=True)
    return args.out


if __name__ == "__main__":
    main()
