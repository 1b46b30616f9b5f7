"""Worker: Megatron -> vLLM weight sync into the rollout engines of a torchrun job.

Every rank hosts one worker of its vLLM engine (rollout TP r: world / r engines of r consecutive
ranks, vLLM's external_launcher). vLLM starts from one HF folder, Megatron (train TP x PP, DP the
rest) loads another; after a sync EVERY engine's per-token log-probs of its own samples (multimodal
prompts) must equal the Megatron model's on the same sequences. Then an optimizer step changes the
Megatron weights, a second sync by the other route, and the same check. Last, the frozen-vision
option: the vision tower is sent on the first sync only, and the engines still agree after the
partial reload. Greedy tokens of the train folder's weights go to OUT_JSON (the test compares
layouts: a TP2 engine must give a TP1 engine's tokens).
Usage: rollout_sync.py ENGINE_HF_DIR TRAIN_HF_DIR TRAIN_TP TRAIN_PP ROLLOUT_TP OUT_JSON
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

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


def main(engine_dir, train_dir, train_tp, train_pp, rollout_tp, out_json):
    import transformers
    from tests.dist.rollout_common import random_image

    from megatron_papo.models.qwen2_5_vl import parity
    from megatron_papo.models.qwen2_5_vl.hf_io import HFReader, load_hf_weights, read_hf_config
    from megatron_papo.models.qwen2_5_vl.param_binding import hf_param_rules
    from megatron_papo.models.qwen2_5_vl.model import ModelParallelOptions, build_model
    from megatron_papo.parallel import ParallelContext, destroy_model_parallel, initialize_model_parallel
    from megatron_papo.rollout.engine import RolloutRequest, SamplingConfig
    from megatron_papo.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig
    from megatron_papo.rollout.weight_sync import SyncGroups, WeightSync, WeightSyncConfig

    initialize_model_parallel(tp=train_tp, pp=train_pp, seed=3)
    ctx = ParallelContext.from_megatron(rollout_tp)
    rank, topology = ctx.rank, ctx.rollout
    cfg = read_hf_config(train_dir)
    model = build_model(cfg, ModelParallelOptions(tp=train_tp, pp=train_pp))
    load_hf_weights(model, HFReader(train_dir))
    reports = ctx.is_last_stage and ctx.tp_rank == 0  # holds the full logits of its replica
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    engine = VLLMEngine(VLLMEngineConfig(model_path=engine_dir, dtype="float32", max_model_len=1024,
                                         tensor_parallel_size=rollout_tp))
    assert torch.equal(torch.get_rng_state(), rng_before), "building the engine changed torch's RNG"
    processor = transformers.AutoImageProcessor.from_pretrained(engine_dir)
    images = [random_image(20), random_image(21)]
    special = {"im_start": 1022, "im_end": 1017, "v_start": cfg.vision_start_token_id, "pad": cfg.image_token_id,
               "v_end": cfg.vision_end_token_id}
    requests = [RolloutRequest([special["im_start"], 30 + i, special["v_start"], special["pad"], special["v_end"],
                                *range(100 + 7 * i, 110 + 7 * i), special["im_end"], special["im_start"], 40], [im])
                for i, im in enumerate(images)]
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=8, seed=5)
    from megatron_papo.rollout.vllm_engine import vllm_load_group
    groups = SyncGroups.from_context(ctx)
    syncers = [WeightSync(cfg, groups, WeightSyncConfig(bucket_mb=BUCKET_MB, shared_memory_gather=shared),
                          vllm_load_group) for shared in (True, False)]
    reader = HFReader(train_dir)
    n_hf_tensors = len(reader.names())
    group_bytes = {}  # the largest load group, from the HF folder: what the bucket must rise to
    for name in reader.names():
        tensor = reader.get(name)
        group_bytes[vllm_load_group(name)] = group_bytes.get(vllm_load_group(name), 0) + -(
            -tensor.numel() * tensor.element_size() // 64) * 64

    def generate_compare(step, sampling=sampling):
        """Every engine generates the same requests (same seeds); each engine's samples are checked
        against Megatron's log-probs. Returns engine 0's batch and samples."""
        mine = engine.generate(requests, sampling, step=step)
        everyone = [None] * topology.world
        dist.all_gather_object(everyone, mine if topology.engine_rank == 0 else None)
        per_engine = [everyone[e * topology.tp] for e in range(topology.engines)]
        for e, samples in enumerate(per_engine):
            batch = megatron_batch(cfg, samples, processor, images)
            logits, _ = parity.run_model(model, batch)
            if reports:
                ours = response_logprobs(logits, samples)
                theirs = [torch.tensor(s.response_logprobs) for p in samples for s in p]
                diff = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
                if ctx.dp_rank == 0:
                    print(f"step {step} engine {e}/{topology.engines}: vLLM vs Megatron per-token logprob "
                          f"max|diff| = {diff:.2e} over {sum(len(t) for t in ours)} tokens", flush=True)
                assert diff <= TOL, (e, diff)
        return megatron_batch(cfg, per_engine[0], processor, images), per_engine

    def sync_generate_compare(step):
        stats = syncers[step].sync(hf_param_rules(model), engine)
        assert stats.route == ("shared_memory" if step == 0 else "broadcast"), stats.route
        capacities = [None] * dist.get_world_size()
        dist.all_gather_object(capacities, stats.capacity_bytes)
        assert max(capacities) == max(group_bytes.values()) > BUCKET_MB * 2**20, (capacities, max(group_bytes.values()))
        # every engine worker was given every HF tensor, once
        assert stats.tensors == n_hf_tensors == len(set(stats.names)), (stats.tensors, n_hf_tensors)
        if rank == 0:
            print(f"sync {step} ({stats.route}): {stats.tensors} tensors, {stats.bytes / 2**20:.2f} MiB per rollout "
                  f"rank, {stats.buckets} buckets, {stats.seconds:.2f} s", flush=True)
        batch, per_engine = generate_compare(step)
        logits, _ = parity.run_model(model, batch)
        return batch, per_engine[0], logits

    batch, samples, logits_before = sync_generate_compare(step=0)

    # an optimizer step changes the weights (vision tower included)
    weight = torch.randn(*batch["input_ids"].shape, cfg.vocab_size, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    optimizer.zero_grad()
    parity.run_model(model, batch, loss_weight=weight)
    optimizer.step()
    logits_after, _ = parity.run_model(model, batch)
    if reports:
        moved = max((a - b).abs().max().item() for a, b in
                    zip(response_logprobs(logits_after, samples), response_logprobs(logits_before, samples)))
        print(f"optimizer step moved the logprobs by {moved:.2e}", flush=True)
        assert moved > 100 * TOL
    sync_generate_compare(step=1)

    # frozen vision tower: sent by the first sync only
    frozen = WeightSync(cfg, groups, WeightSyncConfig(bucket_mb=BUCKET_MB, freeze_vision=True), vllm_load_group)
    first, second = frozen.sync(hf_param_rules(model), engine), frozen.sync(hf_param_rules(model), engine)
    assert any(n.startswith("visual.") for n in first.names)
    assert second.names and not any(n.startswith("visual.") for n in second.names)
    if rank == 0:
        print(f"frozen vision: first sync {first.tensors} tensors, later syncs {second.tensors}", flush=True)
    generate_compare(step=2)  # after the partial reload the engines still hold the policy's weights

    # greedy tokens of the train folder's weights, for the cross-layout comparison in the test
    load_hf_weights(model, HFReader(train_dir))
    syncers[0].sync(hf_param_rules(model), engine)
    _, per_engine = generate_compare(step=3, sampling=SamplingConfig(n=1, temperature=0.0, max_new_tokens=8))
    if rank == 0:
        Path(out_json).write_text(json.dumps([[[s.response_token_ids for s in p] for p in samples]
                                              for samples in per_engine]))
    dist.barrier()
    engine.close()
    destroy_model_parallel()
    print(f"rank {rank} OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6])
