"""Weight sync without vLLM (one rank): the bucket plan, and what reaches an engine that records its
loads, checked against the HF tensors the checkpoint path builds (hf_io.gather_hf_tensors).
The multi-rank route into real vLLM is tests/test_rollout_sync.py."""
import dataclasses

import pytest
import torch

from megatron_papo.models.qwen2_5_vl.flavors import get_flavor
from megatron_papo.models.qwen2_5_vl.hf_io import gather_hf_tensors
from megatron_papo.models.qwen2_5_vl.model import ModelParallelOptions, build_model
from megatron_papo.models.qwen2_5_vl.param_binding import hf_param_rules
from megatron_papo.parallel import ParallelContext, destroy_model_parallel, initialize_model_parallel
from megatron_papo.rollout.engine import RolloutEngine
from megatron_papo.rollout.packing import ALIGN, map_shared, packed_end
from megatron_papo.rollout.vllm_engine import vllm_load_group
from megatron_papo.rollout.weight_sync import SyncGroups, WeightSync, WeightSyncConfig


class RecordingEngine(RolloutEngine):
    """Keeps a copy of every tensor it is given, and the calls (a test double for VLLMEngine)."""

    load_group = staticmethod(vllm_load_group)

    def __init__(self):
        self.loads: list[list[str]] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.resets = 0

    def load_packed(self, entries, source=None):
        self.loads.append([e.name for e in entries])
        buffer = map_shared(source, packed_end(entries)) if source else self.weight_buffer(0).bytes
        for e in entries:
            self.tensors[e.name] = e.view(buffer).clone()

    def reset_caches(self):
        self.resets += 1
        self.release_weight_buffer()

    def generate(self, requests, sampling, step=0, prompt_indices=None):
        raise NotImplementedError("not used here")


@pytest.fixture(scope="module")
def model():
    initialize_model_parallel(tp=1, pp=1, seed=1)
    cfg = dataclasses.replace(get_flavor("tiny"), tie_word_embeddings=False)
    yield cfg, build_model(cfg, ModelParallelOptions(tp=1))
    destroy_model_parallel()


def test_plan_keeps_load_groups_whole_and_raises_the_bucket_to_the_largest(model):
    cfg, m = model
    groups = SyncGroups.from_context(ParallelContext.from_megatron())
    sync = WeightSync(cfg, groups, WeightSyncConfig(bucket_mb=0.1), vllm_load_group)
    buckets, capacity = sync.plan(hf_param_rules(m))
    groups: dict[str, int] = {}
    for b, bucket in enumerate(buckets):
        ends = []
        for item in bucket:
            for e in item.entries:
                assert e.offset % ALIGN == 0 and e.end <= capacity
                ends.append((e.offset, e.end))
                assert groups.setdefault(vllm_load_group(e.name), b) == b, f"{e.name}: its group spans buckets"
        ends.sort()
        assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:])), "entries overlap"
    embed = cfg.vocab_size * cfg.hidden_size * 4  # the largest load group (fp32, one tensor)
    assert capacity == max(embed, int(0.1 * 2**20)) and len(buckets) > 3
    assert {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"} <= set(groups)
    half, _ = WeightSync(cfg, SyncGroups.from_context(ParallelContext.from_megatron()),
                         WeightSyncConfig(bucket_mb=0.1, transfer_dtype=torch.bfloat16), vllm_load_group).plan(hf_param_rules(m))
    assert sum(e.nbytes for b in half for i in b for e in i.entries) * 2 == \
        sum(e.nbytes for b in buckets for i in b for e in i.entries)


@pytest.mark.parametrize("transfer_dtype", [None, torch.bfloat16])
def test_sync_delivers_the_hf_tensors_once_per_update(model, transfer_dtype):
    cfg, m = model
    engine = RecordingEngine()
    sync = WeightSync(cfg, SyncGroups.from_context(ParallelContext.from_megatron()),
                      WeightSyncConfig(bucket_mb=0.2, transfer_dtype=transfer_dtype, freeze_vision=True), vllm_load_group)
    stats = sync.sync(hf_param_rules(m), engine)
    expected = gather_hf_tensors(m)
    assert engine.tensors.keys() == expected.keys() and engine.resets == 1
    for name, tensor in expected.items():
        want = tensor if transfer_dtype is None else tensor.to(transfer_dtype)
        assert torch.equal(engine.tensors[name], want), name
    assert stats.tensors == len(expected) and stats.buckets == len(engine.loads) > 1
    assert stats.bytes == sum(t.numel() * t.element_size() for t in engine.tensors.values())
    engine.tensors.clear()
    second = sync.sync(hf_param_rules(m), engine)  # frozen vision tower: sent by the first sync only
    assert engine.tensors and not any(n.startswith("visual.") for n in engine.tensors)
    assert second.tensors == sum(not n.startswith("visual.") for n in expected) and engine.resets == 2


def test_a_tied_output_copy_is_bound_to_the_embedding_and_never_sent(model):
    """A last stage without the embedding holds megatron's copy of a tied embedding (param_binding):
    loading binds it to the embedding's rule (HF embed_tokens); export and the weight sync leave it out.
    Untied, the output layer has its own rule (lm_head)."""
    from megatron_papo.models.qwen2_5_vl import hf_mapping
    from megatron_papo.models.qwen2_5_vl.model import Qwen2_5_VLModel
    from megatron_papo.models.qwen2_5_vl.param_binding import param_rules

    untied, m = model
    assert {n: r.megatron for n, _, r in param_rules(m)}[hf_mapping.OUTPUT_LAYER] == hf_mapping.OUTPUT_LAYER
    cfg = dataclasses.replace(untied, tie_word_embeddings=True)
    last = Qwen2_5_VLModel(cfg, ModelParallelOptions(tp=1), pre_process=False, post_process=True)
    assert {n: r.megatron for n, _, r in param_rules(last)}[hf_mapping.OUTPUT_LAYER] == hf_mapping.EMBEDDING
    assert hf_mapping.OUTPUT_LAYER not in {n for n, _, _ in hf_param_rules(last)}
    engine = RecordingEngine()
    WeightSync(cfg, SyncGroups.from_context(ParallelContext.from_megatron()), WeightSyncConfig(bucket_mb=0.2),
               vllm_load_group).sync(hf_param_rules(last), engine)
    assert engine.tensors and engine.tensors.keys() == gather_hf_tensors(last).keys()
    assert not {"model.embed_tokens.weight", "lm_head.weight"} & engine.tensors.keys()
