"""Qwen2.5-VL vision tower on megatron-core layers, tensor-parallel.

pixel_values [N, patch_dim] (N patch rows of all images, in the HF processor's 2x2 merge-window order)
  -> patch embedding (the stride = kernel Conv3d is a linear map on the rows)
  -> reorder merge units into window-major order (HF's get_window_index)
  -> `depth` megatron TransformerLayers, sequence-first [N, 1, h], 2-D rotary; each layer attends
     within its window or, for `fullatt_block_indexes`, within its whole image (frame)
  -> patch merger (RMSNorm, 2x2 merge, Linear-GELU-Linear) to the LLM width
  -> undo the window reordering: [N / merge^2, llm_hidden] in HF's output order.

Images are packed without padding. Attention spans are block-diagonal; how they reach the attention
kernel (each row's segment id for the local spec's TorchAttention, THD cu_seqlens for TE) is decided
in `attention_spans`.
Every layer gets both spans and takes its own (`VisionTransformerLayer`), so megatron's
TransformerBlock, recompute included, runs unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_papo.models.qwen2_5_vl.attention import TorchAttention
from megatron_papo.models.qwen2_5_vl.flavors import Qwen2_5_VLConfig, VisionConfig
from megatron_papo.parallel.backend import use_transformer_engine
from megatron_papo.parallel.norm import RMSNorm

ROPE_THETA = 10000.0  # HF Qwen2.5-VL vision rotary base (not in config.json)


def vision_transformer_config(vision: VisionConfig, **overrides) -> TransformerConfig:
    """The ViT's TransformerConfig. `overrides` carry the run's layout and memory options
    (tensor_model_parallel_size, params_dtype/bf16, recompute_granularity, ...)."""
    fixed = dict(
        num_layers=vision.depth,
        hidden_size=vision.hidden_size,
        ffn_hidden_size=vision.intermediate_size,
        num_attention_heads=vision.num_heads,
        num_query_groups=vision.num_heads,
        kv_channels=vision.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=vision.rms_norm_eps,
        gated_linear_unit=True,  # SwiGLU: linear_fc1 = [gate; up]
        activation_func=F.silu,
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        pipeline_model_parallel_size=1,  # the tower lives whole on the first pipeline stage
        sequence_parallel=False,  # the tower's few thousand patch rows stay whole on each TP rank
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    clash = sorted(set(overrides) & {"num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                     "num_query_groups", "kv_channels", "normalization", "gated_linear_unit",
                                     "add_bias_linear", "add_qkv_bias", "pipeline_model_parallel_size",
                                     "sequence_parallel"})
    if clash:
        raise ValueError(f"vision_transformer_config: {clash} are fixed by the VisionConfig / architecture")
    return TransformerConfig(**{**fixed, **overrides})


class VisionTransformerLayer(TransformerLayer):
    """A ViT block whose attention span is fixed by its index: window, or the whole image.

    The block hands every layer both spans stacked along dim 0 (attention_mask = segment ids [2, s] or
    packed_seq_params (window, full)); the layer keeps its own and runs megatron's layer unchanged.
    """

    def __init__(self, *args, full_attention_layers: tuple[int, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.full_attention = (self.layer_number - 1) in full_attention_layers

    def forward(self, *args, attention_mask=None, packed_seq_params=None, **kwargs):
        span = int(self.full_attention)
        if attention_mask is not None:
            attention_mask = attention_mask[span]
        if packed_seq_params is not None:
            packed_seq_params = packed_seq_params[span]
        return super().forward(*args, attention_mask=attention_mask, packed_seq_params=packed_seq_params, **kwargs)


def vision_norm(use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm
        return TENorm
    return RMSNorm  # HF's RMSNorm math (fp32 normalise, cast, scale)


def vision_layer_spec(vision: VisionConfig, use_te: bool) -> ModuleSpec:
    """Layer spec; TE and local specs give the same parameter names (norms kept unfused) so one
    HF name map serves both."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TEDotProductAttention, TERowParallelLinear
        column, row, core_attention, mask_type = (
            TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention, AttnMaskType.no_mask)
    else:
        column, row, core_attention, mask_type = (
            tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear, TorchAttention,
            AttnMaskType.padding)
    norm = vision_norm(use_te)
    return ModuleSpec(
        module=VisionTransformerLayer,
        params={"full_attention_layers": tuple(vision.fullatt_block_indexes)},
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(linear_qkv=column, core_attention=core_attention,
                                                   linear_proj=row),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


# ---- index bookkeeping (pure functions of image_grid_thw) ----

def check_vision_inputs(vision: VisionConfig, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> None:
    if pixel_values.dim() != 2 or pixel_values.shape[1] != vision.patch_dim:
        raise ValueError(f"pixel_values must be [num_patches, patch_dim={vision.patch_dim}] "
                         f"(channels x temporal x patch x patch), got {tuple(pixel_values.shape)}")
    if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3 or image_grid_thw.is_floating_point():
        raise ValueError(f"image_grid_thw must be an integer [num_images, 3] tensor of (t, h, w), "
                         f"got {tuple(image_grid_thw.shape)} {image_grid_thw.dtype}")
    merge = vision.spatial_merge_size
    for i, (t, h, w) in enumerate(image_grid_thw.tolist()):
        if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
            raise ValueError(f"image_grid_thw[{i}] = {(t, h, w)}: t, h, w must be positive and h, w "
                             f"divisible by spatial_merge_size {merge}")
    total = int(image_grid_thw.prod(-1).sum())
    if total != pixel_values.shape[0]:
        raise ValueError(f"image_grid_thw describes {total} patches (sum of t*h*w) but pixel_values "
                         f"has {pixel_values.shape[0]} rows")


def per_image(image_grid_thw: torch.Tensor, one) -> list:
    """[one(t, h, w) for each image], computed once per distinct (t, h, w): a batch's images mostly
    share a few sizes, and [real; masked] repeats every one."""
    shapes = [tuple(s) for s in image_grid_thw.tolist()]
    done = {s: one(*s) for s in dict.fromkeys(shapes)}
    return [done[s] for s in shapes]


def window_order(vision: VisionConfig, image_grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Window-major permutation of merge units, and the patch count of each window.

    A window is a square of `window_size / patch_size / merge` merge units (smaller at the right and
    bottom edges); windows go row by row through each frame of each image, units row-major inside.
    """
    merge = vision.spatial_merge_size
    side = vision.window_size // vision.patch_size // merge

    def one(t, h, w):
        gh, gw = h // merge, w // merge
        nh, nw = math.ceil(gh / side), math.ceil(gw / side)
        f, y, x = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        window = ((f * nh + y // side) * nw + x // side).flatten()
        return torch.argsort(window, stable=True), torch.bincount(window, minlength=t * nh * nw) * merge**2

    orders, lengths = zip(*per_image(image_grid_thw, one))
    units = torch.tensor([len(o) for o in orders])
    offsets = torch.repeat_interleave(units.cumsum(0) - units, units)  # each image's first unit
    return torch.cat(orders) + offsets, torch.cat(lengths)


def image_lengths(image_grid_thw: torch.Tensor) -> torch.Tensor:
    """Patch count of each full-attention span: one frame of one image."""
    t, h, w = image_grid_thw.long().unbind(-1)
    return torch.repeat_interleave(h * w, t)


def rotary_freqs(vision: VisionConfig, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """2-D rotary angles [N, head_dim] per patch row (processor order): the first half of each
    head_dim/2 block rotates with the patch row y, the second with the column x; rotate-half style."""
    merge = vision.spatial_merge_size

    def one(t, h, w):
        # processor row -> (y, x): rows come in merge x merge groups, groups row-major over the image
        unit, inner = torch.arange(h * w).div(merge**2, rounding_mode="floor"), torch.arange(h * w) % merge**2
        y = unit.div(w // merge, rounding_mode="floor") * merge + inner.div(merge, rounding_mode="floor")
        x = unit % (w // merge) * merge + inner % merge
        return torch.stack([y, x], -1).repeat(t, 1)

    positions = per_image(image_grid_thw, one)
    yx = torch.cat(positions).float()  # [N, 2]
    quarter = vision.head_dim // 4
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(quarter, dtype=torch.float) / quarter)
    half = (yx[:, :, None] * inv_freq).flatten(1)  # [N, head_dim/2] = [y angles, x angles]
    return torch.cat([half, half], -1)


def attention_spans(lengths: tuple[torch.Tensor, torch.Tensor], use_te: bool, device: torch.device):
    """The one place that chooses how block-diagonal attention reaches the kernel.

    lengths: (window span lengths, full span lengths), in patches, in sequence order.
    Returns (attention_mask, packed_seq_params): local spec: each row's segment id per span kind
    [2, s] (TorchAttention's segment attention); TE: THD PackedSeqParams per span kind.
    """
    if use_te:
        params = []
        for span in lengths:
            cu = F.pad(span.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
            longest = int(span.max())
            params.append(PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                          max_seqlen_q=longest, max_seqlen_kv=longest))
        return None, tuple(params)
    return torch.stack([torch.repeat_interleave(torch.arange(len(span), device=device), span.to(device))
                        for span in lengths]), None


# ---- modules ----

class PatchMerger(MegatronModule):
    """RMSNorm, then each merge x merge group of patches (consecutive rows) -> Linear-GELU-Linear."""

    def __init__(self, config: TransformerConfig, vision: VisionConfig, out_hidden_size: int, use_te: bool,
                 tp_group: torch.distributed.ProcessGroup):
        super().__init__(config=config)
        self.merged_size = vision.hidden_size * vision.spatial_merge_size**2
        self.norm = vision_norm(use_te)(config=config, hidden_size=vision.hidden_size, eps=vision.rms_norm_eps)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            self.merged_size, self.merged_size, config=config, init_method=config.init_method, bias=True,
            gather_output=False, tp_group=tp_group)
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            self.merged_size, out_hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.norm(hidden_states).reshape(-1, self.merged_size)
        x, _ = self.linear_fc1(x)
        x, _ = self.linear_fc2(F.gelu(x))
        return x


class Qwen2_5_VisionModel(MegatronModule):
    """Qwen2.5-VL ViT + merger. forward(pixel_values [N, patch_dim], image_grid_thw [num_images, 3])
    -> [N / merge^2, llm hidden], image by image, token order as HF's `visual(...)`."""

    def __init__(self, config: Qwen2_5_VLConfig, transformer_config: TransformerConfig,
                 pg_collection: ProcessGroupCollection, use_te: bool | None = None):
        super().__init__(config=transformer_config)
        self.vision = config.vision
        self.use_te = use_transformer_engine(use_te)
        tc = transformer_config
        if tc.hidden_size != self.vision.hidden_size or tc.num_layers != self.vision.depth:
            raise ValueError("transformer_config does not match config.vision; build it with vision_transformer_config")
        # The stride = kernel Conv3d on one patch is a linear map of its patch_dim values; replicated (small).
        self.patch_embed = torch.nn.Linear(self.vision.patch_dim, self.vision.hidden_size, bias=False,
                                           dtype=tc.params_dtype)
        if tc.perform_initialization:
            tc.init_method(self.patch_embed.weight)
        self.decoder = TransformerBlock(tc, vision_layer_spec(self.vision, self.use_te), post_layer_norm=False,
                                        pg_collection=pg_collection)
        self.merger = PatchMerger(tc, self.vision, config.hidden_size, self.use_te, pg_collection.tp)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        check_vision_inputs(self.vision, pixel_values, image_grid_thw)
        unit = self.vision.spatial_merge_size**2
        order, window_lengths = window_order(self.vision, image_grid_thw)
        order = order.to(pixel_values.device)

        def to_window_order(rows: torch.Tensor) -> torch.Tensor:
            return rows.reshape(-1, unit, rows.shape[-1])[order].reshape(rows.shape)

        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        x = to_window_order(x).unsqueeze(1)  # [s, b=1, h]
        freqs = to_window_order(rotary_freqs(self.vision, image_grid_thw).to(x.device))[:, None, None, :]
        attention_mask, packed_seq_params = attention_spans(
            (window_lengths, image_lengths(image_grid_thw)), self.use_te, x.device)
        x = self.decoder(x, attention_mask=attention_mask, rotary_pos_emb=freqs,
                         packed_seq_params=packed_seq_params)
        merged = self.merger(x.squeeze(1))
        return merged[torch.argsort(order)]
