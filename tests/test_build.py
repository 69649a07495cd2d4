"""Settings written once: models built from their config node (`utils.build`), checkpoints storing that node and
rebuilt from it for this project's classes only (`utils.checkpoint.rebuild`), older files still loading."""
from __future__ import annotations

import pytest
import torch

from conftest import compose
from ddpm.checkpoint import load_diffusion
from ddpm.latent_diffusion import LatentDiffusion
from ddpm_tiny import save_tiny_diffusion, tiny_diffusion, tiny_vqgan
from utils.build import build, configurable, plain, target_name
from utils.checkpoint import rebuild
from utils.errors import UserError
from vq_gan_3d.checkpoint import load_vqgan, save_vqgan
from vq_gan_3d.model import VQGAN


@configurable(exclude=("helper",))
class Recorded:
    def __init__(self, size: int, *, shape=(1, 2), helper=None, extra: dict | None = None):
        self.size = size


def test_configurable_records_the_arguments_with_defaults_as_plain_containers():
    made = Recorded(3, helper=object(), extra={"a": (1, 2)})
    assert made.hparams == {"_target_": f"{__name__}.Recorded", "size": 3, "shape": [1, 2],
                            "extra": {"a": [1, 2]}}
    with pytest.raises(TypeError, match="extra.a: Tensor is not a plain setting"):
        Recorded(1, extra={"a": torch.zeros(1)})
    assert plain((1, {"b": None})) == [1, {"b": None}]


def test_a_model_built_from_its_node_records_that_node():
    cfg = compose("vqgan", ["model.vqgan.base_channels=4", "model.vqgan.num_codes=32", "model.vqgan.norm_groups=2"])
    vqgan = build(cfg.model.vqgan, "model.vqgan")
    assert vqgan.hparams["_target_"] == cfg.model.vqgan._target_ == target_name(VQGAN)
    assert vqgan.hparams["base_channels"] == 4 and vqgan.hparams["num_codes"] == 32
    assert vqgan.embedding_dim == 8 and vqgan.hparams["embedding_dim"] is None  # null in the config: the default


def test_a_misspelt_or_bad_setting_is_one_line_naming_the_node():
    cfg = compose("vqgan", ["+model.vqgan.num_code=32"])
    with pytest.raises(UserError, match=r"^model.vqgan: .*unexpected keyword argument 'num_code'$"):
        build(cfg.model.vqgan, "model.vqgan")
    cfg = compose("vqgan", ["model.vqgan.quantizer=fsq", "model.vqgan.embedding_dim=3"])
    with pytest.raises(UserError, match=r"^model.vqgan: fsq has one latent channel per level entry") as err:
        build(cfg.model.vqgan, "model.vqgan")
    assert "\n" not in str(err.value)


class Boom:
    called = False

    def __init__(self, **kwargs):
        Boom.called = True


def test_a_stored_target_outside_the_allow_list_is_refused_without_running_it(tmp_path):
    for node in ({"_target_": f"{__name__}.Boom"}, {"_target_": "os.system", "command": "true"}):
        with pytest.raises(UserError, match=r"model class .* is not one of \['vq_gan_3d.model.VQGAN'\]"):
            rebuild(tmp_path / "x.ckpt", "vqgan", node, [VQGAN])
    assert not Boom.called
    with pytest.raises(UserError, match="cannot rebuild the model: .*unexpected keyword argument 'widths'"):
        rebuild(tmp_path / "x.ckpt", "vqgan", {"_target_": target_name(VQGAN), "widths": 3}, [VQGAN])


def without_targets(node: dict) -> dict:
    return {k: v for k, v in node.items() if k != "_target_"}


def test_checkpoints_written_before_targets_were_stored_still_load(tmp_path):
    vqgan = tiny_vqgan()
    path = save_vqgan(vqgan, tmp_path / "vqgan.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["vqgan"]["hparams"] = without_targets(checkpoint["vqgan"]["hparams"])
    torch.save(checkpoint, path)
    image = torch.rand(1, 1, 8, 8, 8) * 2 - 1
    torch.testing.assert_close(load_vqgan(path).decode(vqgan.encode(image)), vqgan.decode(vqgan.encode(image)))

    model = tiny_diffusion()
    path = save_tiny_diffusion(tmp_path / "diffusion.ckpt", model)
    checkpoint = torch.load(path, weights_only=True)
    meta = checkpoint["diffusion"]
    assert meta["model"]["_target_"] == target_name(LatentDiffusion) and "vqgan" not in meta["model"]
    meta["model"], meta["vqgan"] = without_targets(meta["model"]), without_targets(meta["vqgan"])
    torch.save(checkpoint, path)
    loaded, _ = load_diffusion(path)
    assert loaded.hparams == model.hparams and loaded.vqgan.hparams == model.vqgan.hparams
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
