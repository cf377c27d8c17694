"""The lowest wing: errors and exit codes, stop signals, the process protocol, rank-0-decides helpers,
command-line parsing and the process environment. It imports nothing of ours.
"""
