"""One attempt of a run in memory: the session on its run dir, the trainer, data, model, sampler,
loss, optimizer, metrics and trackers. Imports rundir, config and core only.
"""
