"""Worker for tests/test_model_cpu_compat.py, run in a fresh process (the test's own process has the
remedies applied already): with CUDA reported available, apply_cpu_remedies() must leave every
megatron-core module, and every class defined in one, exactly as imported: each attribute the same
object. Prints `UNCHANGED <spaces looked at>`."""
import importlib
import sys

import torch

torch.cuda.is_available = lambda: True
from megatron_papo.parallel import cpu_compat  # noqa: E402

for name in cpu_compat._MEGATRON_MODULES:
    importlib.import_module(name)
import megatron.core.models.common.language_module.language_module  # noqa: E402, F401


def snapshot():
    spaces = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and module is not None:
            spaces[name] = dict(vars(module))
            for attr, value in vars(module).items():
                if isinstance(value, type) and value.__module__ == name:
                    spaces[f"{name}.{attr}"] = dict(vars(value))
    spaces["torch.Tensor"] = {"cuda": torch.Tensor.cuda}
    return spaces


before = snapshot()
assert cpu_compat.apply_cpu_remedies() is False and not cpu_compat.remedies_applied()
after = snapshot()
changed = sorted(f"{space}.{attr}" for space, attrs in before.items() for attr, value in attrs.items()
                 if after.get(space, {}).get(attr, object()) is not value)
assert not changed and after.keys() == before.keys(), (changed, sorted(after.keys() - before.keys()))
print("UNCHANGED", len(before))
