"""HF -> Megatron (TP2xPP2, torch_dist) -> HF is bitwise identical; the TP2xPP2 checkpoint loads at
TP1xPP2 with transformers' logits; verify_conversion.py passes on the HF folder at TP2xPP2."""
import re
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
