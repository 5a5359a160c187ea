"""titanserve.ipc."""
