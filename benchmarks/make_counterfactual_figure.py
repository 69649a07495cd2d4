"""The README's counterfactual figure: a label map, its edited version, the original scan and the inpainted
counterfactual (this patient, with the lesion grown or moved), made by the project's own tools.

    python -m benchmarks.make_counterfactual_figure --ckpt runs/diffusion-demo/last.ckpt
    python -m benchmarks.make_counterfactual_figure --ckpt DIFF.ckpt --image IMG.nii.gz --labels LAB.nii.gz \\
        --op move --offset-mm 12 0 0 --out assets/counterfactual.png

Without --image/--labels the scan is a held-out case of the embedded demo data set (the test split recorded
next to the checkpoint in split.json, else the last case). The label map is edited with `dataset.edit_labels`
(default: the lesion class, the last one, grown by --factor), the region is every voxel whose label changed, and
`ddpm.inpaint` regenerates it (grown by --margin-mm); everything outside stays the scan's own voxels.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from utils.errors import UserError, exit_on_user_error  # noqa: E402


def demo_cases(ckpt: Path, n: int = 1) -> list[tuple[Path, Path, str]]:
    """(image, labels, case id) of `n` demo cases, held-out ones first (the test split recorded next to the
    checkpoint in split.json), then the others from the last."""
    from hydra import compose, initialize_config_dir

    from dataset.demo import ensure_demo_dataset
    from dataset.layout import find_cases
    from dataset.split import read_split
    from utils.paths import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="check", overrides=["dataset=demo"]).dataset
    ensure_demo_dataset(cfg)
    cases = find_cases(cfg)
    split_file = ckpt.parent / "split.json"
    held_out = set(read_split(split_file).get("test", [])) if split_file.is_file() else set()
    ordered = [c for c in cases if c.case_id in held_out] + [c for c in reversed(cases) if c.case_id not in held_out]
    return [(c.image_path, c.label_path, c.case_id) for c in ordered[:n]]


def edit(labels: np.ndarray, affine: np.ndarray, class_index: int, args, source: str) -> tuple[np.ndarray, str]:
    from dataset.edit_labels import EditOptions, as_label_array, edit_label_map

    labels = as_label_array(labels, source)
    op_args = {"scale": {"factor": args.factor}, "move": {"offset_mm": args.offset_mm}}[args.op]
    options = EditOptions(host_classes=args.host_classes, forbidden_classes=args.forbidden_classes)
    result = edit_label_map(labels, affine, args.op, class_index, options=options, source=source, **op_args)
    return result.labels, result.summary()


def choose_case(args, class_index: int) -> tuple[Path, Path, str]:
    """The given scan, or the first demo case (held-out ones first) whose label map holds `class_index`."""
    from dataset.io import load_nifti

    if args.image is not None:
        return args.image, args.labels, args.image.name
    for image_path, label_path, name in demo_cases(args.ckpt, n=1000):
        if np.any(load_nifti(label_path)[0] == class_index):
            return image_path, label_path, name
    raise UserError(f"no demo case holds class {class_index}; pass --class-index or --image/--labels")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="stage-2 checkpoint (runs/diffusion-demo/last.ckpt)")
    parser.add_argument("--image", type=Path, default=None, help="real scan (default: a held-out demo case)")
    parser.add_argument("--labels", type=Path, default=None, help="its label map (with --image)")
    parser.add_argument("--op", choices=["scale", "move"], default="scale")
    parser.add_argument("--class-index", type=int, default=None,
                        help="class to edit (default: the model's last class, the lesion in the demo)")
    parser.add_argument("--factor", type=float, default=1.8, help="--op scale: growth factor")
    parser.add_argument("--offset-mm", type=float, nargs=3, default=[12.0, 0.0, 0.0], help="--op move: shift")
    parser.add_argument("--host-classes", type=int, nargs="+", default=None,
                        help="classes the edited lesion must stay inside (default: the class around it); the demo "
                             "lesion borders grey matter and CSF, so the README figure uses --host-classes 1 2 3")
    parser.add_argument("--forbidden-classes", type=int, nargs="*", default=[],
                        help="classes the edited lesion must not touch, e.g. 0 (background)")
    parser.add_argument("--margin-mm", type=float, default=6.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--resample", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "assets" / "counterfactual.png")
    parser.add_argument("--overwrite", action="store_true")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    import torch

    from dataset.io import load_nifti
    from ddpm.checkpoint import load_diffusion
    from ddpm.inpaint import InpaintSettings, check_same_grid, inpaint_volume
    from ddpm.inpaint_figure import save_panels
    from ddpm.synthesis import Synthesizer
    from utils.atomic import check_writable
    from utils.device import resolve_device

    if not args.ckpt.is_file():
        raise UserError(f"{args.ckpt}: checkpoint not found; train the demo first (bash demo.sh) or pass --ckpt")
    if (args.image is None) != (args.labels is None):
        raise UserError("--image and --labels go together (or give neither for a demo case)")
    check_writable(args.out, args.overwrite)
    device = resolve_device(args.device)
    model, meta = load_diffusion(args.ckpt, map_location=device)
    class_index = args.class_index if args.class_index is not None else model.label_nc - 1
    image_path, label_path, name = choose_case(args, class_index)
    image, affine = load_nifti(image_path)
    labels, label_affine = load_nifti(label_path)
    check_same_grid((image, affine, str(image_path)), (labels, label_affine, str(label_path)), "label map")
    edited, summary = edit(labels, affine, class_index, args, str(label_path))
    region = edited != labels
    settings = InpaintSettings(steps=args.steps, resample=args.resample, margin_mm=args.margin_mm)
    settings.check(model.schedule.timesteps)
    synth = Synthesizer(model, meta, device, windows_per_call=4)
    result = inpaint_volume(synth, image, affine, edited, region, settings=settings,
                            generator=torch.Generator().manual_seed(args.seed),
                            names=(str(image_path), "edited labels", "changed voxels"))
    difference = result.image.astype(np.float32) - image.astype(np.float32)
    panels = [("label map", labels, "label"), ("edited label map", edited, "label"), ("original scan", image, "image"),
              ("inpainted counterfactual", result.image, "image"), ("counterfactual - original", difference,
                                                                   "difference")]
    save_panels(args.out, panels, result.zone, affine, label_nc=synth.label_nc, overwrite=args.overwrite,
                title=f"{name}: {summary}\nregenerated zone outlined (ddim {args.steps} steps, resample "
                      f"{args.resample}, margin {args.margin_mm:g} mm)")
    print(args.out, flush=True)
    return args.out


if __name__ == "__main__":
    main()
