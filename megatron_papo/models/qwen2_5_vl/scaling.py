"""Memory and weight-sync arithmetic for PAPO training of Qwen2.5-VL at scale (pure arithmetic).

Everything here follows from a flavor config and a layout; nothing touches torch. docs/scaling.md
explains each formula and its source; tools/plan_memory.py prints the tables the doc shows.

Tensor-parallel convention (megatron-core; the vision tower uses the same TP as the LM):
  column-parallel (output dim split): LM q/k/v weights+biases, gate/up; vision qkv, gate/up
      (weights+biases), merger fc1 (weight+bias)
  row-parallel (input dim split; bias replicated): LM o_proj, down; vision proj, down, merger fc2
  replicated: every norm, vision patch embedding, biases of row-parallel layers
  vocab-parallel: input embedding and output layer, vocab padded to a multiple of
      `vocab_multiple * TP` (megatron's make_vocab_size_divisible_by=128)
Pipeline split: layers divided evenly; the first stage also holds the embedding and (by default)
the vision tower; the last stage holds the final norm and the output layer. With
`vision_on_first_stage=False` the vision tower gets a stage of its own in front of the LM stages
(megatron's encoder_pipeline_model_parallel_size=1), which costs TP more GPUs per replica.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from megatron_papo.models.qwen2_5_vl.flavors import Qwen2_5_VLConfig
from megatron_papo.models.qwen2_5_vl.hf_mapping import padded_vocab_size

BF16, FP32 = 2, 4
GB = 1e9  # tables use decimal gigabytes


# ---------------------------------------------------------------- parameters per stage and rank
@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int = 1
    vision_on_first_stage: bool = True

    @property
    def stages(self) -> int:
        return self.pp + (0 if self.vision_on_first_stage else 1)

    @property
    def world(self) -> int:
        return self.tp * self.stages * self.dp

    def __str__(self) -> str:
        return f"TP{self.tp}xPP{self.pp}xDP{self.dp}" + ("" if self.vision_on_first_stage else "+ViT stage")


@dataclass(frozen=True)
class StageParams:
    """Parameters of one pipeline stage as one of its TP ranks holds them."""
    name: str
    lm_layers: int
    has_vision: bool
    rank_params: int   # parameters one TP rank of this stage holds (padding included)
    replicated: int    # of those, parameters every TP rank holds in full (norms, row-parallel biases, ...)
    padding: int       # vocab-padding parameters of this stage, summed over its TP ranks
    tied_copy: int     # a duplicate of the tied input embedding (PP>1 with tied weights), summed over TP

    def unique_params(self, tp: int) -> int:
        """Distinct model parameters on this stage: rank_params multiplied out over the TP group."""
        return tp * self.rank_params - (tp - 1) * self.replicated - self.padding - self.tied_copy


def _vision_replicated(cfg: Qwen2_5_VLConfig) -> int:
    v = cfg.vision
    per_block = 2 * v.hidden_size + 2 * v.hidden_size        # norm1, norm2; proj bias, down bias
    patch_embed = v.hidden_size * v.patch_dim
    merger = v.hidden_size + cfg.hidden_size                  # ln_q; fc2 bias
    return v.depth * per_block + patch_embed + merger


def check_tp(cfg: Qwen2_5_VLConfig, tp: int) -> None:
    v = cfg.vision
    dims = {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "intermediate_size": cfg.intermediate_size, "vision.num_heads": v.num_heads,
            "vision.intermediate_size": v.intermediate_size,
            "vision merger width": v.hidden_size * v.spatial_merge_size**2}
    bad = [k for k, d in dims.items() if d % tp]
    if bad:
        raise ValueError(f"TP={tp} does not divide {', '.join(bad)}")


def stage_params(cfg: Qwen2_5_VLConfig, layout: Layout, vocab_multiple: int = 128) -> list[StageParams]:
    tp, pp = layout.tp, layout.pp
    check_tp(cfg, tp)
    if cfg.num_hidden_layers % pp:
        raise ValueError(f"PP={pp} does not divide num_hidden_layers={cfg.num_hidden_layers}")
    per_stage_layers = cfg.num_hidden_layers // pp
    h = cfg.hidden_size
    vocab = padded_vocab_size(cfg.vocab_size, tp, vocab_multiple)
    table_rank, table_pad = vocab * h // tp, (vocab - cfg.vocab_size) * h
    layer_repl = 2 * h                                         # input / post-attention norms
    layer_rank = layer_repl + (cfg.lm_layer_param_count() - layer_repl) // tp
    vis_repl = _vision_replicated(cfg)
    vis_rank = vis_repl + (cfg.vision_param_count() - vis_repl) // tp

    stages = []
    if not layout.vision_on_first_stage:
        stages.append(StageParams("vision", 0, True, vis_rank, vis_repl, 0, 0))
    for i in range(pp):
        first, last = i == 0, i == pp - 1
        rank = per_stage_layers * layer_rank
        repl = per_stage_layers * layer_repl
        pad = tied = 0
        vision = first and layout.vision_on_first_stage
        if vision:
            rank, repl = rank + vis_rank, repl + vis_repl
        if first:                                              # input embedding
            rank, pad = rank + table_rank, pad + table_pad
        if last:
            rank, repl = rank + h, repl + h                   # final norm
            if not cfg.tie_word_embeddings:                    # output layer
                rank, pad = rank + table_rank, pad + table_pad
            elif pp > 1:                                       # megatron keeps a tied copy here
                rank, pad, tied = rank + table_rank, pad + table_pad, tied + cfg.vocab_size * h
        name = "first" if first and pp > 1 else "last" if last and pp > 1 else "only" if pp == 1 else f"mid{i}"
        stages.append(StageParams(name, per_stage_layers, vision, rank, repl, pad, tied))
    return stages


# ---------------------------------------------------------------- memory per GPU
@dataclass(frozen=True)
class TrainingSetup:
    """PAPO training settings the memory depends on (defaults: docs/papo.md on GPUs)."""
    seq_len: int = 4096 + 2048         # max prompt + max response
    response_len: int = 2048           # max response: logits start at the prompt's last token
    image_tokens: int = 1280           # merged image tokens (x merge^2 ViT patches)
    micro_batch: int = 1
    global_batch: int = 128 * 5        # responses per optimiser step
    distributed_optimizer: bool = True # shard fp32 main params + Adam states over DP
    grad_bytes: int = FP32             # megatron DDP grad buffer (bf16 training accumulates in fp32)
    reference_on_cpu: bool = False     # reference model offloaded: no GPU bytes
    flash_attention: bool = True       # drops the 5*a*s/h attention-score term
    papo_mode: str = "reference"       # "exact" keeps one micro-batch of masked logits
    loss_chunk_tokens: int = 1024      # ops.vocab_parallel's default chunk
    loss_chunk_buffers: int = 4        # fp32 [chunk, V/TP] buffers alive in the loss (upper bound)
    vocab_multiple: int = 128


@dataclass(frozen=True)
class RolloutSetup:
    """vLLM colocated on the training GPUs: TP `tp` inside a node, replicated over the rest."""
    tp: int = 8
    kv_cache_tokens: int = 2**18       # KV-cache budget per vLLM engine, in tokens
    workspace_bytes: float = 2e9       # vLLM activation peak + sampler (assumed, not derived)
    vocab_multiple: int = 64           # vLLM's vocab padding


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of one stage. Components are fields; phases are properties."""
    stage: str
    params: int
    policy_bf16: float
    policy_grads: float
    main_params_fp32: float
    adam_states_fp32: float
    reference_bf16: float
    act_checkpoints: float
    act_recompute: float
    logits: float
    papo_buffers: float
    vllm_weights: float
    vllm_kv_cache: float
    vllm_workspace: float

    @property
    def resident(self) -> float:
        """Stays on the GPU in both phases: policy weights, grads, optimizer state, reference."""
        return self.policy_bf16 + self.policy_grads + self.main_params_fp32 + self.adam_states_fp32 + self.reference_bf16

    @property
    def activations(self) -> float:
        return self.act_checkpoints + self.act_recompute + self.logits + self.papo_buffers

    @property
    def vllm(self) -> float:
        return self.vllm_weights + self.vllm_kv_cache + self.vllm_workspace

    @property
    def train_phase(self) -> float:
        return self.resident + self.activations

    @property
    def rollout_phase(self) -> float:
        return self.resident + self.vllm

    def peak(self, sleep_mode: bool) -> float:
        """With vLLM sleep mode its weights and KV cache leave the GPU while training runs."""
        return max(self.train_phase, self.rollout_phase) if sleep_mode else self.train_phase + self.vllm


