"""Training loops on a DeepSpeed engine: schedules, DeepSpeed config, checkpoints."""
