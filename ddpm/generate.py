"""New (image, label map) pairs in one command:

    python -m ddpm.generate labels_ckpt=LABELS.ckpt ckpt=DIFF.ckpt n=50 out=DIR [lesion_volume_ml=12
        lesion_count=2 lesion_centroid=[0.3,0.5,0.6]] [layout=images_labels|nnunet] [seed=0] [overwrite=false]

For k = 0..n-1, case `gen<kkkk>`: the lesion attributes (the requested ones, the rest drawn jointly from one
training case of the label-map generator, among the `draw_nearest` agreeing ones nearest to the request:
`dataset.attributes.draw_case`), a label map from the generator
(`ddpm.label_generator`, on the model grid at the training spacing) and a scan synthesised from it by stage 2
(`ddpm.synthesis.Synthesizer`, as `ddpm.sample` does). The output folder is a data set of this project and of
nnU-Net: `images/<id>.nii.gz` + `labels/<id>.nii.gz` (layout=images_labels) or `imagesTr/<id>_0000.nii.gz` +
`labelsTr/<id>.nii.gz` + `dataset.json` (layout=nnunet), plus `attributes.csv` (per case `case_id`, its
`seed_index` k, the attributes the map was generated for as `requested_<class>_<attribute>` and what it shows as
`measured_<class>_<attribute>`, `dataset.attributes.as_row` columns) and `generate.json` (checkpoints, settings,
versions). Pair k depends only on `seed` and k. `sweep={lesion_volume_ml: [1, 2, 4, 8]}` (any one `lesion_*` key):
n pairs for each value, the k-th pair of every value with the same seeds and drawn case, so along a row of pairs
only the swept attribute changes (ids run on: value j's pair k is gen<j*n + k>); a volume or count sweep draws that
case as for its largest value, the request hardest to place.

Everything is checked before anything is written: the checkpoints (and that both were trained on the same data
settings), the requested attributes (negative volume, centroid outside [0, 1], unknown class, ...), that the
training data shows a case agreeing with them, the memory one synthesis needs, and that no output exists
(without `overwrite=true`); each file is written atomically.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dataset.attributes import REQUEST_KEYS, as_row, check_requested, draw_case, fill_attributes, measure
from dataset.io import save_nifti
from dataset.layout import LAYOUT_FOLDERS
from dataset.validate import class_names
from ddpm.checkpoint import file_sha256, load_diffusion
from ddpm.label_checkpoint import load_label_generator
from ddpm.label_generator import attribute_vector, grid_affine
from ddpm.sample import resolve_device, sampler_settings, versions
from ddpm.synthesis import GIB, Synthesizer
from ddpm.windowed import parse_window
from evaluation.report import write_csv, write_json
from utils.atomic import check_writable
from utils.checkpoint import check_data_settings
from utils.errors import UserError, exit_on_user_error

CASE_PREFIX = "gen"
NNUNET_CHANNEL = {"ct": "CT", "mr": "MR"}  # nnU-Net normalises a channel named CT by HU statistics


def case_ids(n: int) -> list[str]:
    return [f"{CASE_PREFIX}{index:04d}" for index in range(n)]


def case_paths(out: Path, layout: str, case_id: str) -> dict[str, Path]:
    images, labels = LAYOUT_FOLDERS[layout]
    image_name = f"{case_id}_0000.nii.gz" if layout == "nnunet" else f"{case_id}.nii.gz"
    return {"image": out / images / image_name, "label": out / labels / f"{case_id}.nii.gz"}


def stream_seeds(seed: int, index: int) -> tuple[int, int, int]:
    """Independent seeds of pair `index`: attribute draw, label-map noise, image noise."""
    states = np.random.SeedSequence([int(seed), int(index)]).generate_state(3, dtype=np.uint64)
    return tuple(int(s >> 1) for s in states)


def plain(value):
    """A config node as plain lists/dicts; anything else as it is."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def request_values(cfg: DictConfig) -> dict:
    """The `lesion_*` keys as given (plain values or {class name: value}; None = unset)."""
    return {key: plain(cfg[key]) for key in REQUEST_KEYS}


