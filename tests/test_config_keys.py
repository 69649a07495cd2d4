"""Every config of every group composes, and every key in every config is read by some code.

Model, loss and diffusion nodes (`_target_`) are checked semantically: every model config, with and without each
experiment, is composed and each of its `_target_` nodes is instantiated (`utils.build.build`), so a key that is no
argument of the constructor fails, and the built model's `hparams` (what its checkpoint stores) must hold the node's
values. Any other key counts as read when (a) it sits in the `trainer` group, whose node is passed to
`pytorch_lightning.Trainer(**cfg.trainer)`, or (b) the project's code (outside tests) reads it by attribute
(`.key`, not a method call) or by item (`["key"]`, `get("key")`).
"""
from __future__ import annotations

import importlib
import inspect
import re
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from utils.paths import CONFIG_DIR, PROJECT_ROOT

HYDRA_KEYS = {"defaults", "hydra", "_target_", "_partial_", "_recursive_", "_convert_"}
CODE_DIRS = ["dataset", "vq_gan_3d", "ddpm", "layers", "train", "evaluation", "utils", "benchmarks"]
TOP_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


@lru_cache(maxsize=1)
def project_source() -> str:
    return "\n".join(
        p.read_text() for d in CODE_DIRS for p in (PROJECT_ROOT / d).rglob("*.py") if p.is_file()
    )


def leaf_keys(node, prefix=()):
    """Yield (path, key, parent_node) for every key of a loaded YAML mapping, skipping Hydra's own keys."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        yield prefix + (key,), key, node
        if isinstance(value, dict) and "_target_" not in value:
            yield from leaf_keys(value, prefix + (key,))


def target_paths(node, prefix=()):
    """Paths of the nodes holding a `_target_` in a composed config."""
    if "_target_" in node:
        yield prefix
    for key, value in node.items():
        if isinstance(value, dict):
            yield from target_paths(value, prefix + (key,))


def model_options() -> dict[str, list[str]]:
    """Per top config with a `model` default: that option and the config/model files built on it."""
    options = {}
    for name in TOP_CONFIGS:
        data = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()) or {}
        default = next((entry["model"] for entry in data.get("defaults", [])
                        if isinstance(entry, dict) and "model" in entry), None)
        if default is not None:
            options[name] = [option for option in group_options("model") if option == default or default in
                             (yaml.safe_load((CONFIG_DIR / "model" / f"{option}.yaml").read_text()) or {}).get(
                                 "defaults", [])]
    return options


@lru_cache(maxsize=1)
def instantiated_paths() -> frozenset:
    """Global paths of the `_target_` nodes the semantic test instantiates (their keys are checked there)."""
    paths = set()
    for name, overrides in model_compositions():
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            cfg = OmegaConf.to_container(compose(name, overrides=overrides), resolve=False)
        paths.update(target_paths(cfg["model"], ("model",)))
    return frozenset(paths)


def package_prefix(path: Path) -> tuple:
    """Where a config file's keys land in the composed config: its group folder, or the root for `_global_`."""
    if path.read_text().lstrip().startswith("# @package _global_") or path.parent == CONFIG_DIR:
        return ()
    return tuple(path.parent.relative_to(CONFIG_DIR).parts)


def target_parameters(target: str) -> set[str]:
    module_name, _, attr = target.rpartition(".")
    obj = getattr(importlib.import_module(module_name), attr)
    return set(inspect.signature(obj).parameters)


def code_reads(key: str) -> bool:
    pattern = rf"\.{re.escape(key)}\b(?!\s*\()|\[\s*['\"]{re.escape(key)}['\"]\s*\]|get\(\s*['\"]{re.escape(key)}['\"]"
    return re.search(pattern, project_source()) is not None


