"""One PPO update of the trainer.

- It moves the policy the way the advantages say: within each prompt the response with the positive
  advantage gains log-probability relative to the one with the negative advantage, and the negative
  one loses (GRPO and PAPO presets). (The positive one need not rise in absolute terms: the two share
  tokens, which the negative advantage pushes down.)
- The loss it minimised is the PAPO objective of its inputs: the reported loss and its terms
  (kl_prcp, entropy, masked_entropy, ref_kl, ...) equal `papo_loss` computed here on the trainer's own
  old / reference / masked log-probs and advantages (the update's forward runs at the old weights, so
  its log-probs are the old ones). The policy is sharpened away from the reference first, so that the
  KL terms are large enough that a dropped gamma, beta or eta shows.
"""
import json
import subprocess
import sys

import pytest

from tests.distributed import REPO

WORKER = r'''
import json, sys, torch
from megatron_papo.algos.losses import papo_loss
from megatron_papo.parallel import initialize_model_parallel
from megatron_papo.train import resolve_config
from megatron_papo.trainer.batch import Experience
from megatron_papo.trainer.loop import Trainer

preset, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = resolve_config(None, [f"output_dir={out}", f"preset={preset}", "sft_steps=0", "rollout_batch_size=2",
                            "global_batch_size=2", "rollout.n=2", "optim.lr=1e-3",
                            f"micro_batch_size={2 if mode == 'direction' else 4}", "synthetic.image_size=56",
                            "processor.min_pixels=3136", "processor.max_pixels=12544", "monitor.tensorboard=false",
                            "checkpoint.resume=none"])
initialize_model_parallel(1, 1, seed=1)
t = Trainer(cfg, with_engine=False)
advantages = (1.0, -1.0)
if mode == "loss":
    advantages = (1.0, -0.5)  # policy loss -mean(A) != 0
    with torch.no_grad():  # the policy only: ref_kl > 0, and sharper logits make kl_prcp larger
        for name, p in t.models.policy[0].named_parameters():
            if p.ndim == 2 and "norm" not in name:
                p.mul_(3.0)
exps = []
for g, s in enumerate(t.data.next_batch(2)):
    enc = t.processor.encode_sample(s, mask=cfg.mask)
    for k, adv in enumerate(advantages):  # same prompt, two different responses
        resp = t.processor.tokenizer(f"<think>{g}{k}</think> \\boxed{{{k}}}", add_special_tokens=False)["input_ids"]
        exps.append(Experience(sample_id=s.sample_id, group=g, prompt_ids=enc.input_ids.tolist(), response_ids=resp,
                               pixel_values=enc.pixel_values, masked_pixel_values=enc.masked_pixel_values,
                               image_grid_thw=enc.image_grid_thw, rollout_logp=[0.0] * len(resp), advantage=adv))
t.compute_logprobs(exps)
if mode == "loss":
    def tokens(attr):  # one micro-batch: its token mean is that over all the response tokens in one row
        return None if getattr(exps[0], attr) is None else torch.cat([getattr(e, attr) for e in exps])[None]
    adv = torch.cat([torch.full((len(e.response_ids),), e.advantage) for e in exps])[None]
    old = tokens("old_logp")
    _, ref = papo_loss(cfg.algo, logp=old, old_logp=old, ref_logp=tokens("ref_logp"),
                       masked_logp=tokens("masked_logp"), advantages=adv, response_mask=torch.ones_like(adv))
    print("METRICS", json.dumps({"trainer": t.update(exps), "reference": {k: float(v) for k, v in ref.items()}}))
else:
    before = [e.old_logp.sum().item() for e in exps]
    metrics = t.update(exps)
    t.compute_logprobs(exps)
    after = [e.old_logp.sum().item() for e in exps]
    print("DELTAS", *[a - b for a, b in zip(after, before)], "GRAD", metrics["grad_norm"])
'''


def _run(preset, mode, tmp_path):
    proc = subprocess.run([sys.executable, "-c", WORKER, preset, str(tmp_path), mode], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                                       "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("preset", ["grpo", "papo_h"])
def test_update_follows_the_advantages(preset, tmp_path):
    line = next(l for l in _run(preset, "direction", tmp_path).splitlines() if l.startswith("DELTAS"))
    values = [float(x) for x in line.split()[1:5]]
    for positive, negative in (values[0:2], values[2:4]):
        assert positive - negative > 1.0, line  # the preferred response gains on the other
        assert negative < 0, line               # advantage -1: less likely


@pytest.mark.parametrize("preset", ["grpo", "papo_h"])
def test_update_minimises_papo_loss_of_its_inputs(preset, tmp_path):
    line = next(l for l in _run(preset, "loss", tmp_path).splitlines() if l.startswith("METRICS"))
    got, want = json.loads(line.split(None, 1)[1]).values()
    # grpo has no masked branch: no kl_prcp / masked_entropy on either side
    assert ("kl_prcp" in want) == (preset == "papo_h") and want["ref_kl"] > 0.05
    assert {k for k in got if k != "grad_norm"} == set(want), line
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, line)
