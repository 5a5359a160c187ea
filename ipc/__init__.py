"""titanserve.ipc: wire messages, tensor frames, collectives, and the client library
(`Client`, `AsyncClient`: imported on first use, and without torch)."""

__all__ = ["AsyncClient", "Client", "Completion"]


def __getattr__(name: str):
    if name in __all__:
        from titanserve.ipc import client

        return getattr(client, name)
    raise AttributeError(f"module 'titanserve.ipc' has no attribute {name!r}")