def config_files():
    return sorted(p for p in CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", config_files(), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_key_is_read(path):
    data = yaml.safe_load(path.read_text()) or {}
    group = path.parent.name if path.parent != CONFIG_DIR else None
    unread = []
    prefix = package_prefix(path)
    for dotted, key, parent in leaf_keys(data):
        full = prefix + dotted
        if any(full[:len(node)] == node and len(full) > len(node) for node in instantiated_paths()):
            continue  # inside a model/loss node: test_model_nodes_instantiate checks it
        if isinstance(data.get(dotted[0]), dict) and "_target_" in data[dotted[0]] and len(dotted) == 2:
            if key in target_parameters(data[dotted[0]]["_target_"]):
                continue
        if "_target_" in data and len(dotted) == 1:
            params = target_parameters(data["_target_"])
            if key in params:
                continue
        # Trainer kwargs: keys of the trainer group, or `trainer.<key>` set by a `_global_` experiment file.
        is_global = path.read_text().lstrip().startswith("# @package _global_")
        if (group == "trainer" and len(dotted) == 1) or (is_global and dotted[0] == "trainer" and len(dotted) == 2):
            import pytorch_lightning as pl

            if key in inspect.signature(pl.Trainer.__init__).parameters:
                continue
        if not code_reads(key):
            unread.append(".".join(map(str, dotted)))
    assert not unread, f"{path.relative_to(CONFIG_DIR)}: keys that no code reads: {unread}"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def top_config_groups(name: str) -> list[str]:
    data = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()) or {}
    groups = []
    for entry in data.get("defaults", []):
        if isinstance(entry, dict):
            key = next(iter(entry)).replace("optional ", "").strip()
            if not key.startswith(("override", "hydra")) and (CONFIG_DIR / key).is_dir():
                groups.append(key)
    return groups


def compositions():
    for name in TOP_CONFIGS:
        yield name, []
        for group in top_config_groups(name):
            if group.startswith("experiment_"):
                continue  # selected through `experiment=<name>`
            for option in group_options(group):
                yield name, [f"{group}={option}"]
            for nested in sorted(p.name for p in (CONFIG_DIR / group).iterdir() if p.is_dir()):
                for option in group_options(f"{group}/{nested}"):
                    yield name, [f"{group}/{nested}={option}"]


@pytest.mark.parametrize("name,overrides", list(compositions()), ids=lambda v: str(v))
def test_config_composes(name, overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(name, overrides=overrides)
    # Resolve every interpolation; required values (???) are allowed to stay missing.
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert "_self_" not in cfg


def test_no_absolute_paths_in_configs():
    absolute = re.compile(r"(?<![\w$}])/(home|data|misc|mnt|scratch|work|tmp|cluster|srv|opt)\b")
    offenders = [str(p) for p in config_files() if absolute.search(p.read_text())]
    assert not offenders, f"absolute paths in {offenders}"


def model_compositions():
    for name, options in model_options().items():
        for option in options:
            for experiment in group_options("experiment"):
                yield name, [f"model={option}", f"experiment={experiment}"]


def test_every_model_option_is_instantiated():
    assert sorted(sum(model_options().values(), [])) == group_options("model")
    assert model_options()["vqgan"] == ["vqgan", "vqgan_paper", "vqgan_spade"]


@pytest.mark.parametrize("name,overrides", list(model_compositions()), ids=lambda v: str(v))
def test_model_nodes_instantiate(name, overrides):
    """Each `_target_` node builds (an unknown or misspelt key is a constructor error), and a model's `hparams`,
    what its checkpoint stores, is the node it was built from."""
    from ddpm.latent_diffusion import LatentDiffusion
    from ddpm_tiny import tiny_vqgan
    from utils.build import build, target_name

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(name, overrides=overrides)
    nodes = {path: OmegaConf.select(cfg, ".".join(path))
             for path in target_paths(OmegaConf.to_container(cfg.model, resolve=False), ("model",))}
    assert nodes, f"{name} {overrides}: no _target_ node"
    label_nc = int(cfg.dataset.label_nc)
    dependencies = {target_name(LatentDiffusion): {"vqgan": tiny_vqgan(), "label_nc": label_nc},  # what the
                    "ddpm.label_generator.LabelGenerator": {"label_nc": label_nc, "n_attributes": 4}}  # trainers pass
    for path, node in nodes.items():
        where = ".".join(path)
        built = build(node, where, **dependencies.get(node._target_, {}))
        assert target_name(type(built)) == node._target_
        if hasattr(built, "hparams"):
            values = OmegaConf.to_container(node, resolve=True)
            assert {k: built.hparams[k] for k in values} == values, where

