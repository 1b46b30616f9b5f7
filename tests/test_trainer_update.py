"""One PPO update of the trainer moves the policy the way the advantages say: within each prompt the
response with the positive advantage gains log-probability relative to the one with the negative
advantage, and the negative one loses (GRPO and PAPO presets). (The positive one need not rise in
absolute terms: the two share tokens, which the negative advantage pushes down.)"""
import subprocess
import sys

import pytest

from tests.distributed import REPO

WORKER = r'''
import sys, torch
from megatron_papo.parallel import initialize_model_parallel
from megatron_papo.train import resolve_config
from megatron_papo.trainer.batch import Experience
from megatron_papo.trainer.loop import Trainer

preset, out = sys.argv[1], sys.argv[2]
cfg = resolve_config(None, [f"output_dir={out}", f"preset={preset}", "sft_steps=0", "rollout_batch_size=2",
                            "global_batch_size=2", "rollout.n=2", "micro_batch_size=2", "optim.lr=1e-3",
                            "synthetic.image_size=56", "processor.min_pixels=3136", "processor.max_pixels=12544",
                            "monitor.tensorboard=false", "checkpoint.resume=none"])
initialize_model_parallel(1, 1, seed=1)
t = Trainer(cfg, with_engine=False)
exps = []
for g, s in enumerate(t.data.next_batch(2)):
    enc = t.processor.encode_sample(s, mask=cfg.mask)
    for k, adv in enumerate((1.0, -1.0)):  # same prompt, two different responses
        resp = t.processor.tokenizer(f"<think>{g}{k}</think> \\boxed{{{k}}}", add_special_tokens=False)["input_ids"]
        exps.append(Experience(sample_id=s.sample_id, group=g, prompt_ids=enc.input_ids.tolist(), response_ids=resp,
                               pixel_values=enc.pixel_values, masked_pixel_values=enc.pixel_values_masked,
                               image_grid_thw=enc.image_grid_thw, rollout_logp=[0.0] * len(resp), advantage=adv))
t.compute_logprobs(exps)
before = [e.old_logp.sum().item() for e in exps]
metrics = t.update(exps)
t.compute_logprobs(exps)
after = [e.old_logp.sum().item() for e in exps]
print("DELTAS", *[a - b for a, b in zip(after, before)], "GRAD", metrics["grad_norm"])
'''


@pytest.mark.parametrize("preset", ["grpo", "papo_h"])
def test_update_follows_the_advantages(preset, tmp_path):
    proc = subprocess.run([sys.executable, "-c", WORKER, preset, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                                       "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("DELTAS"))
    values = [float(x) for x in line.split()[1:5]]
    for positive, negative in (values[0:2], values[2:4]):
        assert positive - negative > 1.0, line  # the preferred response gains on the other
        assert negative < 0, line               # advantage -1: less likely
