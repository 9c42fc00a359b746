"""UNetArch: validation, serialisation, importers, the interleave order and skip routing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from search_spaces import ConfigError, UNetArch, get_arch, interleave, list_archs, load_arch
from tests.conftest import random_flexible_arch, random_unet2d_config

DATA = Path(__file__).parent / "data"


def test_reference_archs_are_shipped():
    assert {"sd15", "sd21base", "bk_base", "bk_small", "bk_tiny", "decidiffusion_v1", "tiny"} <= set(list_archs())


def test_interleave_order_is_decidiffusions():
    assert interleave(1, 3) == (("resnet", 0), ("attention", 0), ("attention", 1), ("attention", 2))
    assert [k[0] for k in interleave(2, 6)] == ["resnet", "attention", "resnet"] + ["attention"] * 5
    assert [k[0] for k in interleave(3, 1)] == ["resnet", "attention", "resnet", "resnet"]
    assert interleave(0, 0) == ()


@pytest.mark.parametrize("seed", range(10))
def test_round_trips(seed):
    arch = random_flexible_arch(random.Random(seed))
    assert UNetArch.from_dict(arch.to_dict()) == arch
    assert UNetArch.from_yaml(arch.to_yaml()) == arch
    assert UNetArch.from_json(arch.to_json()) == arch
    assert UNetArch.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    assert hash(UNetArch.from_dict(arch.to_dict())) == hash(arch)


def test_archs_are_immutable():
    arch = get_arch("sd15")
    with pytest.raises(AttributeError):
        arch.sample_size = 32  # type: ignore[misc]


def test_decidiffusion_import_matches_reference():
    cfg = json.loads((DATA / "decidiffusion_v1_flexible_unet_config.json").read_text())
    arch = UNetArch.from_decidiffusion(cfg)
    assert arch == get_arch("decidiffusion_v1")
    assert arch.mid.resnets == 5 and arch.mid.attentions == 2 and arch.mid.upsample
    assert arch.down_skip == "after_resnet"
    # the skips: conv_in + 5 down ResNets + 2 downsamplers = 8 = 2 + 3 + 3 up ResNets
    assert sum(s.resnets for s in arch.up) == 8
    # the file loader tells the formats apart by their keys
    assert load_arch(DATA / "decidiffusion_v1_flexible_unet_config.json") == arch


def test_decidiffusion_import_refuses_unsupported_order():
    cfg = json.loads((DATA / "decidiffusion_v1_flexible_unet_config.json").read_text())
    cfg["configurations"]["mix_block_in_forward"] = False
    with pytest.raises(ConfigError, match=r"configurations\.mix_block_in_forward"):
        UNetArch.from_decidiffusion(cfg)
    cfg["configurations"]["mix_block_in_forward"] = True
    cfg["configurations"]["prev_output_channels"] = [1280, 640, 640]
    with pytest.raises(ConfigError, match="prev_output_channels"):
        UNetArch.from_decidiffusion(cfg)


def test_unet2d_import_of_reference_configs():
    assert UNetArch.from_unet2d_config({"cross_attention_dim": 768, "attention_head_dim": 8}) == get_arch("sd15")
    sd21 = UNetArch.from_unet2d_config({"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
                                        "use_linear_projection": True, "sample_size": 64})
    assert sd21 == get_arch("sd21base")
    assert [s.heads for s in sd21.down[:3]] == [5, 10, 20]


@pytest.mark.parametrize("key,value", [("class_embed_type", "timestep"), ("addition_embed_type", "text_time"),
                                       ("dual_cross_attention", True), ("conv_in_kernel", 7)])
def test_unet2d_import_refuses_what_it_cannot_build(key, value):
    with pytest.raises(ConfigError, match=key):
        UNetArch.from_unet2d_config({key: value})


def test_unet2d_import_refuses_unknown_block_types():
    with pytest.raises(ConfigError, match=r"down_block_types\[0\]"):
        UNetArch.from_unet2d_config({"down_block_types": ["SimpleCrossAttnDownBlock2D"] + ["DownBlock2D"] * 3})


def test_load_arch_reads_unet2d_config_json(tmp_path):
    cfg = random_unet2d_config(random.Random(0))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **cfg}))
    assert load_arch(tmp_path / "config.json") == UNetArch.from_unet2d_config(cfg)


def _base() -> dict:
    return get_arch("tiny").to_dict()


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda d: d["down"][1].update(heads=5), "down[1].heads"),
        (lambda d: d["down"][0].update(channels=30), "down[0].channels"),
        (lambda d: d["down"][0].update(resnets="two"), "down[0].resnets"),
        (lambda d: d["down"][0].update(colour="red"), "down[0].colour"),
        (lambda d: d.update(up=d["up"][:-1]), "up"),
        (lambda d: d["up"][2].update(upsample=True), "up[2].upsample"),
        (lambda d: d["up"][2].update(resnets=2), "up[2].resnets"),
        (lambda d: d["up"][1].update(resnets=4), "up[1].resnets"),
        (lambda d: d["up"][0].update(resnets=3), "up[0].resnets"),
        (lambda d: d["mid"].update(upsample=True), "mid.upsample"),
        (lambda d: d.update(down_skip="sideways"), "down_skip"),
        (lambda d: d.update(sample_size=True), "sample_size"),
        (lambda d: d.pop("up"), "up"),
        (lambda d: d["up"][2].update(attentions=2, heads=None), "up[2].heads"),
    ],
)
def test_invalid_archs_name_the_field(mutate, field):
    data = _base()
    mutate(data)
    with pytest.raises(ConfigError) as err:
        UNetArch.from_dict(data)
    assert err.value.field == field, str(err.value)


def test_unconsumable_skips_name_the_stage():
    data = _base()
    data["down"][1]["resnets"] = 3  # one more skip at 1/2 resolution than up[1] consumes
    with pytest.raises(ConfigError) as err:
        UNetArch.from_dict(data)
    assert err.value.field == "up[1].resnets"
    assert "unconsumed" in err.value.message


def test_yaml_errors_carry_file_and_line(tmp_path):
    text = get_arch("tiny").to_yaml().replace("heads: 4", "heads: 3", 1)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_arch(path)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "heads: 3" in row)
    assert err.value.source == str(path) and err.value.line == line
    assert str(err.value).startswith(f"{path}:{line}: down[0].heads:")


def test_broken_yaml_is_one_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("down: [\n  {channels: 32\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_arch(path)


def test_yaml_cannot_construct_python_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("down: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError):
        load_arch(path)
    assert not Path("pwned").exists()


def test_attention_defaults_and_head_dim():
    arch = UNetArch.from_dict({
        "sample_size": 16, "cross_attention_dim": 8, "norm_num_groups": 4, "attention": {"head_dim": 8},
        "down": [{"channels": 16, "resnets": 1, "attentions": 1, "downsample": True},
                 {"channels": 32, "resnets": 1, "attentions": 2}],
        "mid": None,
        "up": [{"channels": 32, "resnets": 2, "attentions": 1, "heads": 1, "upsample": True},
               {"channels": 16, "resnets": 2}],
    })
    assert [s.heads for s in arch.down] == [2, 4]
    assert arch.up[0].heads == 1 and arch.up[1].heads is None
    assert arch.mid is None


def test_stages_without_attention_compare_equal_whatever_heads_were_given():
    a = _base()
    b = _base()
    b["up"][0]["heads"] = 7
    assert UNetArch.from_dict(a) == UNetArch.from_dict(b)
