"""Groups of runs on one cached base: cross-validation and sweeps."""
