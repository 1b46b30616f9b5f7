"""Worker for tests/test_trainer_update.py: `update_worker.py PRESET OUT MODE` builds the tiny trainer
(no rollout engine), two prompts with two responses each and the given advantages, and
    direction  prints the per-response change of log-probability after one update and its grad norm
               (`DELTAS d0 d1 d2 d3 GRAD g`);
    loss       sharpens the policy away from the reference first, then prints the update's metrics and
               `papo_loss` of the same inputs (`METRICS {"trainer": ..., "reference": ...}`);
    stacked    the old and masked log-probs of the one stacked [real; masked] forward against one
               policy forward per kind of image, and against a plain log-softmax of the policy's
               logits at every position, with prompts of two lengths
               (`STACKED max_difference real_vs_masked_gap max_difference_plain prompt_lengths`).
"""
import dataclasses
import json
import sys

import torch

from megatron_papo.algos.losses import papo_loss
from megatron_papo.parallel import initialize_model_parallel
from megatron_papo.train import resolve_config
from megatron_papo.trainer.batch import Experience, make_micro_batches, split_response_values
from megatron_papo.trainer.loop import Trainer
from megatron_papo.trainer.pipeline import add_position_ids, model_inputs

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
if mode == "stacked":  # the second prompt one token longer: the rows' responses start at different positions
    for e in exps[2:]:
        e.prompt_ids = e.prompt_ids[:1] + e.prompt_ids
t.compute_logprobs(exps)
if mode == "loss":
    def tokens(attr):  # one micro-batch: its token mean is that over all the response tokens in one row
        return None if getattr(exps[0], attr) is None else torch.cat([getattr(e, attr) for e in exps])[None]
    adv = torch.cat([torch.full((len(e.response_ids),), e.advantage) for e in exps])[None]
    old = tokens("old_logp")
    _, ref = papo_loss(cfg.algo, logp=old, old_logp=old, ref_logp=tokens("ref_logp"),
                       masked_logp=tokens("masked_logp"), advantages=adv, response_mask=torch.ones_like(adv))
    print("METRICS", json.dumps({"trainer": t.update(exps), "reference": {k: float(v) for k, v in ref.items()}}))
elif mode == "stacked":  # one policy forward per kind of image, the masked one as if it were real
    real = [dataclasses.replace(e, old_logp=None, masked_logp=None) for e in exps]
    masked = [dataclasses.replace(e, pixel_values=e.masked_pixel_values, old_logp=None, masked_logp=None) for e in exps]
    for alone in (real, masked):
        chunks = make_micro_batches(alone, cfg.micro_batch_size)
        t.store_logprobs(chunks, [t._collate(c) for c in chunks], t.models.policy, ("old_logp",), cfg.rollout.temperature)
    diff = max(max((e.old_logp - r.old_logp).abs().max().item(), (e.masked_logp - m.old_logp).abs().max().item())
               for e, r, m in zip(exps, real, masked))
    gap = max((e.old_logp - e.masked_logp).abs().max().item() for e in exps)
    # and against the full-vocabulary log-softmax of the model's logits at every position
    mb = add_position_ids(t._collate(exps), t.model_cfg)
    policy = t.models.policy[0]
    ids, pos, pixels, grid, image_mask = model_inputs(mb, "both", t.model_cfg.image_token_id)
    with torch.no_grad():
        policy.eval()
        logits = policy(ids, pos, None, pixels, grid, image_mask)
        policy.train()
    logp = torch.log_softmax(logits[..., :t.model_cfg.vocab_size] / cfg.rollout.temperature, -1)
    logp = logp.gather(-1, mb.targets.repeat(2, 1)[..., None])[..., 0]
    real_plain, masked_plain = (split_response_values(x, exps) for x in logp.chunk(2))
    plain = max(max((e.old_logp - r).abs().max().item(), (e.masked_logp - m).abs().max().item())
                for e, r, m in zip(exps, real_plain, masked_plain))
    print("STACKED", diff, gap, plain, len({len(e.prompt_ids) for e in exps}))
else:
    before = [e.old_logp.sum().item() for e in exps]
    metrics = t.update(exps)
    t.compute_logprobs(exps)
    after = [e.old_logp.sum().item() for e in exps]
    print("DELTAS", *[a - b for a, b in zip(after, before)], "GRAD", metrics["grad_norm"])
