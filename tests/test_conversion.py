"""HF -> Megatron (TP2xPP2, torch_dist) -> HF is bitwise identical; the TP2xPP2 checkpoint loads at
TP1xPP2 with transformers' logits; verify_conversion.py passes on the HF folder at TP2xPP2."""
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.distributed import REPO, run_distributed
from tests.helpers_hf import save_tiny_hf_folder


def _hf_tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _tool(script: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """A tool run as one plain process (no torchrun)."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, timeout=timeout, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _logit_diff(out: str) -> float:
    last = [line for line in out.strip().splitlines() if line.startswith("max_abs_logit_diff=")]
    assert last, out[-3000:]
    return float(last[-1].split("=", 1)[1])


def test_round_trip_and_relayout(tmp_path):
    hf_dir = save_tiny_hf_folder(tmp_path / "hf")
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    run_distributed("tools/convert_hf_to_megatron.py", 4, args=("--hf-dir", hf_dir, "--out", ckpt, "--tp", 2,
                                                              "--pp", 2, "--dtype", "fp32"), timeout=300)
    assert (ckpt / ".metadata").is_file() and not (tmp_path / "ckpt.tmp").exists()
    subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--ckpt", str(ckpt), "--out", str(back)],
                   cwd=REPO, check=True, timeout=300, capture_output=True,
                   env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    ref, got = _hf_tensors(hf_dir), _hf_tensors(back)
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert ref[name].dtype == got[name].dtype and torch.equal(ref[name], got[name]), name
    from transformers import Qwen2_5_VLForConditionalGeneration
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    out = run_distributed("tools/verify_conversion.py", 2, args=("--hf-dir", hf_dir, "--ckpt", ckpt, "--tp", 1,
                                                               "--pp", 2), timeout=300)
    assert _logit_diff(out) <= 1e-4


def test_verify_conversion_tp2_pp2(tmp_path):
    hf_dir = save_tiny_hf_folder(tmp_path / "hf", seed=4)
    out = run_distributed("tools/verify_conversion.py", 4, args=("--hf-dir", hf_dir, "--tp", 2, "--pp", 2),
                          timeout=300)
    assert _logit_diff(out) <= 1e-4


def test_converters_never_destroy_a_folder(tmp_path):
    """--out must be empty (or --overwrite), never the input, inside it or around it, and a failed
    conversion leaves the old --out as it was and no half-written folder; both converters."""
    to_mcore, to_hf = "tools/convert_hf_to_megatron.py", "tools/convert_megatron_to_hf.py"
    hf_dir = save_tiny_hf_folder(tmp_path / "hf")
    hf_files = _files(hf_dir)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("not yours")

    r = _tool(to_mcore, "--hf-dir", hf_dir, "--out", busy, "--dtype", "fp32")
    assert r.returncode == 2 and f"--out {busy}" in r.stderr and "--overwrite" in r.stderr, r.stderr[-3000:]
    assert _files(busy) == {"mine.txt": b"not yours"}
    for out in (hf_dir, hf_dir / "sub", tmp_path):  # the input, a folder inside it, a folder holding it
        r = _tool(to_mcore, "--hf-dir", hf_dir, "--out", out, "--overwrite")
        assert r.returncode == 2 and f"--hf-dir {hf_dir}" in r.stderr, r.stderr[-3000:]
    assert _files(hf_dir) == hf_files

    broken = tmp_path / "broken"  # an HF folder whose last shard is missing: fails half-way
    broken.mkdir()
    shards = sorted(hf_dir.glob("*.safetensors"))
    for f in hf_dir.iterdir():
        if f != shards[-1]:
            (broken / f.name).write_bytes(f.read_bytes())
    r = _tool(to_mcore, "--hf-dir", broken, "--out", busy, "--overwrite", "--dtype", "fp32")
    assert r.returncode not in (0, 2), r.stderr[-3000:]
    assert _files(busy) == {"mine.txt": b"not yours"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "busy", "hf"]  # nothing half-written left

    ckpt = tmp_path / "busy"
    r = _tool(to_mcore, "--hf-dir", hf_dir, "--out", ckpt, "--overwrite", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (ckpt / ".metadata").is_file() and not (ckpt / "mine.txt").exists()
    ckpt_files = _files(ckpt)

    back = tmp_path / "back"
    back.mkdir()
    (back / "mine.txt").write_text("not yours")
    r = _tool(to_hf, "--ckpt", ckpt, "--out", back)
    assert r.returncode == 2 and f"--out {back}" in r.stderr and "--overwrite" in r.stderr, r.stderr[-3000:]
    assert _files(back) == {"mine.txt": b"not yours"}
    for out in (ckpt, ckpt / "sub", tmp_path):
        r = _tool(to_hf, "--ckpt", ckpt, "--out", out, "--overwrite")
        assert r.returncode == 2 and f"--ckpt {ckpt}" in r.stderr, r.stderr[-3000:]
    assert _files(ckpt) == ckpt_files
    r = _tool(to_hf, "--ckpt", ckpt, "--out", back, "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (back / "model.safetensors.index.json").is_file() and not (back / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "broken", "busy", "hf"]
