"""Named objective presets (grpo, papo_g, papo_h, dapo, papo_d): YAML files holding the values of
the docs/papo.md preset table, shipped with the package (algos/preset_configs/, package data)."""
import dataclasses
from pathlib import Path

import yaml

from megatron_papo.algos.config import PAPOConfig

PRESET_DIR = Path(__file__).resolve().parent / "preset_configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str, **overrides) -> PAPOConfig:
    """PAPOConfig of preset `name`, with `overrides` (PAPOConfig field names) applied on top."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; valid presets: {preset_names()} (in {PRESET_DIR})")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    fields = sorted(f.name for f in dataclasses.fields(PAPOConfig))
    for source, keys in ((str(path), values), ("overrides", overrides)):
        unknown = sorted(set(keys) - set(fields))
        if unknown:
            raise ValueError(f"unknown PAPOConfig keys {unknown} in {source}; valid keys: {fields}")
    return PAPOConfig(**{**values, **overrides})
