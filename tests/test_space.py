"""SearchSpace: sampling, encoding, mutation, crossover, exact cardinality, validation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from proxies.cost import arch_costs, constraint_filter
from search_spaces import ConfigError, get_arch
from search_spaces.space import SearchSpace

SPACES = Path(__file__).parents[1] / "search_spaces" / "spaces"

SMALL = {
    "base": "tiny",
    "stages": [2, 3],
    "attention": {"heads": 4, "transformer_layers": 1},
    "down": [{"channels": 32, "resnets": [1, 2], "attentions": [0, 1], "heads": [2, 4]},
             {"channels": 64, "resnets": 1, "attentions": [0, 2]},
             {"channels": 64, "resnets": [1, 2], "attentions": 0}],
    "mid": {"resnets": [0, 1], "attentions": [0, 1], "upsample": [False, True]},
    "up": [{"channels": 64, "attentions": [0, 1]},
           {"channels": 64, "attentions": 1, "transformer_layers": [1, 2]},
           {"channels": 32, "attentions": [0, 3]}],
}


@pytest.mark.parametrize("name", ["sd15", "tiny"])
def test_shipped_spaces_sample_encode_mutate_crossover(name):
    space = SearchSpace.from_yaml(SPACES / f"{name}.yaml")
    rng = random.Random(0)
    for _ in range(100):
        a = space.sample(rng)
        vec = space.encode(a)
        assert len(vec) == len(space.decisions)
        assert space.decode(vec) == a and space.contains(a)
        b = space.mutate(a, rng)
        assert b != a and space.contains(b)
        c = space.crossover(a, b, rng)
        assert space.contains(c)


def test_sd15_space_contains_sd15_and_bk_sdm():
    space = SearchSpace.from_yaml(SPACES / "sd15.yaml")
    for name in ("sd15", "bk_base", "bk_small", "bk_tiny"):
        assert space.contains(get_arch(name)), name
    assert not space.contains(get_arch("tiny"))
    assert space.teacher == "sd15"


def test_cardinality_is_exact():
    space = SearchSpace(SMALL)
    archs = space.enumerate()
    assert len(archs) == len(set(archs)) == space.cardinality()
    assert all(space.contains(a) for a in archs)
    # every arch's encoding is distinct and decodes back
    assert len({tuple(space.encode(a)) for a in archs}) == len(archs)


def test_sampling_reaches_every_depth_and_mid_variant():
    space = SearchSpace(SMALL)
    rng = random.Random(1)
    seen = {(len(a.down), a.mid is None, a.mid is not None and a.mid.upsample) for a in
            (space.sample(rng) for _ in range(300))}
    assert {(2, True, False), (3, False, True), (2, False, False)} <= seen


def test_sampling_is_deterministic_under_a_seed():
    space = SearchSpace.from_yaml(SPACES / "tiny.yaml")
    a = [space.sample(random.Random(5)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_constraints_filter_samples():
    space = SearchSpace.from_yaml(SPACES / "sd15.yaml")
    accept = constraint_filter({"max_params": 600_000_000})
    rng = random.Random(2)
    for _ in range(20):
        assert arch_costs(space.sample(rng, accept=accept)).params <= 600_000_000
    with pytest.raises(ConfigError, match="constraints"):
        space.sample(rng, accept=constraint_filter({"max_params": 10}), max_tries=50)


def test_decode_refuses_bad_vectors():
    space = SearchSpace(SMALL)
    vec = space.encode(space.sample(random.Random(0)))
    with pytest.raises(ConfigError, match="expected"):
        space.decode(vec[:-1])
    bad = list(vec)
    bad[0] = 99
    with pytest.raises(ConfigError, match="stages"):
        space.decode(bad)


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda d: d["down"][0].update(resnets=[0, 1]), "down[0].resnets"),
        (lambda d: d["down"][1].update(heads=[3]), "down[1].heads"),
        (lambda d: d["up"][0].update(resnets=[2]), "up[0].resnets"),
        (lambda d: d.update(stages=[4]), "stages"),
        (lambda d: d.update(up=d["up"][:2]), "up"),
        (lambda d: d["down"][0].update(channels=[32, 36]), "down[0].channels"),
        (lambda d: d.update(constraints={"max_parms": 5}), "constraints.max_parms"),
        (lambda d: d.update(base="sd99"), ""),
        (lambda d: d["mid"].update(attentions=[1, 1]), "mid.attentions"),
    ],
)
def test_invalid_spaces_name_the_field(change, field):
    import copy

    data = copy.deepcopy(SMALL)
    change(data)
    with pytest.raises(ConfigError) as err:
        SearchSpace(data)
    assert err.value.field == field, str(err.value)


def test_space_file_errors_carry_the_line(tmp_path):
    text = (SPACES / "tiny.yaml").read_text().replace("resnets: [1, 2], attentions: [0, 1]}", "resnets: [1, 2], "
                                                      "attentions: [0, 1], colour: red}")
    path = tmp_path / "experiment.yaml"
    path.write_text("name: x\nspace:\n" + "".join(f"  {row}\n" for row in text.splitlines()))
    with pytest.raises(ConfigError) as err:
        SearchSpace.from_yaml(path)
    assert err.value.field == "space.down[2].colour"
    assert err.value.line == next(i for i, r in enumerate(path.read_text().splitlines(), 1) if "colour" in r)
