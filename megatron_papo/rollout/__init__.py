"""Rollouts: the engine interface (engine.py), the one vLLM adapter (vllm_engine.py), Megatron ->
engine weight streaming (weight_sync.py) and train-TP -> rollout-TP reshard math (reshard.py).
Import the submodules directly; nothing here imports vLLM."""
