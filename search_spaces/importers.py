"""Translate other projects' U-Net configs into UNetArch data.

Two sources: diffusers ``UNet2DConditionModel`` configs of the Stable Diffusion family (SD1.x, SD2.x, BK-SDM and
anything else built from CrossAttnDownBlock2D/DownBlock2D, UNetMidBlock2DCrossAttn and
CrossAttnUpBlock2D/UpBlock2D), and DeciDiffusion's ``flexible_unet/config.json``. Anything these configs can
say that FlexibleUNet cannot build (class embeddings, SDXL's added conditioning, dual cross-attention, ...) is
refused naming the key, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ConfigError

DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# keys FlexibleUNet can only build at their diffusers default
_DEFAULT_ONLY: dict[str, Any] = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
_KNOWN = set(_DEFAULT_ONLY) | {
    "sample_size", "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
    "mid_block_type", "up_block_types", "block_out_channels", "layers_per_block", "act_fn", "norm_num_groups",
    "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "reverse_transformer_layers_per_block",
    "attention_head_dim", "use_linear_projection", "upcast_attention", "time_embedding_dim", "time_cond_proj_dim",
    "addition_embed_type_num_heads",
}


def _per_stage(value: Any, n: int, key: str) -> list[Any]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ConfigError(f"has {len(value)} entries for {n} stages", field=key)
        return list(value)
    return [value] * n


def _uniform(value: Any, key: str) -> int:
    """One transformer depth per stage: a nested per-block list must hold one value."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(set(value)) != 1:
            raise ConfigError(f"per-block depths {list(value)} differ within a stage; FlexibleUNet has one "
                              "transformer depth per stage", field=key)
        return int(value[0])
    return int(value)


