"""Per-block and whole-network ONNX export, for devices UNet-NAS cannot time from Python.

Vendor toolchains (Qualcomm's Cloud AI SDK, TensorRT, ...) all take ONNX. ``export_space`` writes every distinct
block a space can produce, under the same lookup-table keys the PyTorch profiler uses
(:func:`proxies.latency.blocks.space_blocks`), as a standalone ONNX model with static shapes and named inputs,
plus the calibration whole networks, plus ``manifest.json``. A user times the files with their own toolchain (or
``unet-nas profile run-onnx``) and imports the timings (:mod:`.onnx_import`) as an ordinary LUT profile.

Every exported model is checked against PyTorch with ONNX Runtime on the CPU: an fp32 export of the same module
and inputs is run and the max abs difference is recorded (the deployment dtype, e.g. fp16, is what is written;
CPU fp16 kernels are too incomplete to be the reference).

The manifest (:mod:`.onnx_manifest`) pins what was exported, so that a folder whose files changed after export,
or timings for a space that no longer matches, are refused.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)`` by default. Both exporters produce
graphs that match PyTorch to ~1e-6 on diffusers' ResNet, transformer, resampler and whole-U-Net modules with
static shapes, in fp32 and fp16; the TorchScript one does it about 4-10x faster (0.05-0.3 s per block against
1-2.5 s, 5 s against 20 s for a small whole network on one CPU core), which matters for a space with hundreds of
blocks, and it needs no extra package. ``exporter="dynamo"`` (torch.export + onnxscript) is available for torch
versions that drop the TorchScript path.
"""

from __future__ import annotations

import datetime as _dt
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from search_spaces.arch import BlockSpec, UNetArch
from search_spaces.errors import ConfigError

from .blocks import block_inputs, build_block, space_blocks
from .onnx_manifest import CHECK_TOLERANCE, Manifest, ModelEntry, sha256_file, space_hash
from .profile import Settings

OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
NP_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "int64": "int64"}

ProgressFn = Callable[[str, int, int, str], None]  # (phase, done, total, label)


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or a ConfigError saying how to install them (they are an optional extra)."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(f"ONNX export and timing need the onnx extra ({exc.name} is missing): "
                          "pip install 'unet-nas[onnx]'") from None
    return onnx, onnxruntime


# ---- modules with export-friendly signatures ---------------------------------------------------------------------


def _export_module(arch: UNetArch, b: BlockSpec, settings: Settings, dtype: Any) -> tuple[Any, list[str], tuple]:
    """(module, input names, inputs) for one block: the profiler's module and inputs (same constructors, same
    shapes), with names that say what each input is and the time embedding fed its timesteps only."""
    import torch
    from torch import nn

    module = build_block(arch, b).to(dtype=dtype).eval()
    inputs = block_inputs(arch, b, module, arch.sizes(settings.latent_size), settings.batch, settings.text_len,
                          dtype, torch.device("cpu"))
    if b.kind == "resnet":
        names = ["hidden_states", "temb", "res_hidden_states"][: len(inputs)]
        return module, names, inputs
    if b.kind == "attention":
        return module, ["hidden_states", "encoder_hidden_states"], inputs
    if b.kind == "time_embedding":
        class _Time(nn.Module):
            def __init__(self, inner: nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, timestep: torch.Tensor) -> torch.Tensor:
                emb = self.inner.time_proj(timestep)
                return self.inner.time_embedding(emb.to(dtype=self.inner.time_embedding.linear_1.weight.dtype))

        return _Time(module).eval(), ["timestep"], inputs[:1]
    return module, ["hidden_states"], inputs


class _Network:
    """Factory of a whole-network module returning a plain tensor (ONNX outputs cannot be dataclasses)."""

    @staticmethod
    def wrap(model: Any) -> Any:
        import torch
        from torch import nn

        class UNetForward(nn.Module):
            def __init__(self, unet: nn.Module) -> None:
                super().__init__()
                self.unet = unet

            def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                        encoder_hidden_states: torch.Tensor) -> torch.Tensor:
                return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

        return UNetForward(model).eval()


NETWORK_INPUTS = ["sample", "timestep", "encoder_hidden_states"]


