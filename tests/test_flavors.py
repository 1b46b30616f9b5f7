"""Flavor registry: the real flavors reproduce the published HF parameter totals from config alone,
and the config round-trips through an HF config.json that transformers accepts."""
import pytest

from megatron_papo.models.qwen2_5_vl.flavors import FLAVORS, PUBLISHED_PARAM_COUNTS, Qwen2_5_VLConfig, get_flavor


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAM_COUNTS))
def test_published_param_counts(name):
    assert FLAVORS[name].param_count() == PUBLISHED_PARAM_COUNTS[name]


def test_real_flavor_hyperparameters():
    f72 = FLAVORS["72B"]
    assert (f72.hidden_size, f72.num_hidden_layers, f72.num_attention_heads, f72.num_key_value_heads) == (8192, 80, 64, 8)
    assert FLAVORS["3B"].tie_word_embeddings and not f72.tie_word_embeddings
    assert FLAVORS["3B"].vocab_size == 151936 and f72.vocab_size == 152064
    for f in FLAVORS.values():
        assert 2 * sum(f.mrope_section) == f.head_dim
    assert FLAVORS["7B"].vision.fullatt_block_indexes == (7, 15, 23, 31)
    assert FLAVORS["7B"].vision.patch_dim == 1176


@pytest.mark.parametrize("name", sorted(FLAVORS))
def test_hf_config_round_trip(name):
    cfg = FLAVORS[name]
    assert Qwen2_5_VLConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_param_count_matches_transformers_tiny():
    torch = pytest.importorskip("torch")
    from transformers import Qwen2_5_VLConfig as HFConfig
    from transformers import Qwen2_5_VLForConditionalGeneration

    for tied in (False, True):
        cfg = get_flavor("tiny", tie_word_embeddings=tied)
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration(HFConfig(**cfg.to_hf_dict()))
        n = sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once
        assert n == cfg.param_count(), (tied, n, cfg.param_count())


def test_bad_config_errors():
    with pytest.raises(ValueError, match="mrope_section"):
        get_flavor("tiny", mrope_section=(1, 1, 1))
    with pytest.raises(ValueError, match="unknown flavor"):
        get_flavor("13B")
