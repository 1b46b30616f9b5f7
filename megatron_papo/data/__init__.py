"""Data layer: datasets (PAPO/ViRL39K files, the synthetic shapes task), tokenizer, processor, rewards.

  prompts    prompt templates (the PAPO reference's format prompt) and the Qwen-VL chat template
  dataset    PapoDataset (parquet/jsonl rows, bad-row stats), ResumableIterator, DataConfig
  synthetic  SyntheticShapes: deterministic, vision-dependent questions with SFT targets
  tokenizer  the tiny Qwen-style tokenizer (ids match the `tiny` flavor), special-token ids
  processor  VLProcessor: text + images -> input_ids, pixel_values, image_grid_thw, masked pixel_values
  rewards    papo (0.9 accuracy + 0.1 format) and exact_match, by name via get_reward_fn

Modules are imported directly (`from megatron_papo.data.rewards import ...`); this file stays empty
so the rewards' helper process imports nothing heavy.
"""
