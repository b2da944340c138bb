"""Targets: the model being accelerated (see base.py for the interface)."""

from harness.targets.base import Target, TargetOutput
from harness.targets.loading import PRESETS, build_target, load_target

__all__ = ["PRESETS", "Target", "TargetOutput", "build_target", "load_target"]
