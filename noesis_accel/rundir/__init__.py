"""The run on disk: its layout, checkpoints, the lease, the run's history and status, and commits to
the storage (a Modal Volume). Imports config and core only.
"""
