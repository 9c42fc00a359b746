"""Weight inheritance from a teacher (diffusers UNet2DConditionModel or FlexibleUNet), BK-SDM style."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from search_spaces import ConfigError, FlexibleUNet2DConditionModel, UNetArch, get_arch
from search_spaces.inherit import inherit_weights, module_map
from tests.conftest import scaled_reference


def test_bk_sdm_mapping_from_sd15():
    """BK-SDM-Base keeps the first ResNet/attention of each down stage and drops the middle one of each up
    stage: its i-th up block 1 takes the teacher's block 2, whose input width matches."""
    m = module_map(get_arch("bk_base"), get_arch("sd15"))
    assert m["down_blocks.1.resnets.0"] == "down_blocks.1.resnets.0"
    assert m["up_blocks.2.resnets.1"] == "up_blocks.2.resnets.2"
    assert m["up_blocks.2.attentions.1"] == "up_blocks.2.attentions.2"
    assert m["mid_block.attentions.0"] == "mid_block.attentions.0"
    tiny = module_map(get_arch("bk_tiny"), get_arch("sd15"))
    assert tiny["up_blocks.0.resnets.0"] == "up_blocks.1.resnets.0"  # up stages align from the output side
    assert tiny["down_blocks.2.attentions.0"] == "down_blocks.2.attentions.0"


def _teacher() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=16, block_out_channels=(40, 80, 160, 160), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=8, time_embedding_dim=160).eval()


def test_inherits_every_kept_block_from_a_diffusers_teacher():
    teacher = _teacher()
    student = FlexibleUNet2DConditionModel.from_arch(UNetArch.from_dict(scaled_reference("bk_base", 40)))
    report = inherit_weights(student, teacher)
    total = sum(p.numel() for p in student.parameters())
    assert report.inherited_params + report.new_params == total
    assert report.new_params == 0  # BK-SDM-Base is a strict subset of SD1.5
    t = teacher.state_dict()
    s = student.state_dict()
    assert torch.equal(s["up_blocks.2.resnets.1.conv1.weight"], t["up_blocks.2.resnets.2.conv1.weight"])
    assert torch.equal(s["down_blocks.0.attentions.0.proj_in.weight"], t["down_blocks.0.attentions.0.proj_in.weight"])


def test_identical_student_reproduces_the_teacher():
    teacher = _teacher()
    student = FlexibleUNet2DConditionModel.from_arch(UNetArch.from_unet2d_config(teacher.config)).eval()
    report = inherit_weights(student, teacher)
    assert report.new_params == 0 and not report.by_status("partial")
    x, e = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 32)
    with torch.no_grad():
        assert torch.equal(student(x, 3, e).sample, teacher(x, 3, e).sample)


def test_new_blocks_are_reported():
    teacher = FlexibleUNet2DConditionModel.from_arch(UNetArch.from_dict(scaled_reference("bk_base", 40)))
    data = scaled_reference("bk_base", 40)
    data["up"][1]["attentions"] = 4  # two more attentions than the teacher has there
    data["down"][1]["transformer_layers"] = 2  # a deeper transformer: its second layer is new
    student = FlexibleUNet2DConditionModel.from_arch(UNetArch.from_dict(data))
    report = inherit_weights(student, teacher)
    new = {m.module for m in report.by_status("new")}
    assert new == {"up_blocks.1.attentions.2", "up_blocks.1.attentions.3"}
    partial = {m.module for m in report.by_status("partial")}
    assert partial == {"down_blocks.1.attentions.0"}
    assert "inherited" in report.summary()


def test_mismatched_widths_are_refused():
    teacher = _teacher()
    data = scaled_reference("bk_base", 40)
    data["down"][1]["channels"] = 64
    student = FlexibleUNet2DConditionModel.from_arch(UNetArch.from_dict(data))
    with pytest.raises(ConfigError, match=r"down\[1\] has 64 channels, teacher down\[1\] has 80"):
        inherit_weights(student, teacher)


def test_new_modules_can_start_as_the_identity():
    """An attention the teacher lacks, started as the identity, leaves the teacher's function intact; started
    fresh it perturbs every output after it."""
    torch.manual_seed(0)
    teacher = FlexibleUNet2DConditionModel.from_arch(get_arch("shapes")).eval()
    data = get_arch("shapes").to_dict()
    data["down"][0].update(attentions=1, heads=2)  # attention at 16x16, where the teacher has none
    student_arch = UNetArch.from_dict(data)
    x, e, t = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 16), torch.tensor([10, 700])
    outputs = {}
    for new in ("fresh", "identity"):
        torch.manual_seed(1)
        student = FlexibleUNet2DConditionModel.from_arch(student_arch).eval()
        report = inherit_weights(student, teacher, new=new)
        assert {m.module for m in report.by_status("new")} == {"down_blocks.0.attentions.0"}
        with torch.no_grad():
            outputs[new] = student(x, t, e).sample
    with torch.no_grad():
        reference = teacher(x, t, e).sample
    torch.testing.assert_close(outputs["identity"], reference)
    assert (outputs["fresh"] - reference).abs().max() > 1e-3
    proj = student.down_blocks[0].attentions[0].proj_out
    assert proj.weight.requires_grad and not proj.weight.any()  # zero, but it still learns


def test_new_resamplers_start_as_pooling_and_nearest_upsampling():
    from diffusers.models.resnet import Downsample2D, Upsample2D

    from search_spaces.inherit import start_as_identity

    torch.manual_seed(0)
    down = Downsample2D(4, use_conv=True, out_channels=4, padding=1, name="op")
    up = Upsample2D(4, use_conv=True, out_channels=4)
    start_as_identity(down)
    start_as_identity(up)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(down(x), torch.nn.functional.avg_pool2d(x, 2))
        torch.testing.assert_close(up(x), torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


def test_unknown_new_module_initialisation_is_refused():
    teacher = FlexibleUNet2DConditionModel.from_arch(get_arch("shapes"))
    student = FlexibleUNet2DConditionModel.from_arch(get_arch("shapes"))
    with pytest.raises(ConfigError, match="new_modules"):
        inherit_weights(student, teacher, new="zeros")
