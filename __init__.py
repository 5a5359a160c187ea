"""titanserve: an LLM inference serving engine for Mixture-of-Experts models and long contexts.

The offline API is importable from the top level; it is loaded lazily so that light clients
(`titanserve.ipc`) do not pay for importing torch.
"""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput"]


def __getattr__(name: str):
    if name == "LLM":
        from titanserve.core.llm import LLM

        return LLM
    if name == "SamplingParams":
        from titanserve.core.sampling_params import SamplingParams

        return SamplingParams
    if name == "RequestOutput":
        from titanserve.core.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(f"module 'titanserve' has no attribute {name!r}")
