"""`FlexibleUNet2DConditionModel`: a diffusers model built from a :class:`~search_spaces.arch.UNetArch`.

It is assembled from diffusers' own ``ResnetBlock2D``, ``Transformer2DModel``, ``Downsample2D``,
``Upsample2D``, ``Timesteps`` and ``TimestepEmbedding``, created with the same arguments diffusers'
``UNet2DConditionModel`` passes them and registered under the same module names (``down_blocks.0.resnets.1``,
``mid_block.attentions.0``, ...). So an SD-family ``UNet2DConditionModel`` state dict loads into the
FlexibleUNet of the same arch unchanged, and gives the same output; see :meth:`from_unet2d`.

The stage containers here differ from diffusers' in one way only: a stage holds any number of ResNets and
attentions and runs them in the interleaved order of :func:`search_spaces.arch.interleave`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.activations import get_activation
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput
from torch import nn

from .arch import BlockSpec, UNetArch, interleave


def _resnet(arch: UNetArch, b: BlockSpec) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=b.in_channels,
        out_channels=b.out_channels,
        temb_channels=arch.temb_channels,
        eps=arch.norm_eps,
        groups=arch.norm_num_groups,
        dropout=0.0,
        time_embedding_norm="default",
        non_linearity=arch.act_fn,
        output_scale_factor=1.0,
        pre_norm=True,
    )


def _attention(arch: UNetArch, b: BlockSpec) -> Transformer2DModel:
    return Transformer2DModel(
        b.heads,
        b.out_channels // b.heads,
        in_channels=b.out_channels,
        num_layers=b.transformer_layers,
        cross_attention_dim=arch.cross_attention_dim,
        norm_num_groups=arch.norm_num_groups,
        use_linear_projection=arch.use_linear_projection,
        only_cross_attention=False,
        upcast_attention=arch.upcast_attention,
        attention_type="default",
    )


class FlexibleStage(nn.Module):
    """One down stage, the mid block or one up stage: ResNets and attentions interleaved, then a resampler.

    ``role`` decides the skips: a down stage emits them (after each ResNet, or after the attentions that
    follow it, per ``down_skip``), an up stage concatenates one before each ResNet, the mid block does neither.
    """

    def __init__(self, arch: UNetArch, blocks: list[BlockSpec], role: str):
        super().__init__()
        self.role = role
        self.skip_after_resnet = arch.down_skip == "after_resnet"
        resnets = [_resnet(arch, b) for b in blocks if b.kind == "resnet"]
        attentions = [_attention(arch, b) for b in blocks if b.kind == "attention"]
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.order = interleave(len(resnets), len(attentions))
        down = [b for b in blocks if b.kind == "downsample"]
        up = [b for b in blocks if b.kind == "upsample"]
        self.downsamplers = (
            nn.ModuleList([Downsample2D(down[0].in_channels, use_conv=True, out_channels=down[0].out_channels,
                                        padding=1, name="op")]) if down else None
        )
        self.upsamplers = (
            nn.ModuleList([Upsample2D(up[0].in_channels, use_conv=True, out_channels=up[0].out_channels)])
            if up else None
        )
        self.emits_downsample_skip = False  # set by the model for all down stages but the last
        self.gradient_checkpointing = False

    def _resnet(self, idx: int, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        resnet = self.resnets[idx]
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(resnet, hidden, temb)
        return resnet(hidden, temb)

    def forward(
        self,
        hidden: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        skips: list[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Run the stage; a down stage appends its skips to ``skips``, an up stage pops its own from it."""
        emit = self.role == "down"
        for pos, (kind, idx) in enumerate(self.order):
            if kind == "resnet":
                if self.role == "up":
                    hidden = torch.cat([hidden, skips.pop()], dim=1)
                hidden = self._resnet(idx, hidden, temb)
                if emit and self.skip_after_resnet:
                    skips.append(hidden)
            else:
                hidden = self.attentions[idx](
                    hidden,
                    encoder_hidden_states=encoder_hidden_states,
                    cross_attention_kwargs=cross_attention_kwargs,
                    attention_mask=attention_mask,
                    encoder_attention_mask=encoder_attention_mask,
                    return_dict=False,
                )[0]
            if emit and not self.skip_after_resnet:
                # diffusers' convention: the skip is the state just before the next ResNet (or the stage end)
                nxt = self.order[pos + 1][0] if pos + 1 < len(self.order) else "end"
                seen_resnet = any(k == "resnet" for k, _ in self.order[: pos + 1])
                if seen_resnet and nxt in ("resnet", "end"):
                    skips.append(hidden)
        if self.downsamplers is not None:
            hidden = self.downsamplers[0](hidden)
            if self.emits_downsample_skip:
                skips.append(hidden)
        if self.upsamplers is not None:
            hidden = self.upsamplers[0](hidden, upsample_size)
        return hidden


