"""Which rule of the HF map (hf_mapping) each parameter of a pipeline stage has.

The map's rules name full-model parameters; a stage holds some of them, under stage-local names
(decoder layers numbered from the stage's first layer, transformer-engine names for the fused LM
norms). One decision about tied embeddings lives here: a last stage that does not hold the
embedding holds megatron's COPY of it as its output layer (`is_tied_output_copy`). The copy is
bound to the embedding's rule, so loading fills it from HF's embed_tokens; it is no HF tensor of its
own, so export and weight sync leave it out (`hf_param_rules`); megatron's finalize_model_grads adds
its gradient to the embedding's.
"""
from __future__ import annotations

import torch

from megatron_papo.models.qwen2_5_vl import hf_mapping
from megatron_papo.models.qwen2_5_vl.hf_mapping import Rule

ParamRule = tuple[str, torch.nn.Parameter, Rule]  # (stage-local name, parameter, its rule)


def is_tied_output_copy(model, local_name: str) -> bool:
    """The last stage's copy of the tied embedding (megatron builds no output layer weight on a stage
    that holds the embedding itself)."""
    return model.model_cfg.tie_word_embeddings and local_name == hf_mapping.OUTPUT_LAYER


def global_name(model, local_name: str) -> str:
    """A stage-local parameter name -> the full-model name the rules use."""
    prefix = hf_mapping.LM_PREFIX + "decoder.layers."
    if local_name.startswith(prefix):
        i, rest = local_name[len(prefix):].split(".", 1)
        return f"{prefix}{int(i) + model.layer_offset}.{rest}"
    if is_tied_output_copy(model, local_name):
        return hf_mapping.EMBEDDING
    return local_name


def param_rules(model) -> list[ParamRule]:
    """Every parameter of this stage with its rule (what loading fills); errors on unmapped ones."""
    rules = {r.megatron: r for r in hf_mapping.all_rules(model.model_cfg, with_vision=model.vision_model is not None)}
    if model.use_te:
        rules = {hf_mapping.te_name(k): r for k, r in rules.items()}
    out = []
    for name, param in model.named_parameters():
        rule = rules.get(global_name(model, name))
        if rule is None:
            raise KeyError(f"parameter {name} has no rule in hf_mapping")
        out.append((name, param, rule))
    return out


def hf_param_rules(model) -> list[ParamRule]:
    """The parameters of this stage that are HF tensors of their own: `param_rules` less the tied
    output copy (what export and the weight sync send)."""
    return [(name, param, rule) for name, param, rule in param_rules(model) if not is_tied_output_copy(model, name)]
