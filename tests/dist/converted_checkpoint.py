"""Worker (TP*PP ranks): a checkpoint written by tools/convert_hf_to_megatron.py in one process
loads into the megatron model at TP x PP with exactly the weights the HF folder gives (every
parameter bitwise), and it is the checkpoint megatron's own save of that model writes: the same
tensor keys, global shapes, dtypes and chunks, the same objects, common.pt and metadata.json.

    worker.py HF_DIR CKPT TP PP SCRATCH
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_papo.models.qwen2_5_vl.dist_io import checkpoint_layout, load_dist_checkpoint
from megatron_papo.models.qwen2_5_vl.hf_io import HFReader, load_hf_weights, read_hf_config
from megatron_papo.models.qwen2_5_vl.model import ModelParallelOptions, build_model
from megatron_papo.parallel import destroy_model_parallel, initialize_model_parallel


def _layout(folder: Path) -> dict:
    """Each tensor's (dtype, global shape, sorted chunks) and each object's key."""
    out = {}
    for key, md in FileSystemReader(str(folder)).read_metadata().state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            out[key] = (md.properties, tuple(md.size), sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks))
        else:
            out[key] = "bytes"
    return out


def main(hf_dir: str, ckpt: str, tp: int, pp: int, scratch: str):
    cfg = read_hf_config(hf_dir)
    initialize_model_parallel(tp, pp)
    opts = ModelParallelOptions(tp=tp, pp=pp, params_dtype=torch.float32, use_te=False,
                                padded_vocab_size=checkpoint_layout(ckpt)["padded_vocab_size"])
    loaded, direct = build_model(cfg, opts), build_model(cfg, opts)
    load_dist_checkpoint(loaded, ckpt)
    load_hf_weights(direct, HFReader(hf_dir))
    for (name, a), (_, b) in zip(loaded.named_parameters(), direct.named_parameters(), strict=True):
        assert torch.equal(a, b), f"rank {dist.get_rank()}: {name} differs from the HF folder's"

    resaved = Path(scratch) / "megatron_save"
    if dist.get_rank() == 0:
        resaved.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(loaded.sharded_state_dict(), str(resaved))
    dist.barrier()
    if dist.get_rank() == 0:
        ours, theirs = _layout(Path(ckpt)), _layout(resaved)
        assert ours.keys() == theirs.keys(), sorted(ours.keys() ^ theirs.keys())
        for key in ours:
            assert ours[key] == theirs[key], (key, ours[key], theirs[key])
        assert torch.load(Path(ckpt) / "common.pt") == torch.load(resaved / "common.pt")
        assert json.loads((Path(ckpt) / "metadata.json").read_text()) == json.loads((resaved / "metadata.json").read_text())
        print(f"checkpoint matches megatron's own save at tp={tp} pp={pp}: {len(ours)} keys", flush=True)
    destroy_model_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
