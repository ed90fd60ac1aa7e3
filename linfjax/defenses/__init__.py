"""Backdoor defenses: pruning as a mask transform and the baselines."""
