"""The megatron-core CPU remedies: applied only without CUDA, idempotent, and they do what they say."""
import subprocess
import sys

import torch

from megatron_papo.parallel import cpu_compat
from tests.distributed import REPO


def test_nothing_changes_with_cuda():
    """tests/dist/cuda_untouched.py: with CUDA reported available, the remedies change nothing."""
    proc = subprocess.run([sys.executable, str(REPO / "tests/dist/cuda_untouched.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0 and "UNCHANGED" in proc.stdout, proc.stderr[-4000:]
    assert int(proc.stdout.split("UNCHANGED")[1]) > 100  # modules and classes looked at


def test_remedies_apply_once_without_cuda():
    assert not torch.cuda.is_available()
    assert cpu_compat.apply_cpu_remedies() is True
    from megatron.core.models.common.embeddings import rotary_pos_embedding
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import mappings, random

    view, tracker = rotary_pos_embedding.torch, random.get_cuda_rng_tracker()
    assert view is cpu_compat.CPU_TORCH and schedules.torch is cpu_compat.CPU_TORCH
    assert mappings.dist_reduce_scatter_func is cpu_compat._reduce_scatter_tensor
    assert cpu_compat.apply_cpu_remedies() is True  # second call changes nothing
    assert rotary_pos_embedding.torch is view and random.get_cuda_rng_tracker() is tracker


def test_cpu_views_and_rng_tracker():
    cpu_compat.apply_cpu_remedies()
    t = cpu_compat.CPU_TORCH
    assert t.zeros(2, device="cuda").device.type == "cpu" and t.cuda.current_device().type == "cpu"
    assert t.cuda.synchronize() is None and t.cuda.current_stream().wait_stream(None) is None
    tracker = cpu_compat.CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    outer = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer)  # the default stream is untouched
    with tracker.fork():
        b = torch.rand(3)
    assert torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, b)  # the named stream advances
