"""What `evaluation.augmentation` writes: the JSON, the CSV rows, the figure (lesion Dice vs the number of real
training cases, one line per arm) and the console summary; and the merge of studies run one regime (or a few) at a
time, e.g. one Slurm job per regime (`action=merge reports=[A/augmentation.json,B/augmentation.json]`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from evaluation import figures
from evaluation.report import print_summary, write_csv, write_json
from utils.errors import UserError

MEAN_KEY = "mean_over_classes"  # per test case the mean Dice over the classes present
OUTPUTS = ("augmentation.json", "augmentation.csv", "augmentation.png")
MAY_DIFFER = ("regimes", "device")  # settings that may differ between the studies of one merge


def write_outputs(report: dict, out: Path, overwrite: bool) -> None:
    """augmentation.json, .csv and .png into `out`, and the console summary."""
    keys, lesion = report["settings"]["classes"], report["settings"]["headline_class"]
    write_json(report, out / OUTPUTS[0], overwrite)
    write_csv(csv_rows(report, keys), out / OUTPUTS[1], overwrite)
    lesion_figure(report, lesion, out / OUTPUTS[2], overwrite)
    print_summary(f"augmentation -> {out}", console_lines(report, lesion))


def read_report(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read an augmentation.json ({error})") from None
    if not isinstance(report, dict) or not {"settings", "regimes", "fidelity", "n_cases"} <= set(report):
        raise UserError(f"{path}: not an augmentation.json of evaluation.augmentation (settings, regimes missing)")
    return report


def merge_reports(paths: list) -> dict:
    """One report from studies of the same settings (data set, split, classes, arms, seeds, segmenter,
    bootstrap) and disjoint regimes: the regimes ordered by their number of real cases, the mask fidelity from
    the one study that has it (the `all` regime's)."""
    if len(paths) < 2:
        raise UserError(f"reports: give at least two augmentation.json files to merge, got {len(paths)}")
    reports = [(str(path), read_report(Path(path))) for path in paths]
    first_path, first = reports[0]
    regimes, origin, fidelity, devices = {}, {}, [], []
    for path, report in reports:
        settings = report["settings"]
        for key in sorted((set(first["settings"]) | set(settings)) - set(MAY_DIFFER)):
            if settings.get(key) != first["settings"].get(key):
                raise UserError(f"{path}: settings.{key} is {settings.get(key)!r} but {first_path} has "
                                f"{first['settings'].get(key)!r}; only studies of the same settings merge")
        for regime, entry in report["regimes"].items():
            if regime in regimes:
                raise UserError(f"{path}: regime {regime} is also in {origin[regime]}; merge disjoint regimes")
            regimes[regime], origin[regime] = entry, path
        if not report["fidelity"].get("skipped"):
            fidelity.append((path, report["fidelity"]))
        devices += [d for d in str(settings.get("device", "")).split(",") if d and d not in devices]
    if len(fidelity) > 1:
        raise UserError(f"{fidelity[1][0]}: mask fidelity is also in {fidelity[0][0]}; merge disjoint regimes")
    order = sorted(regimes, key=lambda regime: regimes[regime]["n_real"])
    settings = dict(first["settings"], regimes=order, device=",".join(devices),
                    merged_from=[path for path, _ in reports])
    return {**first, "settings": settings, "regimes": {regime: regimes[regime] for regime in order},
            "fidelity": fidelity[0][1] if fidelity else first["fidelity"]}


def csv_rows(report: dict, keys: list[str]) -> list[dict]:
    rows = []
    for regime, entry in report["regimes"].items():
        for arm, stats in entry["arms"].items():
            if stats.get("skipped"):
                rows.append({"regime": regime, "n_real": entry["n_real"], "arm": arm, "skipped": stats["reason"]})
                continue
            for key in keys:
                dice = stats["dice"][key]
                difference = stats.get("difference", {}).get(key, {"mean": None, "ci": [None, None]})
                rows.append({"regime": regime, "n_real": entry["n_real"], "arm": arm, "class": key,
                             "dice": dice["mean"], "ci_low": dice["ci"][0], "ci_high": dice["ci"][1],
                             "difference": difference["mean"], "difference_ci_low": difference["ci"][0],
                             "difference_ci_high": difference["ci"][1], "n_cases": dice["n_cases"],
                             "few_cases": dice["few_cases"]})
    fid = report["fidelity"]
    if not fid.get("skipped"):
        for key in keys:
            ratio = fid["ratio"][key]
            rows.append({"regime": "fidelity", "n_real": report["settings"]["n_train"], "arm": "synthetic/real",
                         "class": key, "dice": fid["dice_synthetic"][key]["mean"],
                         "ci_low": fid["dice_synthetic"][key]["ci"][0], "ci_high": fid["dice_synthetic"][key]["ci"][1],
                         "ratio": ratio["value"], "ratio_ci_low": ratio["ci"][0], "ratio_ci_high": ratio["ci"][1],
                         "n_cases": ratio["n_cases"], "few_cases": ratio["few_cases"]})
    return rows


def lesion_figure(report: dict, lesion: str, path: Path, overwrite: bool) -> Path:
    """Lesion Dice vs the number of real training cases, one line per arm, with the 95 % intervals."""
    plt = figures.plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    arms = [str(a) for a in report["settings"]["arms"]]
    regimes = list(report["regimes"].values())
    for index, arm in enumerate(arms):
        points = [(r["n_real"], r["arms"][arm]["dice"][lesion]) for r in regimes
                  if not r["arms"][arm].get("skipped") and "dice" in r["arms"][arm]]
        if not points:
            continue
        x = np.array([p[0] for p in points], dtype=np.float64) * (1.0 + 0.03 * (index - (len(arms) - 1) / 2))
        y = np.array([p[1]["mean"] for p in points], dtype=np.float64)
        ci = np.array([p[1]["ci"] for p in points], dtype=np.float64)
        ax.errorbar(x, y, yerr=np.abs(np.stack([y - ci[:, 0], ci[:, 1] - y])), marker="o", capsize=3, label=arm)
    ticks = sorted({r["n_real"] for r in regimes})
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("real training cases")
    ax.set_ylabel(f"{lesion} Dice (real test cases)")
    flag = (f", fewer than {report['settings']['bootstrap']['min_cases']}: intervals unreliable"
            if report["few_cases"] else "")
    ax.set_title(f"{report['n_cases']} test cases, {len(report['settings']['seeds'])} seeds, "
                 f"{report['settings']['bootstrap']['confidence']:.0%} intervals{flag}", fontsize=9)
    ax.legend(fontsize=8)
    return figures._save(fig, path, overwrite)


def console_lines(report: dict, lesion: str) -> dict:
    lines = {}
    for regime, entry in report["regimes"].items():
        for arm, stats in entry["arms"].items():
            label = f"{regime} ({entry['n_real']} real) {arm}"
            if stats.get("skipped"):
                lines[label] = stats
                continue
            dice = stats["dice"][lesion]
            text = f"{lesion} Dice {dice['mean']:.3f} [{dice['ci'][0]:.3f}, {dice['ci'][1]:.3f}]"
            if "difference" in stats:
                d = stats["difference"][lesion]
                text += f", difference {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
            lines[label] = {"value": text}
    fid = report["fidelity"]
    lines["fidelity"] = fid if fid.get("skipped") else {
        "value": f"ratio synthetic/real {lesion} {fid['ratio'][lesion]['value']:.3f}, "
                 f"all classes {fid['ratio'][MEAN_KEY]['value']:.3f}"}
    if report["few_cases"]:
        lines["warning"] = {"value": f"only {report['n_cases']} test cases: intervals are flagged few_cases"}
    return lines