class FlexibleUNet2DConditionModel(ModelMixin, AttentionMixin, ConfigMixin):
    """A text-conditioned U-Net whose every stage has its own width, ResNet count, attention count, heads and
    transformer depth; a drop-in for diffusers' ``UNet2DConditionModel`` (same forward, same output type,
    usable as ``StableDiffusionPipeline(unet=...)``). ``AttentionMixin`` gives it diffusers' attention-processor
    API (``attn_processors``, ``set_attn_processor``); attention slicing, QKV fusion and
    ``set_default_attn_processor`` are UNet2DConditionModel's, so ``pipe.enable_attention_slicing()`` and
    ``pipe.fuse_qkv_projections()`` act on it as on an SD U-Net.

    The config *is* the arch: ``FlexibleUNet2DConditionModel(**arch.to_dict())`` or :meth:`from_arch`, and
    ``model.arch`` gives the :class:`UNetArch` back. ``save_pretrained``/``from_pretrained`` work as for any
    diffusers model (``config.json`` + safetensors).
    """

    _supports_gradient_checkpointing = True
    # diffusers' pipelines call these on their U-Net; AttentionMixin's versions look for the new attention class
    # (AttentionModuleMixin) and so do nothing for the Transformer2DModel attentions both U-Nets are built from.
    # UNet2DConditionModel's own versions walk any module tree, so they are used here unchanged: the same
    # slicing, fusion (FusedAttnProcessor2_0, with the original processors kept for unfusing) and defaults.
    set_attention_slice = UNet2DConditionModel.set_attention_slice
    set_default_attn_processor = UNet2DConditionModel.set_default_attn_processor
    fuse_qkv_projections = UNet2DConditionModel.fuse_qkv_projections
    _no_split_modules: ClassVar[list[str]] = ["BasicTransformerBlock", "ResnetBlock2D"]
    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["norm"]

    @register_to_config
    def __init__(
        self,
        down: list[dict[str, Any]] | None = None,
        mid: dict[str, Any] | None = None,
        up: list[dict[str, Any]] | None = None,
        sample_size: int = 64,
        in_channels: int = 4,
        out_channels: int = 4,
        cross_attention_dim: int = 768,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        act_fn: str = "silu",
        time_embedding_dim: int | None = None,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_cond_proj_dim: int | None = None,
        down_skip: str = "after_attention",
        name: str = "",
    ):
        super().__init__()
        arch = UNetArch.from_dict(dict(
            down=down, mid=mid, up=up, sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            cross_attention_dim=cross_attention_dim, use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention, norm_num_groups=norm_num_groups, norm_eps=norm_eps, act_fn=act_fn,
            time_embedding_dim=time_embedding_dim, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift,
            time_cond_proj_dim=time_cond_proj_dim, down_skip=down_skip, name=name,
        ))
        self._arch = arch
        blocks = arch.blocks
        c0 = arch.stem_channels

        self.time_proj = Timesteps(c0, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(c0, arch.temb_channels, act_fn=act_fn,
                                                cond_proj_dim=time_cond_proj_dim)
        self.conv_in = nn.Conv2d(in_channels, c0, kernel_size=3, padding=1)

        def stage(name: str, role: str) -> FlexibleStage:
            return FlexibleStage(arch, [b for b in blocks if b.stage == name], role)

        self.down_blocks = nn.ModuleList(stage(f"down[{i}]", "down") for i in range(len(arch.down)))
        for block in list(self.down_blocks)[:-1]:
            block.emits_downsample_skip = True
        self.mid_block = stage("mid", "mid") if arch.mid is not None else None
        self.up_blocks = nn.ModuleList(stage(f"up[{i}]", "up") for i in range(len(arch.up)))

        c_out = arch.up[-1].channels
        self.conv_norm_out = nn.GroupNorm(num_channels=c_out, num_groups=norm_num_groups, eps=norm_eps)
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(c_out, out_channels, kernel_size=3, padding=1)
        self.original_attn_processors: dict[str, Any] | None = None  # set by fuse_qkv_projections

    def unfuse_qkv_projections(self) -> None:
        """Undo :meth:`fuse_qkv_projections`: the processors from before it come back and the fused copies
        (``to_qkv``, ``to_kv``) are dropped, so the state dict (and a ``save_pretrained``) is the unfused one."""
        from diffusers.models.attention_processor import Attention

        if self.original_attn_processors is not None:
            self.set_attn_processor(self.original_attn_processors)
            self.original_attn_processors = None
        for module in self.modules():
            if isinstance(module, Attention) and getattr(module, "fused_projections", False):
                for name in ("to_qkv", "to_kv", "to_added_qkv"):
                    if hasattr(module, name):
                        delattr(module, name)
                module.fused_projections = False

    @property
    def arch(self) -> UNetArch:
        """The architecture this model was built from."""
        return self._arch

    # ---- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_arch(cls, arch: UNetArch | str, **kwargs: Any) -> FlexibleUNet2DConditionModel:
        """Build a randomly initialised model; ``arch`` may be a UNetArch or a reference name like ``"sd15"``."""
        if isinstance(arch, str):
            from .registry import get_arch

            arch = get_arch(arch)
        return cls(**arch.to_dict(), **kwargs)

    @classmethod
    def from_unet2d(cls, unet: UNet2DConditionModel) -> FlexibleUNet2DConditionModel:
        """An exact copy of a diffusers UNet2DConditionModel: same weights, same dtype, same output."""
        arch = UNetArch.from_unet2d_config(unet.config)
        with torch.device("meta"):
            model = cls.from_arch(arch)
        from .checkpoints import load_into

        state = {k: v.detach().clone() for k, v in unet.state_dict().items()}  # never alias the source's weights
        load_into(model, state, strict=True, assign=True)  # keeps the source's dtype and device
        return model

    @classmethod
    def from_unet2d_pretrained(cls, path: str | os.PathLike, allow_pickle: bool = False,
                               **kwargs: Any) -> FlexibleUNet2DConditionModel:
        """Load an SD-family UNet2DConditionModel checkpoint folder as a FlexibleUNet (local files, safetensors
        only unless ``allow_pickle``, strict; see :mod:`search_spaces.checkpoints`). ``from_pretrained``
        arguments such as ``subfolder="unet"`` or ``variant="fp16"`` pass through."""
        from .checkpoints import load_pretrained

        return cls.from_unet2d(load_pretrained(UNet2DConditionModel, path, allow_pickle=allow_pickle, **kwargs))

    # ---- forward -----------------------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple:
        """Same signature and result as ``UNet2DConditionModel.forward``.

        Class labels, added conditioning (SDXL) and ControlNet/T2I-Adapter residuals are refused: their layout
        is tied to diffusers' fixed block structure.
        """
        unsupported = {
            "class_labels": class_labels,
            "down_block_additional_residuals": down_block_additional_residuals,
            "mid_block_additional_residual": mid_block_additional_residual,
            "down_intrablock_additional_residuals": down_intrablock_additional_residuals,
        }
        for key, value in unsupported.items():
            if value is not None:
                raise ValueError(f"FlexibleUNet2DConditionModel does not support `{key}`")
        if added_cond_kwargs:
            raise ValueError("FlexibleUNet2DConditionModel does not support `added_cond_kwargs`")

        # like diffusers: forward the skip's size to the upsamplers when the input is not a multiple of 2**n
        factor = 2 ** self._arch.num_downsamples
        forward_upsample_size = any(dim % factor for dim in sample.shape[-2:])
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)

        timesteps = timestep
        if not torch.is_tensor(timesteps):
            dtype = torch.float32 if isinstance(timesteps, float) else torch.int64
            timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(sample.shape[0])
        t_emb = self.time_proj(timesteps).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb, timestep_cond)

        kwargs = dict(attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask,
                      cross_attention_kwargs=cross_attention_kwargs)
        hidden = self.conv_in(sample)
        skips: list[torch.Tensor] = [hidden]
        for block in self.down_blocks:
            hidden = block(hidden, emb, encoder_hidden_states, skips, **kwargs)
        if self.mid_block is not None:
            size = skips[-1].shape[2:] if (forward_upsample_size and self.mid_block.upsamplers) else None
            hidden = self.mid_block(hidden, emb, encoder_hidden_states, skips, upsample_size=size, **kwargs)
        for block in self.up_blocks:
            size = None
            if forward_upsample_size and block.upsamplers is not None:
                size = skips[-1 - len(block.resnets)].shape[2:]
            hidden = block(hidden, emb, encoder_hidden_states, skips, upsample_size=size, **kwargs)

        hidden = self.conv_out(self.conv_act(self.conv_norm_out(hidden)))
        if not return_dict:
            return (hidden,)
        return UNet2DConditionOutput(sample=hidden)

    def named_stages(self) -> Iterator[tuple[str, FlexibleStage]]:
        """(``"down[0]"``, stage), ..., (``"mid"``, mid), (``"up[0]"``, stage), ... in execution order."""
        for i, block in enumerate(self.down_blocks):
            yield f"down[{i}]", block
        if self.mid_block is not None:
            yield "mid", self.mid_block
        for i, block in enumerate(self.up_blocks):
            yield f"up[{i}]", block

