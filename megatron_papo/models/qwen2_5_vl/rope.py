"""Qwen2.5-VL multimodal rope position ids (3 x B x S): text runs count up on all three axes; an
image's tokens get (t, h, w) grid positions offset by the running position; the text after an image
continues at offset + max(h, w). Same result as transformers' `get_rope_index` for images."""
from __future__ import annotations

import torch


def mrope_position_ids(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, image_token_id: int,
                       spatial_merge_size: int = 2, attention_mask: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, S]; image_grid_thw [num_images, 3] in (sample, position) order; attention_mask
    [B, S] (1 = token, 0 = padding, which gets position 0). Returns (position_ids [3, B, S], deltas [B, 1]):
    delta = max position + 1 - tokens, what generation adds to plain positions after the prompt."""
    batch, seq = input_ids.shape
    position_ids = torch.zeros(3, batch, seq, dtype=torch.long, device=input_ids.device)
    grids = iter([] if image_grid_thw is None else image_grid_thw.tolist())
    deltas = []
    for b in range(batch):
        keep = torch.ones(seq, dtype=torch.bool, device=input_ids.device) if attention_mask is None \
            else attention_mask[b].bool()
        is_image = (input_ids[b][keep] == image_token_id).tolist()
        pieces, pos, start = [], 0, 0
        while start < len(is_image):
            end = start
            while end < len(is_image) and is_image[end] == is_image[start]:
                end += 1
            if not is_image[start]:
                pieces.append(torch.arange(pos, pos + end - start).expand(3, -1))
                pos += end - start
            else:
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise ValueError("more image-token runs in input_ids than rows in image_grid_thw") from None
                h, w = h // spatial_merge_size, w // spatial_merge_size
                if t * h * w != end - start:
                    raise ValueError(f"sample {b}: image run of {end - start} tokens but grid {t}x{h}x{w} after merge")
                tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
                pos += max(h, w)
            start = end
        positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        position_ids[:, b, keep] = positions.to(position_ids.device)
        deltas.append((positions.max() + 1 - len(is_image)).item() if pieces else 0)
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more rows than image-token runs in input_ids")
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)