def layer_activation_bytes(s: int, b: int, h: int, a: int, tp: int, flash_attention: bool) -> float:
    """Megatron-LM (Korthikanti et al. 2022) per-layer activations with TP + sequence parallelism."""
    return s * b * h * (34 + (0 if flash_attention else 5 * a * s / h)) / tp


def vllm_bytes(cfg: Qwen2_5_VLConfig, rollout: RolloutSetup) -> tuple[float, float]:
    """(weights, KV cache) bytes per GPU of a vLLM engine at TP rollout.tp."""
    (only,) = stage_params(cfg, Layout(rollout.tp, 1), rollout.vocab_multiple)
    kv_heads = -(-cfg.num_key_value_heads // rollout.tp)   # vLLM replicates KV heads when tp > kv heads
    kv_per_token = 2 * cfg.num_hidden_layers * kv_heads * cfg.head_dim * BF16
    return only.rank_params * BF16, rollout.kv_cache_tokens * kv_per_token


def plan_memory(cfg: Qwen2_5_VLConfig, layout: Layout, train: TrainingSetup = TrainingSetup(),
                rollout: RolloutSetup = RolloutSetup()) -> list[StageMemory]:
    """Per-GPU bytes of every pipeline stage (all TP/DP ranks of a stage hold the same)."""
    if train.papo_mode not in ("reference", "exact"):
        raise ValueError(f"papo_mode must be 'reference' or 'exact', got {train.papo_mode!r}")
    s, b, tp = train.seq_len, train.micro_batch, layout.tp
    v = cfg.vision
    s_vision = train.image_tokens * v.spatial_merge_size**2
    vocab_rank = padded_vocab_size(cfg.vocab_size, tp, train.vocab_multiple) // tp
    micro_batches = train.global_batch // (layout.dp * b)
    optimizer_shards = layout.dp if train.distributed_optimizer else 1
    lm_layer = layer_activation_bytes(s, b, cfg.hidden_size, cfg.num_attention_heads, tp, train.flash_attention)
    vit_block = layer_activation_bytes(s_vision, b, v.hidden_size, v.num_heads, tp, train.flash_attention)
    vllm_weights, vllm_kv = vllm_bytes(cfg, rollout)
    stages = stage_params(cfg, layout, train.vocab_multiple)
    out = []
    for i, st in enumerate(stages):
        in_flight = min(len(stages) - i, micro_batches)           # 1F1B warm-up depth
        p = st.rank_params
        checkpoints = in_flight * BF16 * (st.lm_layers * s * b * cfg.hidden_size
                                          + (v.depth * s_vision * b * v.hidden_size if st.has_vision else 0)) / tp
        recompute = max(lm_layer if st.lm_layers else 0, vit_block if st.has_vision else 0)
        logits = buffers = 0.0
        if i == len(stages) - 1:
            # the output layer runs from the micro-batch's shortest prompt's last token on: at b = 1 at
            # most one response + 2 tp - 1 positions (under SP the start rounds down to TP and the
            # padded end up); up to the whole sequence at b > 1
            window = min(s, train.response_len + 2 * tp - 1) if b == 1 else s
            logits = 2 * window * b * vocab_rank * BF16            # logits and their gradient
            logits += train.loss_chunk_buffers * min(train.loss_chunk_tokens, window * b) * vocab_rank * FP32
            per_token = 4                                          # old, ref, masked logp; advantage
            if train.papo_mode == "exact":
                logits += window * b * vocab_rank * BF16           # masked logits of this micro-batch
                per_token = 3                                      # masked logp comes from those logits
            buffers = per_token * FP32 * s * train.global_batch / layout.dp
        out.append(StageMemory(
            stage=st.name, params=p,
            policy_bf16=p * BF16, policy_grads=p * train.grad_bytes,
            main_params_fp32=p * FP32 / optimizer_shards, adam_states_fp32=2 * p * FP32 / optimizer_shards,
            reference_bf16=0 if train.reference_on_cpu else p * BF16,
            act_checkpoints=checkpoints, act_recompute=recompute, logits=logits, papo_buffers=buffers,
            vllm_weights=vllm_weights, vllm_kv_cache=vllm_kv, vllm_workspace=rollout.workspace_bytes))
    return out


def busiest_stage(stages: list[StageMemory], sleep_mode: bool = True) -> StageMemory:
    return max(stages, key=lambda m: m.peak(sleep_mode))


# ---------------------------------------------------------------- smallest GPU count
def candidate_layouts(cfg: Qwen2_5_VLConfig, train: TrainingSetup = TrainingSetup(),
                      rollout: RolloutSetup = RolloutSetup(), max_gpus: int = 1024) -> list[Layout]:
    """TP in {1,2,4,8}, PP dividing the layer count, DP dividing the micro-batches of a step,
    vision on the first stage, world divisible by the rollout TP; sorted by GPU count."""
    out = []
    for tp in (1, 2, 4, 8):
        try:
            check_tp(cfg, tp)
        except ValueError:
            continue
        for pp in range(1, cfg.num_hidden_layers + 1):
            for dp in range(1, train.global_batch // train.micro_batch + 1):
                lay = Layout(tp, pp, dp)
                if (cfg.num_hidden_layers % pp == 0 and (train.global_batch // train.micro_batch) % dp == 0
                        and lay.world <= max_gpus and lay.world % rollout.tp == 0):
                    out.append(lay)
    return sorted(out, key=lambda lay: (lay.world, -lay.tp, lay.pp))


def fits(peak_bytes: float, gpu_bytes: float, margin: float) -> bool:
    return peak_bytes <= gpu_bytes * (1 - margin)


def smallest_gpu_count(cfg: Qwen2_5_VLConfig, gpu_bytes: float = 80e9, margin: float = 0.10,
                       sleep_mode: bool = True, train: TrainingSetup = TrainingSetup(),
                       rollout: RolloutSetup = RolloutSetup(), max_gpus: int = 1024) -> tuple[Layout, StageMemory]:
    """Fewest GPUs whose busiest stage fits gpu_bytes*(1-margin); among layouts of that size the
    lowest peak. Returns the layout and its busiest stage."""
    best = None
    for lay in candidate_layouts(cfg, train, rollout, max_gpus):
        if best is not None and lay.world > best[0].world:
            break
        top = busiest_stage(plan_memory(cfg, lay, train, rollout), sleep_mode)
        if fits(top.peak(sleep_mode), gpu_bytes, margin) and (best is None or top.peak(sleep_mode) < best[1].peak(sleep_mode)):
            best = (lay, top)
    if best is None:
        raise ValueError(f"no layout up to {max_gpus} GPUs fits {gpu_bytes / GB:.0f} GB")
    return best


# ---------------------------------------------------------------- weight sync
@dataclass(frozen=True)
class Links:
    gpus_per_node: int = 8
    nvlink_bytes_per_s: float = 450e9      # per GPU per direction, H100 SXM NVLink 4
    ib_bytes_per_s: float = 50e9           # per GPU per direction, one 400 Gb/s NIC per GPU


@dataclass(frozen=True)
class SyncTraffic:
    """Bytes through the busiest rank of one weight sync, by path, and the time it takes."""
    route: str
    received: float
    received_same_gpu: float
    received_nvlink: float
    received_ib: float
    sent: float
    seconds: float


def _link_seconds(nvlink: float, ib: float, links: Links) -> float:
    return max(nvlink / links.nvlink_bytes_per_s, ib / links.ib_bytes_per_s)


def weight_sync_traffic(cfg: Qwen2_5_VLConfig, train: Layout, rollout_tp: int, links: Links = Links()) -> SyncTraffic:
    """Sharded sync: every vLLM rank receives exactly its TP slice of every stage, straight from the
    training ranks of its own DP replica that hold it (ranks are numbered TP fastest, then PP, then
    DP, node = rank // gpus_per_node; vLLM engine = rank // rollout_tp). Slices are bf16 and, as
    arithmetic, treat the few replicated tensors as split (they are < 0.01% of the bytes).
    Time: links are full duplex and independent, so the slowest per-direction link of the busiest
    rank decides."""
    stages = stage_params(cfg, train)
    stage_bytes = [st.unique_params(train.tp) * BF16 for st in stages]
    replica = train.tp * train.stages
    if replica % rollout_tp:
        raise ValueError(f"rollout TP {rollout_tp} must divide the training replica size {replica}")
    recv = {g: [0.0, 0.0, 0.0] for g in range(train.world)}       # same GPU, NVLink, IB
    sent = {g: [0.0, 0.0] for g in range(train.world)}             # NVLink, IB
    for g in range(train.world):
        k, base = g % rollout_tp, (g // replica) * replica
        lo, hi = k / rollout_tp, (k + 1) / rollout_tp               # this vLLM rank's slice of [0, 1)
        for j, nbytes in enumerate(stage_bytes):
            for q in range(train.tp):
                overlap = min(hi, (q + 1) / train.tp) - max(lo, q / train.tp)
                if overlap <= 0:
                    continue
                src, amount = base + j * train.tp + q, overlap * nbytes
                path = 0 if src == g else 1 if src // links.gpus_per_node == g // links.gpus_per_node else 2
                recv[g][path] += amount
                if path:
                    sent[src][path - 1] += amount
    g = max(recv, key=lambda r: max(_link_seconds(*recv[r][1:], links), _link_seconds(*sent[r], links)))
    seconds = max(_link_seconds(*recv[g][1:], links), _link_seconds(*sent[g], links))
    return SyncTraffic(f"sharded {train} -> rollout TP{rollout_tp}", sum(recv[g]), *recv[g], sum(sent[g]), seconds)


def naive_sync_traffic(cfg: Qwen2_5_VLConfig, train: Layout, rollout_tp: int, links: Links = Links()) -> SyncTraffic:
    """Gather the full model on rank 0, then broadcast it (pipelined, so rank 0 sends it once and
    every other rank receives all of it) and let each vLLM rank keep its slice. The gather and the
    broadcast run one after the other; a broadcast that crosses nodes runs at the IB rate."""
    full = sum(st.unique_params(train.tp) for st in stage_params(cfg, train)) * BF16
    own_shard = full / (train.tp * train.stages)                 # arithmetic average, as above
    in_nvlink = (min(links.gpus_per_node, train.world) - 1) * own_shard
    in_ib = full - own_shard - in_nvlink
    broadcast_rate = links.ib_bytes_per_s if train.world > links.gpus_per_node else links.nvlink_bytes_per_s
    seconds = _link_seconds(in_nvlink, in_ib, links) + full / broadcast_rate
    return SyncTraffic(f"naive: gather on rank 0, broadcast -> rollout TP{rollout_tp}", full - own_shard, 0.0,
                       in_nvlink, in_ib, full, seconds)


# The layout examples/papo_72b.sh uses on 80 GB H100 nodes of 8 GPUs (docs/scaling.md says why).
RECOMMENDED_72B_LAYOUT = Layout(tp=8, pp=4, dp=2)


def memory_fields() -> list[str]:
    """StageMemory's byte components in table order."""
    return [f.name for f in fields(StageMemory) if f.name not in ("stage", "params")]


__all__ = ["Layout", "StageParams", "TrainingSetup", "RolloutSetup", "StageMemory", "Links", "SyncTraffic",
           "stage_params", "plan_memory", "busiest_stage", "candidate_layouts", "fits",
           "smallest_gpu_count", "weight_sync_traffic", "naive_sync_traffic", "layer_activation_bytes",
           "vllm_bytes", "RECOMMENDED_72B_LAYOUT", "memory_fields", "GB"]
