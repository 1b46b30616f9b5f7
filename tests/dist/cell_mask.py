"""Worker for tests/test_masking.py: `cell_mask.py H W SEED SAMPLE_ID IMAGE_INDEX RATIO` prints
masking.cell_mask(H, W, ...) as one line of 0/1, computed in this fresh process."""
import sys

from megatron_papo.ops import masking

h, w, seed, sample_id, image_index = map(int, sys.argv[1:6])
cells = masking.cell_mask(h, w, seed=seed, sample_id=sample_id, image_index=image_index, ratio=float(sys.argv[6]))
print("".join("1" if v else "0" for v in cells.ravel()))
