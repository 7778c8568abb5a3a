"""A ``/v1/completions`` server backed by a real (tiny) transformers model, for the user-model
contract: the same model answers in-process and over the wire, so every engine can be held to
the same turn.

It answers like the servers the client meets: ``vllm`` (>= 0.26: ``logprob_token_ids``, raw
logprobs, ``n``, per-request ``seed``), ``llama`` (llama-server: ignores ``logprob_token_ids``,
raw top logprobs, no echo) or ``old`` (refuses ``logprob_token_ids``, ignores positive bias,
has ``echo``). A request
with ``seed`` s and ``n`` samples is drawn exactly as the in-process sampler draws a round:
``generation.sample`` with seed ``s`` and ``n`` rows. ``logit_bias`` is a logits
processor, so reported logprobs stay raw. Nothing here is scripted: every number comes from
the model.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import torch
from transformers import LogitsProcessor

from usersim_ui.inference.generation import sample


class Bias(LogitsProcessor):
    """OpenAI ``logit_bias``: added to the logits at every position."""

    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.ids.numel() == 0:
            return scores
        scores = scores.clone()
        scores[:, self.ids] += self.values.to(scores.dtype)
        return scores


class ModelServer:
    """An httpx transport handler: ``httpx.MockTransport(ModelServer(model, kind))``."""

    def __init__(self, model: Any, kind: str = "vllm"):
        self.model, self.kind = model, kind
        self.calls: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []  # each request's headers, in order
        self._lock = threading.Lock()  # one forward at a time, as one GPU would

    def _raw_logprobs(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        with self._lock:
            self.calls.append(body)
            self.headers.append(dict(request.headers))
            return self._answer(body)

    def _answer(self, body: dict[str, Any]) -> httpx.Response:
        prompt: list[int] = list(body["prompt"])
        if "logprob_token_ids" in body and self.kind == "old":
            return httpx.Response(400, json={"error": {"message": "extra_forbidden: logprob_token_ids"}})
        if body.get("echo"):
            if self.kind != "old":
                return httpx.Response(400, json={"error": {"message": "echo is not supported"}})
            logprobs = self._raw_logprobs(prompt)
            values = [None] + [float(logprobs[i - 1, prompt[i]]) for i in range(1, len(prompt))]
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "token_ids": [0],
                                                          "logprobs": {"token_logprobs": values + [-0.1]}}]})
        first = self._raw_logprobs(prompt)[-1]
        if "logprob_token_ids" in body and self.kind == "vllm":
            top = {f"token_id:{t}": float(first[t]) for t in body["logprob_token_ids"]}
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "token_ids": [int(first.argmax())],
                                                          "logprobs": {"top_logprobs": [top]}}]})
        bias = {int(k): float(v) for k, v in (body.get("logit_bias") or {}).items()}
        if self.kind == "old":  # an old server honours bans but caps positive bias: no forced sample there
            bias = {t: v for t, v in bias.items() if v < 0}
        temperature = float(body.get("temperature", 1.0))
        n = int(body.get("n", 1))
        drawn = sample(self.model, prompt, stop_ids=body.get("stop_token_ids") or [128009],
                       temperature=temperature, top_p=float(body.get("top_p", 1.0)),
                       max_new_tokens=int(body["max_tokens"]), seed=int(body.get("seed", 0)),
                       processors=[Bias(bias)] if bias else [], num_samples=n if temperature > 0 else 1)
        rows = drawn.new_ids * (n if temperature <= 0 else 1)
        cut = drawn.truncated * (n if temperature <= 0 else 1)
        k = int(body.get("logprobs") or 0)
        top = {f"token_id:{int(t)}": float(first[t]) for t in first.topk(max(k, 1)).indices} if k else {}
        choices = []
        for index, (ids, was_cut) in enumerate(zip(rows, cut)):
            lp = [float(first[ids[0]])] if ids else []
            choices.append({"index": index, "text": "t", "token_ids": ids, "finish_reason": "length" if was_cut else "stop",
                            "logprobs": {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": lp + [None] * (len(ids) - 1),
                                         "top_logprobs": [top] + [{}] * max(0, len(ids) - 1)}})
        return httpx.Response(200, json={"choices": choices})
