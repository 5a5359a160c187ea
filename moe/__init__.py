"""titanserve.moe."""
