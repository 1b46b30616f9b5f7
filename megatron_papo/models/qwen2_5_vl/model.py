"""Qwen2.5-VL on megatron-core: the language model (GPTModel with mrope) and the assembled VLM stage.

One `Qwen2_5_VLModel` is one pipeline stage: the vision tower and the token embedding live on the
first stage, the output layer on the last. Parallel layout and memory options come in through
`ModelParallelOptions`; megatron's parallel_state (see megatron_papo.parallel) must be initialised.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_papo.models.qwen2_5_vl.attention import TorchAttention
from megatron_papo.models.qwen2_5_vl.flavors import Qwen2_5_VLConfig
from megatron_papo.models.qwen2_5_vl.hf_mapping import padded_vocab_size
from megatron_papo.models.qwen2_5_vl.vision import Qwen2_5_VisionModel, vision_transformer_config
from megatron_papo.parallel.backend import use_transformer_engine
from megatron_papo.parallel.norm import RMSNorm


@dataclass
class ModelParallelOptions:
    """How the model is laid out and built (DP is derived: world / (tp * pp))."""

    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False            # needs tp > 1
    recompute_granularity: str | None = None   # None | "full" | "selective"
    recompute_method: str | None = None        # "uniform" | "block" (with "full")
    recompute_num_layers: int | None = None    # with "full"
    params_dtype: torch.dtype = torch.float32  # bf16 on GPU (fp32 main weights live in the optimizer)
    use_te: bool | None = None                 # None: transformer-engine specs when TE imports
    make_vocab_size_divisible_by: int = 128
    padded_vocab_size: int | None = None       # set to a checkpoint's padded vocab to load it at another TP
    perform_initialization: bool = True        # False when weights are loaded right after (conversion)

    def __post_init__(self):
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel=True needs tp > 1")


def _common_config(opts: ModelParallelOptions) -> dict:
    return dict(
        tensor_model_parallel_size=opts.tp, sequence_parallel=opts.sequence_parallel,
        params_dtype=opts.params_dtype, pipeline_dtype=opts.params_dtype,
        bf16=opts.params_dtype == torch.bfloat16, fp16=opts.params_dtype == torch.float16,
        recompute_granularity=opts.recompute_granularity, recompute_method=opts.recompute_method,
        recompute_num_layers=opts.recompute_num_layers,
        perform_initialization=opts.perform_initialization,
        use_cpu_initialization=not torch.cuda.is_available(),
    )


def language_transformer_config(cfg: Qwen2_5_VLConfig, opts: ModelParallelOptions) -> TransformerConfig:
    if cfg.num_hidden_layers % opts.pp:
        raise ValueError(f"pp={opts.pp} must divide num_hidden_layers={cfg.num_hidden_layers}")
    if cfg.num_key_value_heads % opts.tp:
        raise ValueError(f"tp={opts.tp} must divide num_key_value_heads={cfg.num_key_value_heads}")
    return TransformerConfig(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim, normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, mrope_section=list(cfg.mrope_section),
        pipeline_model_parallel_size=opts.pp, **_common_config(opts))


def language_block_spec(tc: TransformerConfig, use_te: bool) -> TransformerBlockSubmodules:
    """This stage's decoder layers. Local specs use our RMSNorm (WrappedTorchNorm refuses SP) and
    torch's fused attention (TorchAttention)."""
    if use_te:
        return get_gpt_decoder_block_spec(tc, use_transformer_engine=True, normalization="RMSNorm")
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    attention = dataclasses.replace(layer.submodules.self_attention, submodules=dataclasses.replace(
        layer.submodules.self_attention.submodules, core_attention=TorchAttention))
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(
        layer.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm, self_attention=attention))
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(tc), layer_norm=RMSNorm)


