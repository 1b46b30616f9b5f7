from megatron_papo.ops.vocab_parallel import (
                                              VocabParallelStats,
                                              vocab_parallel_entropy,
                                              vocab_parallel_kl,
                                              vocab_parallel_logprob,
                                              vocab_parallel_stats,
)

__all__ = ["VocabParallelStats", "vocab_parallel_entropy", "vocab_parallel_kl", "vocab_parallel_logprob",
           "vocab_parallel_stats"]
