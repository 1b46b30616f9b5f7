"""Worker (4 ranks, TP2 x PP2, gloo): Megatron -> vLLM weight sync; rank 0 hosts vLLM.

vLLM starts from one HF folder, Megatron loads another; after a sync vLLM's per-token log-probs
of its own samples (multimodal prompts) must equal the Megatron model's on the same sequences.
Then an optimizer step changes the Megatron weights, a second sync, and the same check. The first
sync gathers TP shards through shared memory (all ranks share this host), the second with
dist.all_gather. Finally the frozen-vision option: the vision tower is sent on the first sync only.
Usage: rollout_sync.py ENGINE_HF_DIR TRAIN_HF_DIR
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

TOL = 1e-4
BUCKET_MB = 0.05  # small: many buckets, groups at bucket edges; the bucket rises to the largest group (the embedding)


def megatron_batch(cfg, samples, processor, images):
    """The sampled sequences (prompt + response, right-padded) with the images' pixel_values."""
    from megatron_papo.models.qwen2_5_vl.rope import mrope_position_ids

    seqs = [s.prompt_token_ids + s.response_token_ids for per_prompt in samples for s in per_prompt]
    seq_images = [images[s.prompt_index] for per_prompt in samples for s in per_prompt]
    length = max(len(s) for s in seqs)
    input_ids = torch.tensor([s + [0] * (length - len(s)) for s in seqs])
    vision = processor(images=seq_images, return_tensors="pt")
    position_ids, _ = mrope_position_ids(input_ids, vision["image_grid_thw"], cfg.image_token_id,
                                         cfg.vision.spatial_merge_size)
    return dict(input_ids=input_ids, position_ids=position_ids, pixel_values=vision["pixel_values"],
                image_grid_thw=vision["image_grid_thw"])


def response_logprobs(logits, samples):
    """log_softmax(logits) (T = 1) at each sampled response token, per sequence."""
    flat = [s for per_prompt in samples for s in per_prompt]
    out = []
    for b, s in enumerate(flat):
        start = len(s.prompt_token_ids)
        lp = torch.log_softmax(logits[b, start - 1: start - 1 + len(s.response_token_ids)].float(), -1)
        out.append(lp.gather(1, torch.tensor(s.response_token_ids)[:, None])[:, 0])
    return out


def main(engine_dir, train_dir):
    import transformers
    from megatron.core import parallel_state
    from rollout_common import random_image

    from megatron_papo.models.qwen2_5_vl import parity
    from megatron_papo.models.qwen2_5_vl.checkpoint_io import HFReader, load_hf_weights, param_rules, read_hf_config
    from megatron_papo.models.qwen2_5_vl.model import ModelParallelOptions, build_model
    from megatron_papo.parallel import destroy_model_parallel, initialize_model_parallel
    from megatron_papo.rollout.engine import RolloutRequest, SamplingConfig
    from megatron_papo.rollout.weight_sync import SyncGroups, WeightSync, WeightSyncConfig

    initialize_model_parallel(tp=2, pp=2, seed=3)
    rank = dist.get_rank()
    cfg = read_hf_config(train_dir)
    model = build_model(cfg, ModelParallelOptions(tp=2, pp=2))
    load_hf_weights(model, HFReader(train_dir))
    is_last = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0

    engine = None
    if rank == 0:
        from megatron_papo.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig
        engine = VLLMEngine(VLLMEngineConfig(model_path=engine_dir, dtype="float32", max_model_len=1024))
    processor = transformers.AutoImageProcessor.from_pretrained(engine_dir)
    images = [random_image(20), random_image(21)]
    special = {"im_start": 1022, "im_end": 1017, "v_start": cfg.vision_start_token_id, "pad": cfg.image_token_id,
               "v_end": cfg.vision_end_token_id}
    requests = [RolloutRequest([special["im_start"], 30 + i, special["v_start"], special["pad"], special["v_end"],
                                *range(100 + 7 * i, 110 + 7 * i), special["im_end"], special["im_start"], 40], [im])
                for i, im in enumerate(images)]
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=8, seed=5)
    from megatron_papo.rollout.vllm_engine import vllm_load_group
    syncers = [WeightSync(cfg, SyncGroups.from_parallel_state(),
                          WeightSyncConfig(bucket_mb=BUCKET_MB, shared_memory_gather=shared), vllm_load_group)
               for shared in (True, False)]
    reader = HFReader(train_dir)
    n_hf_tensors = len(reader.names())
    group_bytes = {}  # the largest load group, from the HF folder: what the bucket must rise to
    for name in reader.names():
        tensor = reader.get(name)
        group_bytes[vllm_load_group(name)] = group_bytes.get(vllm_load_group(name), 0) + -(
            -tensor.numel() * tensor.element_size() // 64) * 64

    def sync_generate_compare(step):
        stats = syncers[step].sync(param_rules(model), engine)
        capacities = [None] * dist.get_world_size()
        dist.all_gather_object(capacities, stats.capacity_bytes)
        assert max(capacities) == max(group_bytes.values()) > BUCKET_MB * 2**20, (capacities, max(group_bytes.values()))
        if rank == 0:
            assert stats.tensors == n_hf_tensors == len(set(stats.names)), (stats.tensors, n_hf_tensors)
            print(f"sync {step} ({'shared-memory' if step == 0 else 'collective'} TP gather): {stats.tensors} tensors, {stats.bytes / 2**20:.2f} MiB, {stats.buckets} buckets, "
                  f"{stats.seconds:.2f} s", flush=True)
        box = [engine.generate(requests, sampling, step=step) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        samples = box[0]
        batch = megatron_batch(cfg, samples, processor, images)
        logits, _ = parity.run_model(model, batch)
        if is_last:
            ours = response_logprobs(logits, samples)
            theirs = [torch.tensor(s.response_logprobs) for p in samples for s in p]
            diff = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
            if not diff <= TOL:
                print("megatron", ours, "\nvllm", theirs, flush=True)
            print(f"step {step}: vLLM vs Megatron per-token logprob max|diff| = {diff:.2e} "
                  f"over {sum(len(t) for t in ours)} tokens", flush=True)
            assert diff <= TOL, diff
        return batch, samples, logits

    batch, samples, logits_before = sync_generate_compare(step=0)

    # an optimizer step changes the weights (vision tower included)
    weight = torch.randn(*batch["input_ids"].shape, cfg.vocab_size, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    optimizer.zero_grad()
    parity.run_model(model, batch, loss_weight=weight)
    optimizer.step()
    logits_after, _ = parity.run_model(model, batch)
    if is_last:
        moved = max((a - b).abs().max().item() for a, b in
                    zip(response_logprobs(logits_after, samples), response_logprobs(logits_before, samples)))
        print(f"optimizer step moved the logprobs by {moved:.2e}", flush=True)
        assert moved > 100 * TOL
    sync_generate_compare(step=1)

    # frozen vision tower: sent by the first sync only
    frozen = WeightSync(cfg, SyncGroups.from_parallel_state(), WeightSyncConfig(bucket_mb=BUCKET_MB, freeze_vision=True),
                        vllm_load_group)
    first, second = frozen.sync(param_rules(model), engine), frozen.sync(param_rules(model), engine)
    if rank == 0:
        assert any(n.startswith("visual.") for n in first.names)
        assert second.names and not any(n.startswith("visual.") for n in second.names)
        print(f"frozen vision: first sync {first.tensors} tensors, later syncs {second.tensors}", flush=True)
    dist.barrier()
    if engine is not None:
        engine.close()
    destroy_model_parallel()
    print(f"rank {rank} OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
