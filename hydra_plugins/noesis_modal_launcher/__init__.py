"""Hydra launcher `hydra/launcher=modal`: each multirun job in its own Modal call (see noesis_accel.config.sweeps)."""
