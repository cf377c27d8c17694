"""noesis_accel: a fault-tolerant LLM fine-tuning launcher (Hydra configs, one Accelerate loop, Modal)."""