def arch_dict_from_unet2d_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """UNetArch data for a diffusers UNet2DConditionModel config (SD family)."""
    cfg = dict(cfg)
    cls = cfg.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        raise ConfigError(f"expected a UNet2DConditionModel config, got {cls!r}", field="_class_name")
    for key in cfg:
        if not key.startswith("_") and key not in _KNOWN:
            raise ConfigError("unknown UNet2DConditionModel key", field=key)
    for key, default in _DEFAULT_ONLY.items():
        value = cfg.get(key, default)
        if key == "only_cross_attention" and isinstance(value, Sequence):
            value = any(value)
        if key == "mid_block_only_cross_attention" and value is False:
            value = None
        if value != default:
            raise ConfigError(f"{value!r} is not supported by FlexibleUNet (only {default!r})", field=key)

    down_types = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up_types = list(cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    n = len(down_types)
    if len(up_types) != n:
        raise ConfigError(f"{len(up_types)} up blocks for {n} down blocks", field="up_block_types")
    for key, types, table in (("down_block_types", down_types, DOWN_TYPES), ("up_block_types", up_types, UP_TYPES)):
        for i, t in enumerate(types):
            if t not in table:
                raise ConfigError(f"block type {t!r} is not supported (use one of {', '.join(table)})",
                                  field=f"{key}[{i}]")
    mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in MID_TYPES:
        raise ConfigError(f"mid block type {mid_type!r} is not supported (UNetMidBlock2DCrossAttn or null)",
                          field="mid_block_type")

    channels = _per_stage(cfg.get("block_out_channels", [320, 640, 1280, 1280]), n, "block_out_channels")
    layers = _per_stage(cfg.get("layers_per_block", 2), n, "layers_per_block")
    heads = _per_stage(cfg.get("attention_head_dim", 8), n, "attention_head_dim")  # diffusers: it means heads
    cross = _per_stage(cfg.get("cross_attention_dim", 1280), n, "cross_attention_dim")
    if len(set(cross)) != 1:
        raise ConfigError("per-stage cross-attention widths are not supported", field="cross_attention_dim")
    depth = [_uniform(d, "transformer_layers_per_block")
             for d in _per_stage(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")]
    rev = cfg.get("reverse_transformer_layers_per_block")
    up_depth = [_uniform(d, "reverse_transformer_layers_per_block")
                for d in _per_stage(rev, n, "reverse_transformer_layers_per_block")] if rev else depth[::-1]

    def attn(has: bool, count: int, h: int, d: int) -> dict[str, Any]:
        return {"attentions": count, "heads": h, "transformer_layers": d} if has else {"attentions": 0}

    down = [{"channels": channels[i], "resnets": layers[i],
             **attn(DOWN_TYPES[down_types[i]], layers[i], heads[i], depth[i]), "downsample": i < n - 1}
            for i in range(n)]
    up = []
    for i in range(n):
        j = n - 1 - i
        up.append({"channels": channels[j], "resnets": layers[j] + 1,
                   **attn(UP_TYPES[up_types[i]], layers[j] + 1, heads[j], up_depth[i]), "upsample": i < n - 1})
    mid = None
    if mid_type is not None:
        mid = {"resnets": 2, "attentions": 1, "heads": heads[-1], "transformer_layers": depth[-1]}
    sample_size = cfg.get("sample_size") or 64
    if isinstance(sample_size, Sequence):
        if len(set(sample_size)) != 1:
            raise ConfigError("non-square sample sizes are not supported", field="sample_size")
        sample_size = sample_size[0]
    if cfg.get("norm_num_groups", 32) is None:
        raise ConfigError("null (no output norm) is not supported", field="norm_num_groups")
    return {
        "sample_size": sample_size,
        "in_channels": cfg.get("in_channels", 4),
        "out_channels": cfg.get("out_channels", 4),
        "cross_attention_dim": cross[0],
        "use_linear_projection": bool(cfg.get("use_linear_projection", False)),
        "upcast_attention": bool(cfg.get("upcast_attention", False)),
        "norm_num_groups": cfg.get("norm_num_groups", 32),
        "norm_eps": float(cfg.get("norm_eps", 1e-5)),
        "act_fn": cfg.get("act_fn", "silu"),
        "time_embedding_dim": cfg.get("time_embedding_dim"),
        "flip_sin_to_cos": bool(cfg.get("flip_sin_to_cos", True)),
        "freq_shift": cfg.get("freq_shift", 0),
        "time_cond_proj_dim": cfg.get("time_cond_proj_dim"),
        "down_skip": "after_attention",
        "down": down,
        "mid": mid,
        "up": up,
    }


_DECI_KEYS = {
    "down_blocks_in_channels", "down_blocks_out_channels", "down_blocks_num_resnets", "down_blocks_num_attentions",
    "add_downsample", "mid_num_resnets", "mid_num_attentions", "add_upsample_mid_block", "prev_output_channels",
    "up_blocks_num_resnets", "up_blocks_num_attentions", "add_upsample", "num_attention_heads",
    "cross_attention_dim", "temb_dim", "resnet_eps", "resnet_act_fn", "mix_block_in_forward", "sample_size",
}


def arch_dict_from_decidiffusion(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """UNetArch data for DeciDiffusion's ``flexible_unet/config.json`` (or its bare ``configurations`` dict).

    How Deci's conventions map onto FlexibleUNet's:

    * ``mix_block_in_forward: true`` is Deci's interleaved R, A, R, A, ... order, which FlexibleUNet always
      uses; ``false`` (all ResNets, then all attentions) is refused.
    * Deci's mid block always prepends one ResNet to ``mid_num_resnets`` and runs attention before each further
      ResNet, so ``mid_num_resnets: 4, mid_num_attentions: 2`` is R A R A R R R = 5 ResNets + 2 attentions
      interleaved. (Deci's forward also runs that first ResNet a second time with the same weights; FlexibleUNet
      runs every block once, so outputs of a Deci checkpoint would differ in the mid block.)
    * Deci takes each down skip right after its ResNet: ``down_skip: after_resnet``.
    * The last down stage's downsampler feeds the mid block, not a skip (FlexibleUNet's rule too).
    * Up widths are the down widths reversed; ``prev_output_channels`` and ``down_blocks_in_channels`` are
      checked against the wiring FlexibleUNet derives.
    """
    conf = cfg.get("configurations", cfg)
    if not isinstance(conf, Mapping):
        raise ConfigError("expected a mapping", field="configurations")
    where = "configurations" if "configurations" in cfg else ""

    def field(key: str) -> str:
        return f"{where}.{key}" if where else key

    for key in conf:
        if key not in _DECI_KEYS:
            raise ConfigError("unknown DeciDiffusion configurations key", field=field(key))
    missing = [k for k in ("down_blocks_out_channels", "down_blocks_num_resnets", "down_blocks_num_attentions",
                           "up_blocks_num_resnets", "up_blocks_num_attentions") if k not in conf]
    if missing:
        raise ConfigError("missing", field=field(missing[0]))
    if conf.get("mix_block_in_forward", True) is not True:
        raise ConfigError("false (all ResNets before all attentions) is not supported; FlexibleUNet interleaves",
                          field=field("mix_block_in_forward"))
    outs = list(conf["down_blocks_out_channels"])
    n = len(outs)

    def per(key: str, default: Any = None) -> list[Any]:
        value = conf.get(key, default)
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != n:
            raise ConfigError(f"expected a list of {n} entries (one per stage)", field=field(key))
        return list(value)

    ins = per("down_blocks_in_channels", [outs[0], *outs[:-1]])
    if ins[0] != outs[0] or any(ins[i] != outs[i - 1] for i in range(1, n)):
        raise ConfigError(f"{ins} does not chain the stage widths {outs} (conv_in has the first stage's width)",
                          field=field("down_blocks_in_channels"))
    heads = conf.get("num_attention_heads", 8)
    down = [{"channels": c, "resnets": r, "attentions": a, "heads": heads, "transformer_layers": 1, "downsample": d}
            for c, r, a, d in zip(outs, per("down_blocks_num_resnets"), per("down_blocks_num_attentions"),
                                  per("add_downsample", [True] * (n - 1) + [False]), strict=True)]
    up_ch = outs[::-1]
    prev = per("prev_output_channels", [outs[-1], *up_ch[:-1]])
    if prev != [outs[-1], *up_ch[:-1]]:
        raise ConfigError(f"{prev} does not match the widths the up stages receive ({[outs[-1], *up_ch[:-1]]})",
                          field=field("prev_output_channels"))
    up = [{"channels": c, "resnets": r, "attentions": a, "heads": heads, "transformer_layers": 1, "upsample": u}
          for c, r, a, u in zip(up_ch, per("up_blocks_num_resnets"), per("up_blocks_num_attentions"),
                                per("add_upsample", [True] * (n - 1) + [False]), strict=True)]
    mid = {"resnets": int(conf.get("mid_num_resnets", 1)) + 1, "attentions": int(conf.get("mid_num_attentions", 1)),
           "heads": heads, "transformer_layers": 1, "upsample": bool(conf.get("add_upsample_mid_block", False))}
    return {
        "sample_size": conf.get("sample_size", cfg.get("sample_size", 64)),
        "cross_attention_dim": conf.get("cross_attention_dim", cfg.get("cross_attention_dim", 768)),
        "norm_eps": float(conf.get("resnet_eps", 1e-5)),
        "act_fn": conf.get("resnet_act_fn", "silu"),
        "time_embedding_dim": conf.get("temb_dim", 4 * outs[0]),
        "down_skip": "after_resnet",
        "down": down,
        "mid": mid,
        "up": up,
    }
