"""Launchers for `python -m linfjax.main`: local processes, SLURM arrays, Cloud TPU VMs.

Each is a script (`python launch/local.py --help`); see launch/README.md.
"""
