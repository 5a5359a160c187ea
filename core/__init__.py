"""titanserve.core."""