def network_inputs(arch: UNetArch, settings: Settings, dtype: Any) -> tuple[Any, ...]:
    """A forward-pass input at the settings' batch, latent size and text length (seeded, on the CPU)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    n, size = settings.batch, settings.latent_size
    sample = torch.randn(n, arch.in_channels, size, size, generator=gen).to(dtype)
    text = torch.randn(n, settings.text_len, arch.cross_attention_dim, generator=gen).to(dtype)
    return sample, torch.full((n,), 500, dtype=torch.int64), text


# ---- export and check ----------------------------------------------------------------------------------------


def opset_for(exporter: str, opset: int = OPSET) -> int:
    """The opset actually used: the dynamo exporter starts at opset 18."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"must be one of {', '.join(EXPORTERS)}, got {exporter!r}", field="exporter")
    return max(opset, 18) if exporter == "dynamo" else opset


def _export(module: Any, inputs: tuple, names: list[str], path: Path, exporter: str, opset: int) -> None:
    import torch

    if exporter not in EXPORTERS:
        raise ConfigError(f"must be one of {', '.join(EXPORTERS)}, got {exporter!r}", field="exporter")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings about shape asserts: shapes are static here
            if exporter == "torchscript":
                torch.onnx.export(module, inputs, str(tmp), input_names=names, output_names=["output"],
                                  opset_version=opset, dynamo=False)
            else:
                import logging

                logging.getLogger("torch.onnx").setLevel(logging.ERROR)
                program = torch.onnx.export(module, inputs, input_names=names, output_names=["output"],
                                            opset_version=opset, dynamo=True, verbose=False)
                program.save(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ort_session(path: str | os.PathLike, providers: Sequence[Any] = ("CPUExecutionProvider",),
                threads: int | None = None) -> Any:
    """An ONNX Runtime session with full graph optimisation and quiet logs; ``threads`` sets intra-op threads
    (inter-op parallelism is off: one stream of work, as in the PyTorch profile)."""
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))


def check_against_torch(path: Path, module: Any, inputs: tuple, names: list[str]) -> float:
    """Max abs difference between ONNX Runtime (CPU) on ``path`` and PyTorch on the same inputs; a difference
    above :data:`CHECK_TOLERANCE` (relative to the output's scale) is an error, not a number to record."""
    import numpy as np
    import torch

    onnx, _ = require_onnx()
    onnx.checker.check_model(str(path))
    sess = ort_session(path, threads=torch.get_num_threads())
    feeds = {n: x.numpy() for n, x in zip(names, inputs, strict=True)}
    got = sess.run(None, feeds)[0]
    with torch.no_grad():
        ref = module(*inputs).float().numpy()
    diff = float(np.abs(got.astype(np.float32) - ref).max())
    scale = max(1.0, float(np.abs(ref).max()))
    if not diff <= CHECK_TOLERANCE * scale:
        raise ConfigError(f"ONNX Runtime output differs from PyTorch by {diff:.3g} (tolerance "
                          f"{CHECK_TOLERANCE * scale:.3g}): the exporter mis-translated this model",
                          field=str(path.name))
    return diff


def export_checked(build: Callable[[Any], tuple[Any, list[str], tuple]], path: Path, dtype_name: str,
                   exporter: str = "torchscript", opset: int = OPSET, check: bool = True) -> tuple[list[str], tuple,
                                                                                                  float | None]:
    """Export ``build(torch_dtype) -> (module, names, inputs)`` at ``dtype_name`` to ``path``; with ``check``,
    an fp32 export of the same module (same seed, so the same weights) is first checked on ONNX Runtime CPU.
    Returns (input names, inputs at the export dtype, max abs diff of the fp32 check or None)."""
    import torch

    from .timing import torch_dtype

    opset = opset_for(exporter, opset)
    diff = None
    if check:
        torch.manual_seed(0)
        module, names, inputs = build(torch.float32)
        ref_path = path if dtype_name == "fp32" else path.with_name(f".{path.stem}.fp32check.onnx")
        _export(module, inputs, names, ref_path, exporter, opset)
        try:
            diff = check_against_torch(ref_path, module, inputs, names)
        finally:
            if ref_path != path:
                ref_path.unlink(missing_ok=True)
        if dtype_name == "fp32":
            return names, inputs, diff
    torch.manual_seed(0)
    module, names, inputs = build(torch_dtype(dtype_name))
    _export(module, inputs, names, path, exporter, opset)
    return names, inputs, diff


