"""The rollout topology's arithmetic (parallel/context.py): engines, prompt shares, validation."""
import pytest

from megatron_papo.parallel.context import RolloutTopology, check_rollout_tp

SIZES = {"num_attention_heads": 64, "num_key_value_heads": 8, "vision num_heads": 16}


@pytest.mark.parametrize("world, tp, prompts", [(2, 1, 4), (4, 2, 5), (8, 8, 3), (6, 2, 2), (64, 8, 384)])
def test_prompt_ranges_partition_the_batch_in_order(world, tp, prompts):
    ranges = [RolloutTopology(world, tp, rank).prompt_range(prompts) for rank in range(world)]
    engines = world // tp
    for rank, r in enumerate(ranges):  # the ranks of one engine share its prompts
        assert r == ranges[(rank // tp) * tp]
    firsts = [ranges[e * tp] for e in range(engines)]
    assert [i for r in firsts for i in r] == list(range(prompts))  # contiguous, in order, each once
    assert max(map(len, firsts)) - min(map(len, firsts)) <= 1
    topology = RolloutTopology(world, tp, world - 1)
    assert (topology.engines, topology.engine_index, topology.engine_rank) == (engines, engines - 1, tp - 1)


def test_rollout_tp_validation():
    check_rollout_tp(8, 64, 8, SIZES)
    check_rollout_tp(16, 64, 16, SIZES)  # 8 KV heads over 16 ranks: vLLM replicates each twice
    for args, message in [((3, 64, 8), "must divide the job's 64 ranks"),
                          ((16, 64, 8), "cannot span hosts"),
                          ((32, 64, 32), "vision num_heads=16"),
                          ((0, 64, 8), "rollout.tp must be >= 1")]:
        with pytest.raises(ValueError, match=message):
            check_rollout_tp(*args, SIZES)
    with pytest.raises(ValueError, match="num_key_value_heads=8"):
        check_rollout_tp(12, 24, 24, {"num_key_value_heads": 8})


def test_rollout_tp_against_the_flavors_vllm_splits():
    """Every dimension vLLM splits is checked: 3B's ViT MLP (3420) does not split over 8 ranks though its
    heads do, and would fail only inside vLLM's engine build; the 72B recipe's rollout.tp=8 passes."""
    from megatron_papo.models.qwen2_5_vl.flavors import get_flavor
    from megatron_papo.rollout.reshard import vllm_split_sizes

    check_rollout_tp(8, 64, 8, vllm_split_sizes(get_flavor("72B")))
    check_rollout_tp(4, 64, 8, vllm_split_sizes(get_flavor("3B")))
    with pytest.raises(ValueError, match="vision intermediate_size=3420"):
        check_rollout_tp(8, 64, 8, vllm_split_sizes(get_flavor("3B")))
    assert list(vllm_split_sizes(get_flavor("72B")).values()) == [64, 8, 29568, 16, 3456, 1280 * 4, 152064]