def sweep_requests(cfg: DictConfig) -> list[dict]:
    """One request per sweep value (the `lesion_*` keys with the swept one replaced), or the one request."""
    base = request_values(cfg)
    if cfg.sweep is None:
        return [base]
    sweep = plain(cfg.sweep)
    if not isinstance(sweep, dict) or len(sweep) != 1 or next(iter(sweep)) not in REQUEST_KEYS:
        raise UserError(f"sweep={sweep}: must be one of {', '.join(REQUEST_KEYS)} with a list of values, "
                        "e.g. sweep={lesion_volume_ml:[1,2,4]}")
    (key, values), = sweep.items()
    if not isinstance(values, list) or not values:
        raise UserError(f"sweep.{key}={values}: must be a non-empty list of values")
    if base[key] is not None:
        raise UserError(f"sweep.{key} and {key}={base[key]}: set one of them")
    return [{**base, key: value} for value in values]


def draw_conditions(requests: list[dict], swept: str | None) -> list[dict]:
    """The checked request each pair's training case is drawn for: in a sweep of `lesion_volume_ml` or
    `lesion_count`, every value asking for a lesion of a class is drawn as for the largest value of that class (so a
    row keeps one case, one whose lesion had room for the largest request); otherwise the request itself."""
    if swept not in ("lesion_volume_ml", "lesion_count"):
        return requests
    attribute = REQUEST_KEYS[swept]
    largest: dict[str, float] = {}
    for request in requests:
        for name, values in request.items():
            if values.get(attribute, 0) > 0:
                largest[name] = max(largest.get(name, 0), values[attribute])
    return [{name: {**values, attribute: largest[name]} if values.get(attribute, 0) > 0 else values
             for name, values in request.items()} for request in requests]


def nnunet_dataset_json(dataset: Mapping, n: int) -> dict:
    """nnU-Net v2's dataset.json for the generated training cases."""
    return {"channel_names": {"0": NNUNET_CHANNEL[str(dataset["modality"])]},
            "labels": {name: index for index, name in enumerate(class_names(OmegaConf.create(dict(dataset))))},
            "numTraining": n, "file_ending": ".nii.gz"}


def check_run_settings(cfg: DictConfig) -> tuple[int, str]:
    """`n` and `layout`, checked with the samplers' guidance scales before anything loads."""
    n = cfg.n
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"n={n}: must be a whole number of pairs >= 1")
    layout = str(cfg.layout)
    if layout not in LAYOUT_FOLDERS:
        raise UserError(f"layout={layout}: must be one of {', '.join(LAYOUT_FOLDERS)}")
    for key in ("label_sampler", "image_sampler"):
        if float(cfg[key].guidance_scale) < 0:
            raise UserError(f"{key}.guidance_scale={cfg[key].guidance_scale}: must be >= 0")
    return n, layout


