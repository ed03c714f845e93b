"""The wire format: OpenAI-style request bodies (pydantic) and errors.

Request models accept the fields the `openai` client sends and ignore the ones this server does not use
(`extra="ignore"`, as vLLM does), except three whose requested values it cannot honour: ``n > 1``, ``logprobs``
(true or a count) and ``best_of > 1`` are refused with a 400 rather than silently dropped. Other fields are
ignored, including some that would change the answer elsewhere (``presence_penalty``, ``frequency_penalty``,
``logit_bias``, ``response_format``, ``tools``): docs/SERVING.md lists what is read. hyperlora's own fields
(``policy``, ``options``, ``family``, ``ignore_eos``, ``return_token_ids``) travel in the body; with the `openai`
client pass them in ``extra_body``.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status
of `APIError.status`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["APIError", "error_body", "ChatMessage", "ChatCompletionRequest", "CompletionRequest", "PolicyCreate",
           "StreamOptions"]


class APIError(Exception):
    """An error the client caused or must react to, sent as an OpenAI-style body with `status`.

    type: ``invalid_request_error`` (400, a body over the size limit included; 404), ``authentication_error``
    (401), ``rate_limit_error`` (429), ``server_error`` (500/503). headers: extra response headers
    (``Retry-After`` on 429/503)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text: a string, or the ``text`` parts of a content list (other parts are refused)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise APIError(400, f"message content part of type {p.get('type')!r} is not supported: this server "
                                    "reads text parts only", param="messages")
            parts.append(p["text"])
        return "".join(parts)


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None
    best_of: int | None = None
    user: str | None = None
    # hyperlora's own fields
    policy: str | None = Field(default=None, description="a policy text, a registered policy id, or an adapter id")
    options: list[str] | None = Field(default=None, description="answer options: returns decide()'s "
                                                                "decision instead of generating")
    family: str | None = Field(default=None, description="with options: the task family whose calibration applies")
    ignore_eos: bool = Field(default=False, description="generate max_tokens tokens, not stopping at EOS (vLLM's "
                                                          "field of the same name)")
    return_token_ids: bool = Field(default=False, description="add the generated token ids to each choice "
                                                              "(`token_ids`), as vLLM does")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v is not None and v is not False and v != 0:  # true (== 1) asks for them too
            raise ValueError("logprobs are not returned by this server")
        return v

    @field_validator("best_of")
    @classmethod
    def _one_best_of(cls, v: Any) -> Any:
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return v

    @field_validator("options")
    @classmethod
    def _options(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not 2 <= len(v) <= 32 or any(not o.strip() for o in v) or len(set(v)) != len(v):
            raise ValueError("options must be 2 to 32 distinct non-empty strings")
        return v

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], str) and len(v) != 1:
            raise ValueError("one prompt per request (a list of several prompts is not supported)")
        if isinstance(v, list) and not v:
            raise ValueError("prompt is empty")
        return v


class PolicyCreate(_Body):
    text: str = Field(min_length=1)
