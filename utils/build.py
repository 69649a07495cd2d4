"""Objects built from their config node, and the node each model keeps for its checkpoint.

A model's settings are written once: in its config node (`_target_` plus the constructor's keyword arguments,
e.g. `model.vqgan` in `config/model/vqgan.yaml`) and in the constructor's signature. `build(node, where)` is
`hydra.utils.instantiate` with a bad setting turned into a one-line `UserError` naming the node. A class marked
`@configurable()` records how each instance was constructed as `obj.hparams`, a plain dict
`{"_target_": "<module>.<Class>", <every argument, defaults filled in>}`: the resolved config node when it was
built from one, and what checkpoints store (`utils.checkpoint.rebuild` builds it again from the file, for an
allow-list of classes).
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from utils.errors import UserError

PLAIN_SCALARS = (bool, int, float, str, type(None))


def target_name(cls: type) -> str:
    """The `_target_` string of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def plain(value: Any, name: str = "value") -> Any:
    """`value` as plain containers (dict, list, scalars) that `torch.load(weights_only=True)` reads back; config
    nodes are resolved, tuples become lists. Anything else (a tensor, a module) is a TypeError."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, PLAIN_SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v, name) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v, f"{name}.{k}") for k, v in value.items()}
    raise TypeError(f"{name}: {type(value).__name__} is not a plain setting (bool, number, string, list, dict)")


def configurable(*, exclude: tuple[str, ...] = ()):
    """Class decorator: after `__init__`, `self.hparams` holds the target and the bound arguments (defaults
    filled in) as plain containers, except the arguments named in `exclude` (dependencies such as a trained
    network, passed again when rebuilding). Only the constructed class records, not a base class's `__init__`."""

    def decorate(cls: type) -> type:
        init = cls.__init__
        signature = inspect.signature(init)
        target = target_name(cls)

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if type(self) is cls:
                bound = signature.bind(self, *args, **kwargs)
                bound.apply_defaults()
                arguments = list(bound.arguments.items())[1:]  # without self
                self.hparams = {"_target_": target, **{k: plain(v, k) for k, v in arguments if k not in exclude}}

        cls.__init__ = __init__
        return cls

    return decorate


def build(node: DictConfig | Mapping, where: str, **extra: Any) -> Any:
    """`hydra.utils.instantiate(node, **extra)` with nested containers passed as plain lists and dicts. A setting
    the constructor refuses (an unknown key, a bad value) is a `UserError` starting with `where` (the node's
    key, e.g. `model.vqgan`); a `UserError` raised inside (e.g. a missing perceptual backbone) passes through."""
    try:
        return instantiate(node, _convert_="all", **extra)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, (TypeError, ValueError)):
            raise UserError(f"{where}: {' '.join(str(cause).split())}") from None
        raise UserError(f"{where}: {' '.join(str(err).split())}") from None
