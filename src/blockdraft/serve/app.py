"""The OpenAI-compatible HTTP API over one Decoder (FastAPI): /v1/models, /v1/chat/completions,
/v1/completions, with server-sent-event streaming.

One model, one request at a time: a lock around every use of the model (decoding, and the
first-use loading of its parts), so concurrent requests wait their turn. A request's text is
what `blockdraft generate` gives for the same prompt and settings (chat: the chat template with
the messages; completions: the prompt as is, like `generate --raw`). Every bad request gets a
4xx with OpenAI's error body; an unexpected failure is a 500 with the same shape, and the
server goes on.
"""
from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import BlockdraftError
from ..prompting import encode_messages
from ..sampling import Sampling
from ..types import DecodeResult
from .schema import ApiError, ChatRequest, CompletionRequest

FINISH = {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length", "context": "length"}


@dataclass
class Job:
    """One validated request: the prompt ids and the decoding settings."""

    ids: list[int]
    method: str
    max_new_tokens: int
    stop: tuple[str, ...]
    sampling: Sampling


class _Cancelled(Exception):
    """Raised inside a streamed decode whose client has gone, to free the model."""


class Service:
    """The decoder behind the API, used by one request at a time."""

    def __init__(self, decoder, model_id: str, method: str = "fast", max_new_tokens: int = 128,
                 sampling: Sampling = Sampling()):
        self.decoder, self.model_id, self.method, self.max_new_tokens = decoder, model_id, method, max_new_tokens
        self.sampling = sampling  # for requests that leave temperature, top_k, top_p or seed out
        self.lock = threading.Lock()
        self.created = int(time.time())

    def check_ready(self) -> None:
        """Load what the default method needs now (heads, n-gram, cost curve), so a bad setup fails at start."""
        with self.lock:
            self.decoder.parts(self.decoder.spec(self.method))

    def job(self, request, ids: list[int]) -> Job:
        """Validate a request against this model and method (400 with the reason)."""
        if request.model != self.model_id:
            raise ApiError(404, f"model {request.model!r} is not served here; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")
        request.refuse_unsupported()
        sampling = request.sampling(self.sampling)
        limit = self.decoder.target.max_positions
        if len(ids) >= limit:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but the model's context holds {limit}",
                           param="messages" if isinstance(request, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        method = request.method or self.method
        try:
            with self.lock:  # first use of a method may load its parts (or measure the cost curve) on the model
                self.decoder.parts(self.decoder.spec(method))
        except BlockdraftError as exc:
            raise ApiError(400, str(exc), param="method") from None
        return Job(ids, method, request.budget() or self.max_new_tokens, request.stops(), sampling)

    def run(self, job: Job, on_text: Callable[[str], None] | None = None) -> DecodeResult:
        with self.lock:
            try:
                return self.decoder.generate(ids=job.ids, method=job.method, max_new_tokens=job.max_new_tokens,
                                             stop=job.stop, on_text=on_text, **asdict(job.sampling))
            except BlockdraftError as exc:
                raise ApiError(400, str(exc)) from None


def _usage(job: Job, result: DecodeResult) -> dict:
    return {"prompt_tokens": len(job.ids), "completion_tokens": len(result.ids),
            "total_tokens": len(job.ids) + len(result.ids)}


def _stats(job: Job, result: DecodeResult) -> dict:
    """blockdraft's own figures, beside OpenAI's fields (clients ignore unknown keys)."""
    return {"method": job.method, "steps": result.steps, "block_efficiency": round(result.block_efficiency, 4),
            "stop_reason": result.stop_reason, "seed": result.seed}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _stream(service: Service, job: Job, chunk: Callable[[dict], dict], first: dict | None,
            delta: Callable[[str], dict], last: Callable[[str], dict], include_usage: bool) -> StreamingResponse:
    """Server-sent events: the decode runs in a worker thread and hands text deltas over a queue;
    the deltas add up to the non-streamed text. A client that goes away cancels the decode."""
    events: queue.Queue = queue.Queue()
    gone = threading.Event()

    def on_text(text: str) -> None:
        if gone.is_set():
            raise _Cancelled
        events.put(("text", text))

    def work() -> None:
        try:
            events.put(("done", service.run(job, on_text)))
        except _Cancelled:
            pass
        except ApiError as exc:
            events.put(("error", exc))
        except Exception as exc:  # noqa: BLE001 - reported to the client; the server goes on
            events.put(("error", ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")))

    def body() -> Iterator[str]:
        try:
            if first is not None:
                yield _sse(chunk(first))
            while True:
                kind, value = events.get()
                if kind == "text":
                    yield _sse(chunk(delta(value)))
                    continue
                if kind == "done":
                    yield _sse(chunk(last(FINISH.get(value.stop_reason, "stop"))))
                    if include_usage:
                        yield _sse({**chunk({}), "choices": [], "usage": _usage(job, value)})
                else:
                    yield _sse(value.body())
                yield _sse("[DONE]")
                return
        finally:
            gone.set()

    threading.Thread(target=work, name="blockdraft-decode", daemon=True).start()
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(service: Service) -> FastAPI:
    """The FastAPI application serving `service`."""
    app = FastAPI(title="blockdraft", summary="OpenAI-compatible lossless block-draft decoding")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(ApiError(400, f"{where}: {first['msg']}" if where else str(first["msg"]),
                                     param=where or None).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(error.body(), status_code=500)

    def model_card() -> dict:
        return {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "blockdraft"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str) -> dict:
        if model_id != service.model_id:
            raise ApiError(404, f"model {model_id!r} is not served here", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest):
        tokenizer = service.decoder.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
        if request.messages[-1].role != "user" or not request.messages[-1].text().strip():
            raise ApiError(400, "the last message must be a non-empty user message", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in request.messages]
        job = service.job(request, encode_messages(tokenizer, messages))
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choice: dict) -> dict:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": service.model_id,
                    "choices": [{"index": 0, **choice}] if choice else []}

        if request.stream:
            return _stream(service, job, chunk, {"delta": {"role": "assistant", "content": ""}, "finish_reason": None},
                           lambda text: {"delta": {"content": text}, "finish_reason": None},
                           lambda reason: {"delta": {}, "finish_reason": reason}, request.include_usage())
        result = service.run(job)
        return {"id": ident, "object": "chat.completion", "created": created, "model": service.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": FINISH.get(result.stop_reason, "stop"), "logprobs": None}],
                "usage": _usage(job, result), "blockdraft": _stats(job, result)}

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        prompt = request.text()
        if not prompt.strip():
            raise ApiError(400, "empty prompt: give some text to continue", param="prompt")
        job = service.job(request, service.decoder.encode(prompt, raw=True))
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choice: dict) -> dict:
            return {"id": ident, "object": "text_completion", "created": created, "model": service.model_id,
                    "choices": [{"index": 0, "logprobs": None, **choice}] if choice else []}

        if request.stream:
            return _stream(service, job, chunk, None, lambda text: {"text": text, "finish_reason": None},
                           lambda reason: {"text": "", "finish_reason": reason}, request.include_usage())
        result = service.run(job)
        return {"id": ident, "object": "text_completion", "created": created, "model": service.model_id,
                "choices": [{"index": 0, "text": result.text, "logprobs": None,
                             "finish_reason": FINISH.get(result.stop_reason, "stop")}],
                "usage": _usage(job, result), "blockdraft": _stats(job, result)}

    return app
