"""The releases the Ray backend was tested with, and a check of what is installed against them.

The Ray backend leans on the internals of two fast-moving packages: Ray Tune pickles Optuna's sampler and
storage with the searcher, and UNet-NAS starts Ray's token authentication itself. Optuna 5.1 broke the first
(a lock in ``NSGAIISampler``) with no API change, so a release outside these ranges may work or may not:
``unet-nas search`` says so in one line before a Ray search, and ``tests/test_versions.py`` fails naming the
package, which is the signal to run the suite on it and widen the range here (and in ``constraints.txt``).

``pyproject.toml`` keeps open ranges so that users are not frozen out of new releases; these are narrower on
purpose: they say what is known to work, not what is allowed.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# package -> the releases the suite (tests/test_ray.py included) passed with
RAY_BACKEND_TESTED: dict[str, str] = {
    "ray": ">=2.60,<2.61",
    "optuna": ">=5.0,<5.2",
}


def untested(ranges: dict[str, str] = RAY_BACKEND_TESTED) -> list[str]:
    """One line per installed package outside its tested range (an empty list when all are inside)."""
    problems = []
    for package, spec in ranges.items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            problems.append(f"{package} is not installed (tested: {spec})")
            continue
        if not SpecifierSet(spec).contains(Version(installed), prereleases=True):
            problems.append(f"{package} {installed} is outside the range the Ray backend was tested with "
                            f"({package}{spec})")
    return problems
