"""The information-surplus meter: per-step accumulation, its n-gram base, the surplus report and the probe."""
