"""titanserve.longctx."""
