"""Attacks: triggers as pure functions of a batch, and poisoning."""
