"""OpenAI-compatible request bodies (pydantic), and the refusals of what blockdraft cannot honour.

temperature, top_p, seed (and top_k, as vLLM accepts it) choose the sampling; absent ones take the
server's defaults (greedy unless `serve --temperature` says otherwise). Fields that do not change
the answer (user, stream_options...) are accepted; fields whose non-default values would (n > 1,
penalties, logit_bias, logprobs) are refused with a 400 naming the field, rather than ignored.
"""
from __future__ import annotations

from dataclasses import astuple
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import BlockdraftError
from ..prompting import stop_strings
from ..sampling import Sampling, parse_sampling


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, type, and the offending parameter."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Request(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    n: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    method: str | None = None  # blockdraft's own: the decoding method (default: the server's)

    def stops(self) -> tuple[str, ...]:
        try:
            return stop_strings(self.stop if self.stop is not None else ())
        except BlockdraftError as exc:
            raise ApiError(400, str(exc), param="stop") from None

    def sampling(self, default: Sampling) -> Sampling:
        """The request's sampling settings; what it leaves out comes from the server's `default`."""
        values = {name: getattr(self, name) for name in ("temperature", "top_k", "top_p", "seed")}
        try:
            return parse_sampling(*(default_value if values[name] is None else values[name]
                                    for name, default_value in zip(values, astuple(default))))
        except BlockdraftError as exc:
            raise ApiError(400, str(exc), param=str(exc).split()[0].replace("-", "_")) from None

    def refuse_unsupported(self) -> None:
        """400 for settings blockdraft would silently not honour."""
        if (self.n or 1) > 1:
            raise ApiError(400, "n > 1 is not supported: one choice per request", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported (it would change the model's distribution)", param=name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported (it would change the model's distribution)", param="logit_bias")

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    def budget(self) -> int | None:
        return self.max_tokens

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, "one prompt per request", param="prompt")
        return self.prompt[0]

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("logprobs", "suffix"):
            if getattr(self, name) is not None:
                raise ApiError(400, f"{name} is not supported", param=name)
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if (self.best_of or 1) > 1:
            raise ApiError(400, "best_of > 1 is not supported", param="best_of")
