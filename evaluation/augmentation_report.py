"""What `evaluation.augmentation` writes besides its JSON: the CSV rows, the figure (lesion Dice vs the number of
real training cases, one line per arm) and the console summary."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluation import figures

MEAN_KEY = "mean_over_classes"  # per test case the mean Dice over the classes present


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
