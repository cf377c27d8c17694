"""The `noesis train` command and `run()`, and this machine's training processes (the launcher and
its workers). Imports every wing below it, never cloud.
"""
