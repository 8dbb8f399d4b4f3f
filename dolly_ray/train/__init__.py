"""Training: the Ray Train recipe, its settings, how a run is settled (preset, CPUs, memory plan), data preparation, batching, labels, the DeepSpeed engine and presets, checkpoints and LoRA."""
