"""Validate a data set and print a short summary; exit 0 when it is usable, 2 (one line on stderr) when not.

    python -m dataset.check dataset=<name> [dataset.root_dir=PATH] [overrides]
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from dataset.split import make_split, split_sizes
from dataset.validate import validate_dataset
from utils.errors import exit_on_user_error


def summary_lines(cfg: DictConfig) -> list[str]:
    summary = validate_dataset(cfg)
    split = make_split(summary.cases, cfg.split)
    n_train, n_val, n_test = split_sizes(len(summary.patients), float(cfg.split.val_fraction),
                                         float(cfg.split.test_fraction))
    return [*summary.lines(),
            f"split (seed {cfg.split.seed}): train {len(split['train'])} cases / {n_train} patients, "
            f"val {len(split['val'])} / {n_val}, test {len(split['test'])} / {n_test}",
            "ok: the data set is usable"]


@hydra.main(version_base="1.3", config_path="../config", config_name="check")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    print("\n".join(summary_lines(cfg.dataset)), flush=True)


if __name__ == "__main__":
    main()
