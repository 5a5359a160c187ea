"""titanserve.launcher."""
