"""Where a run computes: the device and precision policy, memory readings, the estimate and the pre-flight check."""
