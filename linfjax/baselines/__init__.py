"""Baseline defenses beside linf pruning: ANP, CLP and Neural Cleanse unlearning.

Each is a pure library module the prune stage calls with the backdoored model, its
variables and the defender's clean set S (CLP needs no data at all); none sees the test
split. ANP and CLP act on batch-norm neurons (`bn.py`), which in pre-activation blocks
are no layer's output, so their masks are dicts {batch-norm layer: [K]} applied to the
variables, and they return new variables; unlearning returns fine-tuned variables.
"""
