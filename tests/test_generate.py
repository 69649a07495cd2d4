"""`python -m ddpm.generate` on tiny checkpoints: the output folder is a valid data set (both layouts), the CSV
holds requested and measured attributes, bad attributes write nothing, existing outputs are kept."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

import benchmarks.make_generated_figure as figure
from dataset.attributes import measure, read_requested_csv
from dataset.validate import validate_dataset
from ddpm.generate import draw_conditions, run
from ddpm.label_checkpoint import save_label_generator
from ddpm.label_generator import foreground_box, grid_affine
from ddpm_tiny import save_tiny_diffusion, tiny_diffusion
from labels_tiny import LABEL_NC, LESIONS, SHAPE, SPACING, phantom_map, tiny_generator, vectors_of
from utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

AFFINE = grid_affine(SHAPE, SPACING)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A stage-2 checkpoint and an (untrained but fitted) label generator of the same data settings."""
    folder = tmp_path_factory.mktemp("ckpts")
    diffusion = save_tiny_diffusion(folder / "diff.ckpt", tiny_diffusion(label_nc=LABEL_NC), spacing=SPACING)
    dataset = torch.load(diffusion, weights_only=True)["diffusion"]["dataset"]
    maps = [phantom_map(2.0), phantom_map(3.5)]
    vectors, found = vectors_of(maps, AFFINE)
    model = tiny_generator(spatial_condition=True)  # as config/model/labels.yaml
    model.fit_attributes(vectors)
    model.fit_geometry(np.stack([foreground_box(m) for m in maps]), float(np.prod(SPACING)) / 1000)
    model.scale_factor.fill_(1.0)
    model.class_bias.zero_()
    labels = save_label_generator(model.eval(), folder / "labels.ckpt", dataset=dataset, lesion_classes=LESIONS,
                                  attribute_table=found, volume_shape=SHAPE, split=None)
    return labels, diffusion, dataset


def generate_cfg(compose_cfg, ckpts, out, *extra):
    labels, diffusion, _ = ckpts
    return compose_cfg("generate", [f"labels_ckpt={labels}", f"ckpt={diffusion}", f"out={out}", "n=2",
                                    "label_sampler.steps=3", "image_sampler.steps=2", "image_sampler.sampler=ddim",
                                    *extra])


def data_set(compose_cfg, root, layout="images_labels"):
    return compose_cfg("check", ["dataset=nifti", f"dataset.root_dir={root}", f"dataset.label_nc={LABEL_NC}",
                                 "dataset.modality=mr", "dataset/intensity=percentile", f"dataset.layout={layout}",
                                 "dataset.spacing=[2.0,2.0,2.0]", "dataset.num_workers=0"]).dataset


def test_outputs_are_a_valid_data_set_with_requested_and_measured_attributes(compose_cfg, ckpts, tmp_path):
    out = tmp_path / "out"
    assert run(generate_cfg(compose_cfg, ckpts, out, "lesion_volume_ml=0.5")) == ["gen0000", "gen0001"]
    summary = validate_dataset(data_set(compose_cfg, out))  # dataset.check's validation
    assert [case.case_id for case in summary.cases] == ["gen0000", "gen0001"]
    rows = list(csv.DictReader(open(out / "attributes.csv", newline="")))
    assert [row["case_id"] for row in rows] == ["gen0000", "gen0001"]
    for row in rows:
        label_file = nib.load(str(out / "labels" / f"{row['case_id']}.nii.gz"))
        label = np.asarray(label_file.dataobj)
        assert np.issubdtype(label.dtype, np.integer) and label.shape == SHAPE
        assert label.min() >= 0 and label.max() < LABEL_NC
        np.testing.assert_allclose(label_file.affine, AFFINE, atol=1e-5)  # the model grid at the training spacing
        image = nib.load(str(out / "images" / f"{row['case_id']}.nii.gz"))
        assert image.shape == SHAPE and np.allclose(image.affine, AFFINE, atol=1e-5)
        assert float(row["requested_class_2_volume_ml"]) == 0.5  # the user's value; count and centroid drawn
        assert int(row["requested_class_2_count"]) == 1  # from the training maps (both hold one lesion)
        measured = measure(label, AFFINE, LESIONS)["class_2"]
        assert float(row["measured_class_2_volume_ml"]) == pytest.approx(measured.volume_ml)
        assert int(row["measured_class_2_count"]) == measured.count
    requests = read_requested_csv(out / "attributes.csv", list(LESIONS))  # what evaluation.labelmaps reads
    assert requests["gen0001"]["class_2"]["volume_ml"] == 0.5
    assert not any(p.name.startswith(".") for p in out.rglob("*")), "no temporary files left behind"


