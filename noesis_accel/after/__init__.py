"""What reads a finished run: the run's model rebuilt, export, evaluation and judges, report and
plots. Imports training, rundir, config and core only.
"""
