"""Classifiers as pure Flax Linen modules that expose their layers and take channel masks."""

from linfjax.models.layers import *  # noqa: F401,F403  (split into modules in the next step)
