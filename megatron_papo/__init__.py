"""megatron_papo: PAPO for Qwen2.5-VL on megatron-core."""
__version__ = "0.1.0"
