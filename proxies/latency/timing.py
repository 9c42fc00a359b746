"""The measurement protocol: one thread, warm-up, device synchronisation, repeats until the statistic is stable.

On a shared machine the protocol matters more than the predictor. Measured on a 2-core shared CPU, the same
network timed twice a few minutes apart with 2 threads and the median of 20 runs agreed within ±10% only a third
of the time; with 1 thread and the minimum of 20 runs the repeat spread fell to 5-10%. Hence the defaults: 1 CPU
thread, the minimum (or a low percentile) after warm-up, and whole networks timed *interleaved* (one run of each
network in turn) so that a burst of load from another process hits all of them alike. On GPUs each run is timed
with CUDA events recorded after a synchronisation, so queued work from earlier runs never leaks into a sample.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from search_spaces.arch import UNetArch
from search_spaces.errors import ConfigError

from .profile import EXTERNAL, Protocol, Settings, Timing

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def torch_device(settings: Settings) -> Any:
    """The torch device of ``settings``; asking for CUDA on a machine without it is a user error."""
    import torch

    if settings.device == EXTERNAL:
        raise ConfigError("this profile was imported from timings taken outside PyTorch (device: external); "
                          "it cannot be measured here: time the exported networks with that toolchain",
                          field="device")
    if settings.is_cuda and not torch.cuda.is_available():
        raise ConfigError(f"device {settings.device!r} requested but CUDA is not available on this machine",
                          field="device")
    return torch.device(settings.device)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (what profiles and benchmark results record)."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(settings: Settings) -> str:
    """A human-readable device name recorded in the profile (GPU model or CPU model and thread count)."""
    import torch

    if settings.is_cuda:
        return torch.cuda.get_device_name(torch_device(settings))
    return f"{cpu_name()} ({settings.threads or torch.get_num_threads()} thread(s))"


@contextlib.contextmanager
def measuring(settings: Settings) -> Iterator[None]:
    """Inference mode with the requested thread count, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(before)


def make_timer(settings: Settings) -> Callable[[Callable[[], Any]], float]:
    """A function that runs ``fn`` once and returns its wall time in ms, synchronised on GPUs."""
    import torch

    if settings.is_cuda:
        device = torch_device(settings)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def cuda_timer(fn: Callable[[], Any]) -> float:
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))

        return cuda_timer

    def cpu_timer(fn: Callable[[], Any]) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return cpu_timer


def graphed(fn: Callable[[], Any], settings: Settings) -> Callable[[], Any]:
    """``fn`` itself, or with ``settings.cuda_graph`` the replay of a CUDA graph that captured it once.

    Capture follows PyTorch's recipe: a few runs on a side stream first (allocator and cuDNN/cuBLAS warm-up must
    not happen during capture), then one run inside ``torch.cuda.graph``. The inputs stay the captured tensors,
    which is all a latency measurement needs.
    """
    if not (settings.is_cuda and settings.cuda_graph):
        return fn
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def statistic(samples: Sequence[float], name: str) -> float:
    """The protocol's robust statistic: ``min``, a low percentile ``pNN`` or the ``median``."""
    if name == "min":
        return float(min(samples))
    if name == "median":
        return float(np.median(samples))
    return float(np.percentile(samples, int(name[1:])))


def summarise(samples: Sequence[float], protocol: Protocol) -> Timing:
    p10, p50, p90 = np.percentile(samples, [10, 50, 90])
    return Timing(statistic(samples, protocol.statistic), float(p50), float(100 * (p90 - p10) / p50), len(samples))


def _stable(samples: Sequence[float], protocol: Protocol) -> bool:
    """Whether the statistic moved less than ``rel_tol`` over the last ``min_repeats // 2`` samples."""
    n = len(samples)
    if n < protocol.min_repeats:
        return False
    window = max(1, protocol.min_repeats // 2)
    before = statistic(samples[: n - window], protocol.statistic) if n > window else float("inf")
    now = statistic(samples, protocol.statistic)
    return abs(before - now) <= protocol.rel_tol * now


def measure_callable(fn: Callable[[], Any], settings: Settings, protocol: Protocol) -> Timing:
    """Warm up, then time ``fn`` until the statistic is stable (or ``max_repeats``)."""
    timer = make_timer(settings)
    fn = graphed(fn, settings)
    for _ in range(protocol.warmup):
        fn()
    samples: list[float] = []
    while len(samples) < protocol.max_repeats:
        samples.append(timer(fn))
        if _stable(samples, protocol):
            break
    return summarise(samples, protocol)


# ---- whole networks ----------------------------------------------------------------------------------------------


def build_network(arch: UNetArch, settings: Settings) -> tuple[Any, tuple[Any, ...]]:
    """The FlexibleUNet of ``arch`` on the device in the profile's dtype/layout (compiled if asked), and a
    forward-pass input of the profile's batch, latent size and text length."""
    import torch

    from search_spaces.flexible_unet import FlexibleUNet2DConditionModel

    device, dtype = torch_device(settings), torch_dtype(settings.dtype)
    torch.manual_seed(0)
    # built straight on the device: random init of a ~1B-parameter net on the CPU costs seconds per network
    with torch.device(device) if settings.is_cuda else contextlib.nullcontext():
        model = FlexibleUNet2DConditionModel.from_arch(arch).eval()
    # nn.Module.to, not ModelMixin.to: the latter warns about keeping modules in fp32 (there are none here)
    torch.nn.Module.to(model, device=device, dtype=dtype)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if settings.compile:
        model = torch.compile(model)
    gen = torch.Generator().manual_seed(1)
    n, size = settings.batch, settings.latent_size
    sample = torch.randn(n, arch.in_channels, size, size, generator=gen).to(device=device, dtype=dtype)
    if settings.channels_last:
        sample = sample.contiguous(memory_format=torch.channels_last)
    text = torch.randn(n, settings.text_len, arch.cross_attention_dim, generator=gen).to(device=device, dtype=dtype)
    timestep = torch.full((n,), 500, dtype=torch.int64, device=device)
    return model, (sample, timestep, text)


def measure_networks(archs: Sequence[UNetArch], settings: Settings, protocol: Protocol, group: int = 8,
                     on_group: Callable[[list[tuple[UNetArch, Timing]]], None] | None = None) -> list[Timing]:
    """Time whole networks interleaved: within each group of ``group`` models, round after round one forward
    pass of each, until every model's statistic is stable. ``on_group`` is called after each group (to save)."""
    timer = make_timer(settings)
    out: list[Timing] = []
    with measuring(settings):
        for start in range(0, len(archs), group):
            chunk = archs[start:start + group]
            nets = [build_network(a, settings) for a in chunk]
            calls = [graphed(lambda m=m, x=x: m(*x, return_dict=False), settings) for m, x in nets]
            for _ in range(protocol.warmup):
                for call in calls:
                    call()
            samples: list[list[float]] = [[] for _ in calls]
            while len(samples[0]) < protocol.max_repeats:
                for k, call in enumerate(calls):
                    samples[k].append(timer(call))
                if all(_stable(s, protocol) for s in samples):
                    break
            timings = [summarise(s, protocol) for s in samples]
            out.extend(timings)
            del nets, calls
            if on_group is not None:
                on_group(list(zip(chunk, timings, strict=True)))
    return out


def measure_network(arch: UNetArch, settings: Settings, protocol: Protocol) -> Timing:
    """One whole network, timed with the profile's protocol (``predict --measure``)."""
    return measure_networks([arch], settings, protocol)[0]
