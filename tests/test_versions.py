"""The installed releases are the ones the Ray backend was tested with (nas.search.tested).

Run against the newest releases (``.ci/run --latest``), this is the test that names a package whose new release
has not been tried yet: if the rest of the suite passes on it, widen the range in nas/search/tested.py.
"""

from __future__ import annotations

from nas.search.tested import RAY_BACKEND_TESTED, untested


def test_installed_releases_are_inside_the_ray_backends_tested_ranges():
    problems = untested()
    assert not problems, "; ".join(problems)


def test_a_release_outside_the_range_is_named():
    problems = untested({"optuna": "<1.0", "ray": RAY_BACKEND_TESTED["ray"], "no-such-package-xyz": ">=1"})
    assert len(problems) == 2
    assert problems[0].startswith("optuna ") and "(optuna<1.0)" in problems[0]
    assert problems[1] == "no-such-package-xyz is not installed (tested: >=1)"
