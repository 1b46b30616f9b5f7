"""One training prompt, as every dataset yields it."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_papo.data.prompts import user_message


@dataclass
class Sample:
    sample_id: int                    # stable id (row index / synthetic index); seeds the image mask
    prompt: str                       # problem text through the prompt template; `<image>` marks images
    answer: str                       # ground truth, graded by data/rewards
    images: list[np.ndarray] = field(default_factory=list)  # RGB uint8 [H, W, 3], in placeholder order
    choices: dict[str, str] | None = None  # multiple-choice options (letter -> text) when the problem has them
    target: str | None = None         # SFT response (synthetic task: `<think>..</think> \boxed{..}`)

    @property
    def messages(self) -> list[dict]:
        return user_message(self.prompt)
