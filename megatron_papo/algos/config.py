"""The PAPO / GRPO / DAPO objective's options (names as in docs/papo.md)."""
from dataclasses import dataclass

PERCEPTION_MODES = ("reference", "exact")
ENTROPY_MODES = ("reference", "exact")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGG_MODES = ("token_mean", "global_token_mean", "seq_mean")


@dataclass
class PAPOConfig:
    # perception-loss coefficient: the loss gets -gamma * KL_prcp (KL_prcp is maximised); 0 = off
    gamma: float = 0.0
    # entropy coefficient of the real-image policy (loss gets +eta1 * entropy); 0 = off
    eta1: float = 0.0
    # entropy coefficient of the masked-image policy (loss gets +eta2 * entropy); 0 = off
    eta2: float = 0.0
    # reference-policy KL coefficient (loss gets +beta * KL_ref); 0.0 = off, no reference model needed
    beta: float = 0.01
    # estimator of KL_ref on sampled tokens, x = logp_ref - logp: 'k1' = -x, 'k2' = x^2 / 2,
    # 'k3' = clamp(e^x - x - 1, -10, 10) with x clamped to [-20, 20] (verl's low_var_kl)
    kl_estimator: str = "k3"
    # PPO clip range below 1: the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_low: float = 0.2
    # PPO clip range above 1 (DAPO's clip-higher uses 0.28)
    clip_high: float = 0.3
    # dual-clip constant c: for A < 0 the token loss is at most -c * A
    dual_clip: float = 3.0
    # 'reference': KL_prcp = k3(logp, masked_logp) on sampled tokens, masked_logp precomputed (no grad);
    # 'exact': full-vocabulary KL(pi(.|q,I) || pi(.|q,I_mask)) from vocab-parallel logits
    perception_mode: str = "reference"
    # 'reference': entropies estimated on sampled tokens as -logp and -masked_logp;
    # 'exact': full-vocabulary entropies of both branches from vocab-parallel logits
    entropy_mode: str = "reference"
    # exact modes only: let the gradient flow into the masked-image logits (KL_prcp and H(masked))
    masked_branch_grad: bool = False
    # how token losses become the micro-batch loss (see algos.losses.aggregate): 'token_mean'
    # (the reference), 'global_token_mean' or 'seq_mean'
    loss_agg_mode: str = "token_mean"
    # DAPO dynamic sampling: drop prompt groups whose mean accuracy is not in the open interval
    # (dynamic_sampling_low, dynamic_sampling_high)
    dynamic_sampling: bool = False
    # lower bound (exclusive) of the mean group accuracy kept by dynamic sampling
    dynamic_sampling_low: float = 0.01
    # upper bound (exclusive) of the mean group accuracy kept by dynamic sampling
    dynamic_sampling_high: float = 0.99
    # DAPO soft overlong punishment: length of the buffer before max_response_length in which the
    # reward is linearly reduced; 0 = off
    overlong_buffer_len: int = 0
    # reward penalty at (and beyond) max_response_length when overlong shaping is on
    overlong_penalty_factor: float = 1.0

    @property
    def needs_logits(self) -> bool:
        """An exact mode: the loss needs the vocab-parallel logits, not only the sampled log-probs."""
        return "exact" in (self.perception_mode, self.entropy_mode)

    @property
    def needs_masked_logp(self) -> bool:
        """A reference-mode masked term is on: precompute log pi_old(o | q, I_mask) before the update."""
        return (self.perception_mode == "reference" and self.gamma > 0) or (
            self.entropy_mode == "reference" and self.eta2 > 0)

    @property
    def needs_masked_logits(self) -> bool:
        """An exact-mode masked term is on: the update forwards [real; masked] for full masked logits."""
        return (self.perception_mode == "exact" and self.gamma > 0) or (self.entropy_mode == "exact" and self.eta2 > 0)

    def __post_init__(self):
        for name, allowed in (("perception_mode", PERCEPTION_MODES), ("entropy_mode", ENTROPY_MODES),
                              ("kl_estimator", KL_ESTIMATORS), ("loss_agg_mode", LOSS_AGG_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"PAPOConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("gamma", "eta1", "eta2", "beta", "overlong_penalty_factor", "overlong_buffer_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"PAPOConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"PAPOConfig needs 0 <= clip_low < 1 and clip_high >= 0, got "
                             f"clip_low={self.clip_low}, clip_high={self.clip_high}")
        if self.dual_clip <= 1:
            raise ValueError(f"PAPOConfig.dual_clip must be > 1, got {self.dual_clip}")
        if self.masked_branch_grad and self.perception_mode == self.entropy_mode == "reference":
            raise ValueError("PAPOConfig.masked_branch_grad needs perception_mode or entropy_mode 'exact' "
                             "(in reference mode masked_logp is precomputed and has no gradient)")
        if not 0 <= self.dynamic_sampling_low < self.dynamic_sampling_high <= 1:
            raise ValueError("PAPOConfig needs 0 <= dynamic_sampling_low < dynamic_sampling_high <= 1, got "
                             f"{self.dynamic_sampling_low}, {self.dynamic_sampling_high}")
