"""The converters and verify_conversion.py: HF -> Megatron (one process, TP2xPP2 torch_dist) -> HF
is bitwise identical; the checkpoint is megatron's own TP2xPP2 save and loads at TP2xPP2 and TP1;
the converters never destroy a folder; an export holds what transformers, vLLM and the eval need;
verify_conversion.py passes on the HF folder at TP2xPP2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def test_one_process_conversion_round_trip_and_layouts(tmp_path):
    """One plain process converts HF -> Megatron for TP2xPP2 (torchrun with 2 processes writes the
    same files); Megatron -> HF gives back every tensor bitwise and the tokenizer and processor
    files; the checkpoint is megatron's own TP2xPP2 save, chunk for chunk, and loads there with every
    weight bitwise (4 ranks), and at TP1 with transformers' logits; verify_conversion run with the
    wrong process count prints the torchrun line to use."""
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    from megatron_papo.data.tokenizer import save_tiny_tokenizer
    from megatron_papo.models.qwen2_5_vl.hf_io import MODEL_FILES

    to_mcore = "tools/convert_hf_to_megatron.py"
    hf_dir = save_tiny_hf_folder(tmp_path / "hf")
    save_tiny_tokenizer(hf_dir)
    Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12544).save_pretrained(hf_dir)
    ckpt, shared, back = tmp_path / "ckpt", tmp_path / "ckpt_2proc", tmp_path / "back"
    args = ("--hf-dir", hf_dir, "--tp", 2, "--pp", 2, "--dtype", "fp32")
    r = _tool(to_mcore, *args, "--out", ckpt)
    assert r.returncode == 0 and "memory per process: at most" in r.stdout, r.stderr[-3000:]
    run_distributed(to_mcore, 2, args=(*args, "--out", shared), timeout=300)
    one, two = _files(ckpt), _files(shared)
    assert one.keys() == two.keys() and all(one[k] == two[k] for k in one if k != ".metadata")
    md1, md2 = FileSystemReader(str(ckpt)).read_metadata(), FileSystemReader(str(shared)).read_metadata()
    assert md1.state_dict_metadata == md2.state_dict_metadata and md1.storage_data == md2.storage_data

    r = _tool("tools/convert_megatron_to_hf.py", "--ckpt", ckpt, "--out", back)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, got = _hf_tensors(hf_dir), _hf_tensors(back)
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert ref[name].dtype == got[name].dtype and torch.equal(ref[name], got[name]), name
    carried = [name for name in MODEL_FILES if (hf_dir / name).is_file()]
    assert {"tokenizer_config.json", "preprocessor_config.json"} <= set(carried)
    for name in carried:
        assert (back / name).read_bytes() == (hf_dir / name).read_bytes(), name
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    out = run_distributed("tests/dist/converted_checkpoint.py", 4, args=(hf_dir, ckpt, 2, 2, tmp_path / "scratch"),
                          timeout=300)
    assert "checkpoint matches megatron's own save at tp=2 pp=2" in out, out[-3000:]
    r = _tool("tools/verify_conversion.py", "--hf-dir", hf_dir, "--ckpt", ckpt)  # TP1: one plain process
    assert r.returncode == 0 and _logit_diff(r.stdout) <= 1e-4, r.stderr[-3000:]
    r = _tool("tools/verify_conversion.py", "--hf-dir", hf_dir, "--ckpt", ckpt, "--tp", 2, "--pp", 2)
    line = f"torchrun --nproc-per-node 4 tools/verify_conversion.py --hf-dir {hf_dir} --ckpt {ckpt} --tp 2 --pp 2"
    assert r.returncode == 2 and line in r.stderr, r.stderr[-3000:]


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

    # an HF folder whose last shard holds tensors of the wrong shape: it passes the up-front header
    # check and fails half-way through the conversion
    broken = tmp_path / "broken"
    broken.mkdir()
    shards = sorted(hf_dir.glob("*.safetensors"))
    for f in hf_dir.iterdir():
        if f != shards[-1]:
            (broken / f.name).write_bytes(f.read_bytes())
    save_file({name: torch.zeros(3) for name in load_file(shards[-1])}, broken / shards[-1].name)
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


def _eval(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "megatron_papo.eval", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)


def test_export_of_a_training_checkpoint_loads_and_evaluates(tmp_path):
    """The HF export of a checkpoint holding what the trainer writes (Models.write_model_files:
    tokenizer, chat template, image-processor config) loads in transformers (model, tokenizer,
    processor) and runs through megatron_papo.eval; eval on a file without usable rows says so."""
    from transformers import (
        AutoImageProcessor,
        AutoProcessor,
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    from megatron_papo.data.tokenizer import save_tiny_tokenizer

    hf_dir, ckpt, export = save_tiny_hf_folder(tmp_path / "hf"), tmp_path / "ckpt", tmp_path / "export"
    r = _tool("tools/convert_hf_to_megatron.py", "--hf-dir", hf_dir, "--out", ckpt, "--dtype", "fp32")
    assert r.returncode == 0, r.stderr[-3000:]
    save_tiny_tokenizer(ckpt)  # what the trainer adds to every checkpoint
    Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12544).save_pretrained(ckpt)
    r = _tool("tools/convert_megatron_to_hf.py", "--ckpt", ckpt, "--out", export)
    assert r.returncode == 0, r.stderr[-3000:]

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tok = AutoTokenizer.from_pretrained(export)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n"), chat
    assert AutoImageProcessor.from_pretrained(export).size["shortest_edge"] == 3136
    AutoProcessor.from_pretrained(export)  # what vLLM builds its multimodal processor from

    ev = _eval("--ckpt", export, "--k", 2, "--limit", 2, "--max-new-tokens", 4, "--dtype", "float32")
    assert ev.returncode == 0, ev.stderr[-4000:]
    last = ev.stdout.strip().splitlines()[-1]
    assert last.startswith("avg@2=") and last.endswith("samples=4"), last

    bad = tmp_path / "bad.jsonl"  # one row without an answer: nothing to evaluate
    bad.write_text(json.dumps({"problem": "<image>What colour?", "answer": "", "images": []}) + "\n")
    ev = _eval("--ckpt", export, "--data", bad)
    assert ev.returncode == 2 and f"--data {bad}: no usable rows" in ev.stderr, ev.stderr[-3000:]


def test_truncated_shard_is_named_before_anything_is_written(tmp_path):
    hf = save_tiny_hf_folder(tmp_path / "hf", seed=2)
    shard = sorted(hf.glob("*.safetensors"))[-1]
    with open(shard, "r+b") as f:  # an interrupted copy: the header promises more than the file holds
        f.truncate(shard.stat().st_size // 2)
    proc = _tool("tools/convert_hf_to_megatron.py", "--hf-dir", hf, "--out", tmp_path / "out", "--tp", 1, "--pp", 1)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{shard}: not a complete safetensors file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
