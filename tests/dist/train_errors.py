"""Worker for tests/test_train.py: `python train_errors.py CASES.json` runs `megatron_papo.train`'s
entry point once per case, in this one process (one interpreter start instead of one per case), and
prints a JSON list of {"rc", "stderr", "written"}.

A case is {"env": {...}, "args": [...], "out": path}: torchrun's variables as the launcher would set
them for that rank, the command-line arguments (output_dir is added), and the output folder, which
must not exist afterwards (nothing may be written before the configuration is checked)."""
import contextlib
import io
import json
import os
import sys
from pathlib import Path

from megatron_papo.train import main

JOB_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_RANK")


def run_case(case: dict) -> dict:
    saved = {k: os.environ.get(k) for k in JOB_VARIABLES}
    os.environ.update(case["env"])
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            rc = main([f"output_dir={case['out']}", *case["args"]])
    except SystemExit as e:  # argparse
        rc = e.code
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"rc": rc, "stderr": stderr.getvalue(), "written": Path(case["out"]).exists()}


if __name__ == "__main__":
    cases = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps([run_case(c) for c in cases]))
