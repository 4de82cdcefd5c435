"""The OpenAI API's request bodies and errors, as the server reads and writes them.

Requests are pydantic models that forbid unknown fields, as OpenAI's API does ("Unrecognized
request argument supplied: ..."). Fields OpenAI has and lmlab does not implement (penalties,
logprobs, logit_bias, ...) are accepted at their neutral values only and refused otherwise,
so a client never silently gets something other than what it asked for. Errors have OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, with its status codes.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An error answered to the client: HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0, description="an extension (vLLM has it too); 0 = off")
    ignore_eos: bool = Field(False, description="an extension (as vLLM's): generate through eos and the chat "
                             "template's end of turn until max_tokens or a request's stop string (fixed-length "
                             "benchmarks)")
    n: int = Field(1, ge=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional["StreamOptions"] = None
    user: Optional[str] = None
    # OpenAI fields accepted at their neutral value only (see `unsupported`)
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    logprobs: Optional[Union[bool, int]] = None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> Optional[str]:
        """The first field set to something lmlab does not implement, or None."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name
        if self.logit_bias:
            return "logit_bias"
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: ignored
    role: str
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> Optional[str]:
        """The message's text; None when it holds a part that is not text (an image, ...)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(p.type != "text" for p in self.content):
            return None
        return "".join(p.text or "" for p in self.content)


class ChatRequest(_Request):
    messages: list[Message]
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list[Any]] = None
    response_format: Optional[dict] = None

    def unsupported(self) -> Optional[str]:
        if self.tools:
            return "tools"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format"
        return super().unsupported()


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for /v1/completions
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def unsupported(self) -> Optional[str]:
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1, self.n):
            return "best_of"
        return super().unsupported()


_Request.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's request validation errors -> one OpenAI-shaped 400 naming the first problem."""
    e = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    kind = e.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))}); "
                             f"send a JSON object", param=None, code="invalid_json")
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        return APIError(400, "the request body must be a JSON object (send it with Content-Type: application/json)",
                        code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {loc[-1] if loc else '?'}", param=param)
    if kind == "missing":
        return APIError(400, f"missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    return APIError(400, f"invalid value for '{param}': {e.get('msg')}", param=param, code="invalid_value")