def export_network(arch: UNetArch, settings: Settings, path: str | os.PathLike, *, model: Any = None,
                   exporter: str = "torchscript", opset: int = OPSET, check: bool = True) -> dict[str, Any]:
    """Export one whole U-Net (``model``: trained weights, a FlexibleUNet of ``arch``; default: a seeded random
    initialisation, enough for timing) with static shapes at ``settings``. Returns the model's manifest entry
    fields: inputs with shapes and dtypes, the check's max abs diff, sha256."""
    import torch

    from search_spaces.flexible_unet import FlexibleUNet2DConditionModel

    require_onnx()
    path = Path(path)
    opset = opset_for(exporter, opset)

    def build(dtype: Any) -> tuple[Any, list[str], tuple]:
        if model is None:
            net = FlexibleUNet2DConditionModel.from_arch(arch)
        else:
            import copy

            net = copy.deepcopy(model)
        torch.nn.Module.to(net, dtype=dtype)
        return _Network.wrap(net), list(NETWORK_INPUTS), network_inputs(arch, settings, dtype)

    names, inputs, diff = export_checked(build, path, settings.dtype, exporter, opset, check)
    return _entry(path, names, inputs, diff)


def _entry(path: Path, names: list[str], inputs: tuple, diff: float | None) -> dict[str, Any]:
    return {
        "inputs": [{"name": n, "shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
                   for n, x in zip(names, inputs, strict=True)],
        "max_abs_diff": None if diff is None else float(f"{diff:.3g}"),
        "sha256": sha256_file(path),
    }


# ---- the whole space -----------------------------------------------------------------------------------------


def export_space(space: Any, settings: Settings, out: str | os.PathLike, *, space_file: str,
                 extra_archs: Iterable[UNetArch] = (), calibration: int = 12, seed: int = 0,
                 exporter: str = "torchscript", opset: int = OPSET, check: bool = True,
                 progress: ProgressFn | None = None) -> Manifest:
    """Export every distinct block of ``space`` (plus ``extra_archs``' blocks) and the calibration networks (the
    same seeded sample the PyTorch profiler measures, plus ``extra_archs``) to ``out``; write the manifest last,
    so a folder without one is an unfinished export."""
    import diffusers
    import torch

    from .profiler import calibration_archs

    onnx, ort = require_onnx()
    opset = opset_for(exporter, opset)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)  # a re-export is valid only once it finishes
    extra = list(extra_archs)
    blocks = sorted(space_blocks(space, settings.latent_size, extra).items())
    cal = calibration_archs(space, calibration, seed)
    cal += [a for a in extra if a not in cal]
    models: list[ModelEntry] = []
    for i, (key, (arch, b)) in enumerate(blocks):
        if progress:
            progress("blocks", i, len(blocks), key)
        rel = f"blocks/{i:04d}_{b.kind}.onnx"
        names, inputs, diff = export_checked(lambda dt, a=arch, bb=b: _export_module(a, bb, settings, dt),
                                             root / rel, settings.dtype, exporter, opset, check)
        models.append(ModelEntry(key=key, kind=b.kind, file=rel, **_entry(root / rel, names, inputs, diff)))
    if progress:
        progress("blocks", len(blocks), len(blocks), "")
    for i, arch in enumerate(cal):
        if progress:
            progress("networks", i, len(cal), arch.name or f"calibration {i}")
        rel = f"networks/cal{i:02d}.onnx"
        entry = export_network(arch, settings, root / rel, exporter=exporter, opset=opset, check=check)
        models.append(ModelEntry(key=f"network cal{i:02d}", kind="network", file=rel, arch=arch, **entry))
    if progress:
        progress("networks", len(cal), len(cal), "")
    env = {"torch": str(torch.__version__), "diffusers": str(diffusers.__version__), "onnx": onnx.__version__,
           "onnxruntime": ort.__version__,
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    manifest = Manifest(root=root, settings=settings, opset=opset, exporter=exporter, space_file=space_file,
                        space_sha256=space_hash(space), extra_archs=extra, models=models, environment=env)
    manifest.save()
    return manifest
