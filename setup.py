"""megatron_papo: PAPO (perception-aware policy optimisation) for Qwen2.5-VL on megatron-core.

The C++ patch-masking extension (csrc/patch_mask.cpp) is optional at run time: when it is not
built, megatron_papo.ops.masking falls back to a bitwise-identical numpy implementation.
"""
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    ext_modules.append(
        Pybind11Extension(
            "megatron_papo._patch_mask",
            ["csrc/patch_mask.cpp"],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            cxx_std=17,
        )
    )
    cmdclass["build_ext"] = build_ext
except ImportError:  # pybind11 absent: pure-Python install, masking uses the fallback
    pass

if os.environ.get("MEGATRON_PAPO_NO_EXT") == "1":
    ext_modules = []

setup(
    name="megatron_papo",
    version="0.1.0",
    description="PAPO reinforcement learning for Qwen2.5-VL on megatron-core (TP/PP), with vLLM rollouts",
    packages=find_packages(include=["megatron_papo", "megatron_papo.*"]),
    package_data={"megatron_papo.algos": ["preset_configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16",
        "transformers>=5.0",
        "safetensors",
        "numpy",
        "pyyaml",
        "pillow",
        "psutil",
        "tqdm",
    ],
    extras_require={
        "rollout": ["vllm"],
        "train": ["tensorboard", "matplotlib", "pyarrow", "math-verify"],
        "test": ["pytest", "pytest-timeout"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
