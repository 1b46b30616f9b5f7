"""YAML + key=value configuration: precedence, type conversion, and errors that name the key."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from megatron_papo.config import ConfigError, load_config


@dataclass
class Inner:
    tp: int = 1          # tensor-parallel size
    lr: float = 1e-6     # learning rate
    mode: Literal["reference", "exact"] = "reference"


@dataclass
class Outer:
    name: str = "run"
    flag: bool = False
    path: Optional[str] = None
    sizes: tuple[int, ...] = (1, 2)
    inner: Inner = field(default_factory=Inner)


def test_defaults_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: fromyaml\ninner:\n  tp: 4\n  lr: 2.0e-6\n")
    cfg = load_config(Outer, f, ["inner.tp=2", "flag=true", "sizes=[3,4]", "path=/x", "inner.mode=exact"])
    assert cfg == Outer(name="fromyaml", flag=True, path="/x", sizes=(3, 4), inner=Inner(tp=2, lr=2e-6, mode="exact"))
    assert load_config(Outer) == Outer()
    assert load_config(Outer, None, ["path=none"]).path is None


@pytest.mark.parametrize("override, message", [
    ("inner.tq=2", "unknown option 'tq'"),
    ("inner.tp=two", "inner.tp: expected int"),
    ("inner.mode=fast", "not one of"),
    ("flag=maybe", "expected true/false"),
    ("inner", "section.key=value"),
    ("name.x=1", "has no sub-options"),
])
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_yaml_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("inner:\n  nope: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*nope"):
        load_config(Outer, f)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(Outer, tmp_path / "missing.yaml")


@dataclass
class Bounds:
    low: int = 10
    high: int = 20

    def __post_init__(self):
        if not self.low <= self.high:
            raise ValueError(f"low {self.low} must be <= high {self.high}")


@dataclass
class WithBounds:
    name: str = "run"
    bounds: Bounds = field(default_factory=Bounds)


def test_related_options_in_any_order(tmp_path):
    """A check that relates two options sees both final values: lowering both bounds works whether
    the high one comes first (on the command line or in the file) or not; a bad final pair is still an
    error naming the section."""
    for order in (["bounds.high=5", "bounds.low=1"], ["bounds.low=1", "bounds.high=5"]):
        assert load_config(WithBounds, None, order).bounds == Bounds(1, 5)
    f = tmp_path / "c.yaml"
    f.write_text("bounds:\n  high: 5\n  low: 1\n")
    assert load_config(WithBounds, f).bounds == Bounds(1, 5)
    with pytest.raises(ConfigError, match=r"bounds: low 30 must be <= high 20 \(options from the command line\)"):
        load_config(WithBounds, None, ["bounds.low=30"])
    f.write_text("bounds:\n  low: 30\n")
    with pytest.raises(ConfigError, match=r"bounds: low 30 must be <= high 20 \(options from .*c\.yaml\)"):
        load_config(WithBounds, f)


def test_a_section_given_whole_merges_into_its_current_values():
    """`inner={lr: 3e-6}` sets lr and keeps what the base (e.g. a preset) set for the other options."""
    base = Outer(inner=Inner(tp=8, mode="exact"))
    cfg = load_config(Outer, None, ["inner={lr: 3.0e-6}"], base=base)
    assert cfg.inner == Inner(tp=8, lr=3e-6, mode="exact")


def test_text_options_take_the_text_as_typed(tmp_path):
    """YAML would read `no` as false and `1_000` as 1000: a text option on the command line keeps what
    was typed; in a file such a value must be quoted."""
    cfg = load_config(Outer, None, ["name=no", "path=1_000"])
    assert (cfg.name, cfg.path) == ("no", "1_000")
    assert all(load_config(Outer, None, [f"path={v}"]).path is None for v in ("null", "none", "~"))
    assert load_config(Outer, None, ["name= 'a b' ", 'path="x"']) == Outer(name="a b", path="x")
    with pytest.raises(ConfigError, match="name: expected str, got None"):
        load_config(Outer, None, ["name=~"])
    f = tmp_path / "c.yaml"
    f.write_text("name: no\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: name: expected str, got False \(quote it\)"):
        load_config(Outer, f)
