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