def test_nnunet_layout(compose_cfg, ckpts, tmp_path):
    import json

    out = tmp_path / "nnunet"
    run(generate_cfg(compose_cfg, ckpts, out, "layout=nnunet", "n=1"))
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["gen0000_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["gen0000.nii.gz"]
    assert [c.case_id for c in validate_dataset(data_set(compose_cfg, out, "nnunet")).cases] == ["gen0000"]
    described = json.loads((out / "dataset.json").read_text())
    assert described == {"channel_names": {"0": "MR"}, "labels": {"background": 0, "class_1": 1, "class_2": 2},
                         "numTraining": 1, "file_ending": ".nii.gz"}


@pytest.mark.parametrize("bad,message", [
    ("lesion_volume_ml=-1", "lesion volume in mL >= 0"),
    ("lesion_centroid=[0.2,1.5,0.5]", r"each in \[0, 1\]"),
    ("lesion_count=1.5", "whole number"),
    ("lesion_volume_ml={liver:3}", "unknown lesion class 'liver'"),
    ("n=0", "n=0"),
    ("layout=bids", "layout=bids"),
    ("sweep={lesion_size:[1]}", "sweep="),
    ("sweep={lesion_volume_ml:[]}", "non-empty list"),
    ("sweep={lesion_volume_ml:[1,-2]}", "lesion volume in mL >= 0"),
])
def test_bad_values_are_one_line_errors_and_write_nothing(compose_cfg, ckpts, tmp_path, bad, message):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message) as err:
        run(generate_cfg(compose_cfg, ckpts, out, bad))
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_other_data_settings_are_refused(compose_cfg, ckpts, tmp_path):
    labels, _, dataset = ckpts
    other = save_tiny_diffusion(tmp_path / "other.ckpt", tiny_diffusion(label_nc=LABEL_NC), spacing=(3.0, 3.0, 3.0))
    with pytest.raises(UserError, match=r"spacing \[2.0, 2.0, 2.0\] in the label generator .* \[3.0, 3.0, 3.0\] in "
                                        r"the stage-2 checkpoint"):
        run(compose_cfg("generate", [f"labels_ckpt={labels}", f"ckpt={other}", f"out={tmp_path / 'o'}", "n=1"]))
    assert not (tmp_path / "o").exists()


def test_sweep_gives_rows_where_only_the_swept_attribute_changes(compose_cfg, ckpts, tmp_path):
    out = tmp_path / "sweep"
    ids = run(generate_cfg(compose_cfg, ckpts, out, "sweep={lesion_volume_ml:[0.5,2.0]}", "lesion_count=1"))
    assert ids == ["gen0000", "gen0001", "gen0002", "gen0003"]  # value j's pair k is gen<j*n + k>, n=2
    requests = read_requested_csv(out / "attributes.csv", list(LESIONS))
    assert [requests[i]["class_2"]["volume_ml"] for i in ids] == [0.5, 0.5, 2.0, 2.0]
    assert all(requests[i]["class_2"]["count"] == 1 for i in ids)
    rows = list(csv.DictReader(open(out / "attributes.csv", newline="")))
    assert [int(row["seed_index"]) for row in rows] == [0, 1, 0, 1]  # pair k of every value: seed index k
    # the same drawn attributes and noise along a row: pair k of each value differs only by the swept volume
    for k in range(2):
        first, second = (requests[ids[j * 2 + k]]["class_2"] for j in range(2))
        assert first["centroid"] == second["centroid"]
    record = json.loads((out / "generate.json").read_text())
    assert record["sweep"] == {"lesion_volume_ml": [0.5, 2.0]} and record["draw_nearest"] == 5
    # the README figure picks pair 0 of each value, in the order of the requested volume
    rows = figure.read_pairs(out)
    assert [r["case_id"] for r in figure.sweep_row(rows[::-1], "requested_class_2_volume_ml")] == ["gen0000", "gen0002"]
    assert figure.main(["--pairs", str(out), "--sweep", str(out), "--lesion-name", "class_2",
                        "--out", str(tmp_path / "fig.png")]).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="set one of them"):
        run(generate_cfg(compose_cfg, ckpts, tmp_path / "both", "sweep={lesion_volume_ml:[1]}", "lesion_volume_ml=1"))


def test_a_volume_sweep_draws_each_row_for_its_largest_value():
    requests = [{"a": {"volume_ml": 0.0}}, {"a": {"volume_ml": 2.0, "count": 1}}, {"a": {"volume_ml": 8.0, "count": 1}}]
    assert draw_conditions(requests, "lesion_volume_ml") == [
        {"a": {"volume_ml": 0.0}}, {"a": {"volume_ml": 8.0, "count": 1}}, {"a": {"volume_ml": 8.0, "count": 1}}]
    two = [{"a": {"volume_ml": 2.0}, "b": {"volume_ml": 5.0}}, {"a": {"volume_ml": 4.0}, "b": {"volume_ml": 1.0}}]
    assert draw_conditions(two, "lesion_volume_ml") == [{"a": {"volume_ml": 4.0}, "b": {"volume_ml": 5.0}}] * 2
    counts = [{"a": {"count": 1}}, {"a": {"count": 3}}]
    assert draw_conditions(counts, "lesion_count") == [{"a": {"count": 3}}] * 2
    centroids = [{"a": {"centroid": (0.2, 0.5, 0.5)}}, {"a": {"centroid": (0.8, 0.5, 0.5)}}]
    assert draw_conditions(centroids, "lesion_centroid") == centroids and draw_conditions(requests, None) == requests


def test_figure_slices_through_the_lesion_centroid():
    label = np.zeros((4, 4, 10), np.int64)
    label[1, 1, 6:9] = 2
    assert figure.lesion_slice(label, 2) == 7 and figure.lesion_slice(label, 1) == 5  # no class 1: the middle


def test_same_seed_same_pairs_and_existing_outputs_kept(compose_cfg, ckpts, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    run(generate_cfg(compose_cfg, ckpts, first, "n=1", "seed=3"))
    run(generate_cfg(compose_cfg, ckpts, second, "n=1", "seed=3"))
    for sub in ("images", "labels"):
        a, b = (np.asarray(nib.load(str(d / sub / "gen0000.nii.gz")).dataobj) for d in (first, second))
        np.testing.assert_array_equal(a, b)
    before = (first / "images" / "gen0000.nii.gz").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        run(generate_cfg(compose_cfg, ckpts, first, "n=1", "seed=4"))
    assert (first / "images" / "gen0000.nii.gz").read_bytes() == before
    run(generate_cfg(compose_cfg, ckpts, first, "n=1", "seed=4", "overwrite=true"))
    assert (first / "images" / "gen0000.nii.gz").read_bytes() != before