def run(cfg: DictConfig) -> list[str]:
    """Generate the pairs of `cfg`; returns their case ids."""
    n, layout = check_run_settings(cfg)
    overwrite = bool(cfg.overwrite)
    device = resolve_device(str(cfg.device))
    generator, meta = load_label_generator(cfg.labels_ckpt, map_location=device)
    lesions = meta["lesion_classes"]
    lesion_names = list(lesions)
    requests = [check_requested(request, lesion_names) for request in sweep_requests(cfg)]
    model, diffusion_meta = load_diffusion(cfg.ckpt, map_location=device)
    check_data_settings(meta["dataset"], diffusion_meta["dataset"], f"ckpt={cfg.ckpt}",
                        sides=(f"the label generator {cfg.labels_ckpt}", "the stage-2 checkpoint"))
    label_settings = sampler_settings(cfg.label_sampler, generator.schedule.timesteps)
    image_settings = sampler_settings(cfg.image_sampler, model.schedule.timesteps)
    swept = None if cfg.sweep is None else next(iter(plain(cfg.sweep)))
    draws = [fill_attributes(requested, draw_case(condition, meta["attribute_table"],
                                                  np.random.default_rng(stream_seeds(cfg.seed, index)[0]),
                                                  cfg.draw_nearest), lesion_names)
             for requested, condition in zip(requests, draw_conditions(requests, swept)) for index in range(n)]

    out = Path(str(cfg.out))
    ids = case_ids(len(draws))
    outputs = [case_paths(out, layout, case_id) for case_id in ids]
    extra = [out / "attributes.csv", out / "generate.json"] + ([out / "dataset.json"] if layout == "nnunet" else [])
    for path in [p for paths in outputs for p in paths.values()] + extra:
        check_writable(path, overwrite)
    shape = [int(s) for s in meta["volume_shape"]]
    affine = grid_affine(shape, meta["dataset"]["spacing"])
    synth = image_synthesizer(cfg, model, diffusion_meta, device, shape, affine)

    rows = []
    for index, (case_id, paths, drawn) in enumerate(tqdm(list(zip(ids, outputs, draws)), desc="pairs", unit="pair")):
        _, label_seed, image_seed = stream_seeds(cfg.seed, index % n)
        attributes = generator.standardise(attribute_vector(drawn, lesion_names)[None])
        label = generator.sample(attributes, shape, settings=label_settings,
                                 positions=generator.positions([drawn], lesion_names),
                                 guidance_scale=float(cfg.label_sampler.guidance_scale),
                                 generator=torch.Generator().manual_seed(label_seed))[0].cpu().numpy()
        prepared = synth.prepare(label, affine, case_id)
        image = synth.sample(prepared, settings=image_settings, guidance_scale=float(cfg.image_sampler.guidance_scale),
                             generator=torch.Generator().manual_seed(image_seed))
        native = synth.to_native(image, prepared)
        save_nifti(native, affine, paths["image"], overwrite=overwrite, dtype=native.dtype)
        save_nifti(label, affine, paths["label"], overwrite=overwrite)
        rows.append({"case_id": case_id, "seed_index": index % n, **as_row(drawn, "requested_"),
                     **as_row(measure(label, affine, lesions), "measured_")})

    write_csv(rows, out / "attributes.csv", overwrite)
    if layout == "nnunet":
        write_json(nnunet_dataset_json(meta["dataset"], len(ids)), out / "dataset.json", overwrite)
    write_json(run_record(cfg, n, layout, shape, meta["dataset"]["spacing"], device), out / "generate.json", overwrite)
    return ids


def image_synthesizer(cfg, model, diffusion_meta: dict, device, shape: list[int], affine) -> Synthesizer:
    """Stage 2 on the generated maps, checked to fit the memory limit at the maps' shape before any is drawn."""
    limit = None if cfg.memory_limit_gb is None else int(float(cfg.memory_limit_gb) * GIB)
    synth = Synthesizer(model, diffusion_meta, device, memory_limit_bytes=limit, window=parse_window(cfg.window),
                        window_overlap=float(cfg.window_overlap), windows_per_call=int(cfg.window_batch))
    synth.check_fits(synth.prepare(np.zeros(shape, np.int64), affine, "a generated label map"),
                     float(cfg.image_sampler.guidance_scale))
    return synth


def run_record(cfg, n: int, layout: str, shape: list[int], spacing, device) -> dict:
    """generate.json: the checkpoints (file name and hash), requests, samplers and grid of the run."""
    return {"labels_checkpoint": {"file": Path(str(cfg.labels_ckpt)).name, "sha256": file_sha256(cfg.labels_ckpt)},
            "checkpoint": {"file": Path(str(cfg.ckpt)).name, "sha256": file_sha256(cfg.ckpt)},
            "n": n, "seed": int(cfg.seed), "layout": layout,
            "requested": request_values(cfg),
            "sweep": plain(cfg.sweep), "draw_nearest": cfg.draw_nearest,
            "label_sampler": OmegaConf.to_container(cfg.label_sampler),
            "image_sampler": OmegaConf.to_container(cfg.image_sampler),
            "volume_shape": shape, "spacing_mm": [float(s) for s in spacing],
            "device": device.type, "versions": versions()}


@hydra.main(version_base="1.3", config_path="../config", config_name="generate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    for case_id in run(cfg):
        print(case_id, flush=True)


if __name__ == "__main__":
    main()
