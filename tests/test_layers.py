"""Imports point downward only (README, Architecture): every module of the package is parsed (ast,
imports inside functions included) and each import of another part of the package must go to a lower
layer. Parts of the same layer do not import each other (models know nothing of RL: algos, rollout,
trainer, data), with one exception, SIDEWAYS below. The third-party `vllm` is imported by rollout and
above only (algos, ops and models know nothing of it). A new part of the package fails until it is
given a layer here."""
import ast
from pathlib import Path

from tests.distributed import REPO

PACKAGE = REPO / "megatron_papo"
LAYERS = [  # bottom to top
    {"__init__", "config", "lifetime", "folders", "progress", "_patch_mask"},  # _patch_mask: csrc's extension (ops.masking)
    {"ops", "parallel"},
    {"rollout", "algos", "models", "data"},
    {"trainer"},
    {"train", "eval"},
    {"study"},  # runs the trainer and the evaluation
]
LAYER = {part: level for level, parts in enumerate(LAYERS) for part in parts}
# rollout's reshard and weight sync map Megatron weights to vLLM's through THE HF map of the model
# (models/qwen2_5_vl/hf_mapping.py); models never import rollout.
SIDEWAYS = {("rollout", "models")}
NO_VLLM = LAYERS[0] | LAYERS[1] | {"algos", "models", "data"}


def part_of(module: str) -> str:
    """'megatron_papo.rollout.engine' -> 'rollout'; 'megatron_papo' -> '__init__'."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def is_module(module: str) -> bool:
    path = REPO.joinpath(*module.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file() or any(path.parent.glob(path.name + ".*.so"))


def module_name(path: Path) -> str:
    """megatron_papo/data/__init__.py -> 'megatron_papo.data'"""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(line, imported module) for every import in the file, relative ones resolved."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(filter(None, [base, node.module]))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if target.startswith("megatron_papo") and is_module(sub) else target


def violations(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(REPO)
        me = part_of(module_name(path))
        if me not in LAYER:
            found.append(f"{where}: part {me!r} has no layer in tests/test_layers.py")
            continue
        for line, target in imports(path):
            if target.split(".")[0] == "vllm" and me in NO_VLLM:
                found.append(f"{where}:{line}: {me} imports vllm")
            if target.split(".")[0] != "megatron_papo" or part_of(target) == me:
                continue
            other = part_of(target)
            if other not in LAYER or LAYER[other] >= LAYER[me] and (me, other) not in SIDEWAYS:
                found.append(f"{where}:{line}: {me} (layer {LAYER[me]}) imports {target} "
                             f"(layer {LAYER.get(other, '?')})")
    return found


def test_imports_point_downward():
    assert len(list(PACKAGE.rglob("*.py"))) > 40  # the walk sees the package
    assert violations() == []


def test_every_import_form_is_resolved():
    engine = [t for _, t in imports(PACKAGE / "rollout" / "engine.py")]
    assert "megatron_papo.rollout.packing" in engine                    # `from .packing import ...`
    masking = [t for _, t in imports(PACKAGE / "ops" / "masking.py")]
    assert "megatron_papo._patch_mask" in masking                       # `from megatron_papo import _patch_mask`
    processor = [t for _, t in imports(PACKAGE / "data" / "processor.py")]
    assert "megatron_papo.ops.masking" in processor                     # inside a method
