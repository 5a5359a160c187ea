"""Offline API: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm

from titanserve.core.engine import Engine
from titanserve.core.engine_config import EngineConfig
from titanserve.core.errors import InvalidRequest
from titanserve.core.outputs import RequestOutput, StepDelta
from titanserve.core.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """A whole engine in one object. Keywords carry the CLI flags' names
    (`--max-num-seqs` -> `max_num_seqs`, `--num-workers` -> `num_workers`, ...)."""

    def __init__(self, model: str, **kwargs) -> None:
        self.engine = Engine(EngineConfig.from_kwargs(str(model), **kwargs))
        self.tokenizer = self.engine.tokenizer

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order."""
        prompts = _as_list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequest(f"{len(prompts)} prompts but {len(params)} sampling params")
        token_ids = [self.engine.tokenize(p) for p in prompts]
        for ids, p in zip(token_ids, params):  # validate all before queueing any
            self.engine.validate(ids, p)
        outputs = []
        for ids, p in zip(token_ids, params):
            rid = self.engine.add_request(ids, p, stream=False)
            outputs.append(self.engine.get_output(rid))
        self._run(len(outputs), use_tqdm)
        return outputs

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | None = None,
    ) -> Iterator[StepDelta]:
        """Run prompts together and yield every request's deltas as they are produced.
        Request ids are "req-<n>"; `StepDelta.request_id` tells them apart."""
        prompts = _as_list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        token_ids = [self.engine.tokenize(p) for p in prompts]
        for ids in token_ids:
            self.engine.validate(ids, params)
        rids = [self.engine.add_request(ids, params) for ids in token_ids]
        pending = set(rids)
        try:
            while pending:
                for delta in self.engine.step():
                    if delta.request_id in pending:
                        if delta.finished:
                            pending.discard(delta.request_id)
                        yield delta
        finally:
            self._abort_quietly(pending)

    def chat(
        self,
        conversations: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate replies to conversations rendered with the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        if self.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer")
        prompts = [
            self.tokenizer.encode(self.tokenizer.apply_chat_template(c), add_special_tokens=False)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def prompt_logits(self, token_id_lists: Sequence[list[int]]) -> list[torch.Tensor]:
        """(T, V) fp32 logits at every prompt position, computed through the engine path
        (paged cache, chunked prefill, the worker layout in use)."""
        params = SamplingParams(max_tokens=1, temperature=0.0, return_prompt_logits=True)
        outs = self.generate([list(t) for t in token_id_lists], params)
        return [o.prompt_logits for o in outs]

    def _run(self, total: int, use_tqdm: bool) -> None:
        bar = tqdm(total=total, desc="generating", unit="req", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    if delta.finished:
                        bar.update(1)
        except BaseException:
            self._abort_quietly(list(self.engine.trackers))
            raise
        finally:
            bar.close()

    def _abort_quietly(self, request_ids) -> None:
        """Abort requests left when a run stops on an exception (which then propagates) or a
        stream is closed early: an abort that fails (a Ctrl-C can land mid-step) must not
        replace the exception that stopped it."""
        for rid in list(request_ids):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - the exception being raised says why we stopped
                pass

    def expert_loads(self) -> dict[int, list[int]]:
        """Tokens routed to each expert so far, by MoE layer: what `record_expert_loads`
        writes at shutdown, for `expert_loads` (see titanserve.moe.expert_loads)."""
        return self.engine.expert_loads()

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _as_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return prompts