class Qwen2_5_VLModel(MegatronModule):
    """One pipeline stage of Qwen2.5-VL.

    forward(input_ids [B,S], position_ids [3,B,S], attention_mask, pixel_values [N, patch_dim],
    image_grid_thw [num_images, 3]) -> vocab-parallel logits [B, S, padded_vocab/TP] on the last
    stage, hidden states [S(/TP with SP), B, H] elsewhere. attention_mask None = causal; otherwise
    megatron's boolean [B,1,S,S] mask with True = masked out.
    """

    def __init__(self, cfg: Qwen2_5_VLConfig, opts: ModelParallelOptions,
                 pg_collection: ProcessGroupCollection | None = None,
                 pre_process: bool | None = None, post_process: bool | None = None, with_vision: bool = True):
        tc = language_transformer_config(cfg, opts)
        super().__init__(config=tc)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.model_cfg = cfg  # Qwen2_5_VLConfig (self.config is megatron's TransformerConfig)
        self.opts = opts
        self.use_te = use_transformer_engine(opts.use_te)
        self.pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        self.pre_process = parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process
        self.post_process = parallel_state.is_pipeline_last_stage() if post_process is None else post_process
        self.vocab_size = cfg.vocab_size  # true vocab: logits columns >= this are padding
        self.padded_vocab_size = opts.padded_vocab_size or padded_vocab_size(
            cfg.vocab_size, opts.tp, opts.make_vocab_size_divisible_by)
        if self.padded_vocab_size < cfg.vocab_size or self.padded_vocab_size % opts.tp:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} must be >= vocab_size {cfg.vocab_size} "
                             f"and divisible by tp={opts.tp}")
        self.layer_offset = get_transformer_layer_offset(tc)
        self.language_model = GPTModel(
            config=tc, transformer_layer_spec=language_block_spec(tc, self.use_te),
            vocab_size=self.padded_vocab_size, max_sequence_length=cfg.max_position_embeddings,
            pre_process=self.pre_process, post_process=self.post_process, parallel_output=True,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings, position_embedding_type="mrope",
            rotary_base=cfg.rope_theta, pg_collection=self.pg_collection,
            scatter_embedding_sequence_parallel=False)  # embed() scatters after placing image embeddings
        self.vision_model = None
        if self.pre_process and with_vision:
            vtc = vision_transformer_config(cfg.vision, **{k: v for k, v in _common_config(opts).items()
                                                           if k not in ("sequence_parallel", "pipeline_dtype")})
            self.vision_model = Qwen2_5_VisionModel(cfg, vtc, self.pg_collection, use_te=self.use_te)

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    # megatron's finalize_model_grads all-reduces tied-embedding grads across stages through these
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_grid_thw: torch.Tensor | None, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image embeddings at image-pad positions -> [S(/TP with SP), B, H].
        `image_mask` [B, S] (default: input_ids == image_token_id) says which positions take them:
        a generated image-pad id is an ordinary token, as in vLLM and transformers' decoding."""
        embeddings = self.language_model.embedding.word_embeddings(input_ids)  # [B, S, H]
        if pixel_values is not None:
            if self.vision_model is None:
                raise ValueError("pixel_values given but this model was built with with_vision=False")
            image_embeds = self.vision_model(pixel_values, image_grid_thw)
            is_image = (input_ids == self.model_cfg.image_token_id if image_mask is None else image_mask).unsqueeze(-1)
            if int(is_image.sum()) != image_embeds.shape[0]:
                raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens (id "
                                 f"{self.model_cfg.image_token_id}) but the images give {image_embeds.shape[0]}")
            embeddings = embeddings.masked_scatter(is_image, image_embeds.to(embeddings.dtype))
        embeddings = embeddings.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings, group=self.pg_collection.tp)
        return embeddings

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, logits_from: int = 0) -> torch.Tensor:
        """Logits [B, S - logits_from, V/TP] (last stage; earlier stages return hidden states).
        `logits_from`: the first position whose logits are wanted. Every position still runs through
        every layer (it is context), but those before it skip the output layer: in RL the prompt's
        logits are never read, and they are most of a sequence (images). With sequence parallel,
        S - logits_from must be a multiple of TP."""
        decoder_input = self.embed(input_ids, pixel_values, image_grid_thw, image_mask) if self.pre_process else None
        if not (self.post_process and logits_from):
            return self.language_model(input_ids=None, position_ids=position_ids, attention_mask=attention_mask,
                                       decoder_input=decoder_input)
        # GPTModel cannot skip positions before its output layer (only inference's last-token path
        # does): cut its input for this call only
        cut = self.language_model.output_layer.register_forward_pre_hook(
            lambda _, args: (self._positions_from(args[0], logits_from), *args[1:]))
        try:
            return self.language_model(input_ids=None, position_ids=position_ids, attention_mask=attention_mask,
                                       decoder_input=decoder_input)
        finally:
            cut.remove()

    def _positions_from(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """hidden [S(/TP with SP), B, H] -> positions start.. of the sequence, in the same layout."""
        if not self.config.sequence_parallel:
            return hidden[start:]
        tp = self.pg_collection.tp
        length = hidden.shape[0] * tp.size() - start
        if length % tp.size():
            raise ValueError(f"logits_from={start}: with sequence parallel the {length} positions from it on must "
                             f"split evenly over TP={tp.size()}")
        # gather (backward: this rank's part of the replicated gradient), cut, and split again (backward:
        # gather the parts; the output layer's backward has already summed them over the vocab shards)
        full = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False, group=tp)
        return tensor_parallel.scatter_to_sequence_parallel_region(full[start:], group=tp)


def build_model(cfg: Qwen2_5_VLConfig, opts: ModelParallelOptions,
                pg_collection: ProcessGroupCollection | None = None, with_vision: bool = True) -> Qwen2_5_VLModel:
    """This rank's pipeline stage (parallel_state must be initialised with opts.tp / opts.pp)."""
    if (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size()) \
            != (opts.tp, opts.pp):
        raise ValueError(f"ModelParallelOptions tp={opts.tp} pp={opts.pp} do not match the initialised parallel_state")
    return Qwen2_5_VLModel(cfg, opts, pg_collection, with_vision=with_vision)
