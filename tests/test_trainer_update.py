"""One PPO update of the trainer.

- It moves the policy the way the advantages say: within each prompt the response with the positive
  advantage gains log-probability relative to the one with the negative advantage, and the negative
  one loses (GRPO and PAPO presets). (The positive one need not rise in absolute terms: the two share
  tokens, which the negative advantage pushes down.)
- The old-policy and masked-image log-probs, which come from one forward over [real; masked],
  equal one forward over the real images and one over the masked ones (within 1e-6).
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


def _run(preset, mode, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tests/dist/update_worker.py"), preset, str(tmp_path), mode],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "PYTHONWARNINGS": "ignore"})
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
    assert {k for k in got if k not in ("grad_norm", "lr")} == set(want), line
    assert got["lr"] == pytest.approx(1e-3), line  # the lr this update used (optim.lr, no warm-up)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, line)


def test_masked_logp_from_the_stacked_forward_equals_separate_forwards(tmp_path):
    """PAPO's reference mode: compute_logprobs gets old_logp and masked_logp from one forward over
    [real; masked] (2 micro-batches of 2 + 2 sequences); one forward with the real images and one with
    the masked images give the same values. Both equal a plain full-vocabulary log-softmax of the
    policy's logits at every position (the trainer computes the output layer from the shortest
    prompt's end on only), with prompts of two lengths in the micro-batch."""
    line = next(l for l in _run("papo_h", "stacked", tmp_path).splitlines() if l.startswith("STACKED"))
    diff, gap, plain, prompt_lengths = map(float, line.split()[1:])
    assert diff <= 1e-6 and plain <= 2e-6 and prompt_lengths == 2, line
    assert gap > 1e-3, line  # the masked image changes the log-probs: the comparison can fail
