"""The OpenAI API's request bodies and error object, as far as the gateway's generation models honour them.

Every parameter OpenAI defines is either honoured or refused with a 400 naming it (``param``): a
parameter the models cannot honour (``n > 1``, ``logprobs``, tools, penalties, JSON mode) is never
silently ignored. Errors on the OpenAI paths use OpenAI's object, ``{"error": {"message", "type",
"param", "code"}}``, so the ``openai`` SDK raises its own exception classes with ``.param`` set.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.gateway.errors import BadInput

OPENAI_PATHS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions"})
MAX_STOPS = 4  # OpenAI's limit on stop strings
SEED_RANGE = 2**63  # OpenAI's seed is any int64; the models' samplers take 0 .. 2**63 - 1


def speaks_openai(path: str) -> bool:
    """True for the paths whose errors use OpenAI's error object (``/v1/models/{id}`` included, but not the task
    verbs ``/v1/models/{m}:predict`` and the like, which answer the gateway's own errors)."""
    return path in OPENAI_PATHS or (path.startswith("/v1/models/") and ":" not in path[len("/v1/models/"):])


class BadParam(BadInput):
    """A request parameter the gateway refuses: ``param`` names it in OpenAI's error object."""

    def __init__(self, param: str | None, message: str, status: int = 400, code: str | None = None):
        super().__init__(message, status)
        self.param, self.code = param, code


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object for a gateway answer of ``status``."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        code = code or "invalid_api_key"
    elif status == 429:
        kind, code = "requests", code or "rate_limit_exceeded"
    elif status == 404 and param == "model":
        code = code or "model_not_found"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) of pydantic's errors on an OpenAI body: the first one's field is the ``param``."""
    def where(error: dict) -> str:
        return ".".join(str(p) for p in error["loc"] if p != "body")

    first = errors[0]
    param = where(first) or None
    if first["type"] == "extra_forbidden":
        return f"'{param}' is not a parameter this gateway supports: remove it", param
    problems = "; ".join(f"{where(e) or 'body'}: {e['msg']}" for e in errors)
    return f"invalid request: {problems}", param


Stop = Annotated[str, Field(min_length=1, max_length=64)]

# parameter -> (the values that mean "not asked for", what to do instead); any other value is refused
NOT_BUILT: dict[str, tuple[tuple, str]] = {
    "n": ((None, 1), "only n=1 is supported: send one request per completion"),
    "best_of": ((None, 1), "best_of is not supported: send one request per completion"),
    "logprobs": ((None, False), "log probabilities are not returned by this gateway: remove logprobs"),
    "top_logprobs": ((None, 0), "log probabilities are not returned by this gateway: remove top_logprobs"),
    "echo": ((None, False), "echo is not supported: prepend the prompt yourself"),
    "suffix": ((None, ""), "suffix (insertion) is not supported by these models: remove it"),
    "presence_penalty": ((None, 0), "presence_penalty is not supported: remove it or send 0"),
    "frequency_penalty": ((None, 0), "frequency_penalty is not supported: remove it or send 0"),
    "logit_bias": ((None, {}), "logit_bias is not supported: remove it"),
    "tools": ((None, []), "tools (function calling) are not supported by these models: remove tools"),
    "tool_choice": ((None, "none"), "tools (function calling) are not supported by these models: remove tool_choice"),
    "parallel_tool_calls": ((None,), "tools (function calling) are not supported: remove parallel_tool_calls"),
    "functions": ((None, []), "functions (function calling) are not supported by these models: remove them"),
    "function_call": ((None, "none"), "function calling is not supported by these models: remove function_call"),
    "response_format": ((None, {"type": "text"}), "only response_format {\"type\": \"text\"} is supported"),
    "modalities": ((None, ["text"]), "only text output is supported: remove modalities"),
    "store": ((None, False), "completions are not stored by this gateway: remove store"),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="send a last chunk with the token counts")


class Sampling(BaseModel):
    """The parameters both endpoints share."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(min_length=1, description="a model id from GET /v1/models")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float | None = Field(None, ge=0, le=2, description="0 picks the most likely token; default 1")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling; default 1 (off)")
    seed: int | None = Field(None, ge=-SEED_RANGE, lt=SEED_RANGE, description="reproducible sampling")
    stop: list[Stop] | None = Field(None, max_length=MAX_STOPS,
                                    description=f"a string, or up to {MAX_STOPS} strings, that end the text")
    stream: bool | None = Field(False, description="answer as Server-Sent Events, ending with data: [DONE]")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="your end user's id (accepted; not used)")
    # OpenAI parameters these models do not honour: accepted only with a value that asks for nothing
    n: Any = None
    best_of: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    suffix: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    store: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop):
        return [stop] if isinstance(stop, str) else stop  # one string, or a list: errors name "stop" alone

    def refuse_unsupported(self) -> None:
        """BadParam(400) for the first parameter set to something these models cannot do."""
        for param, (neutral, fix) in NOT_BUILT.items():
            value = getattr(self, param, None)
            # 0.0 asks for nothing as 0 does; a bool is not the number it equals (logprobs=0 is not False)
            if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral):
                raise BadParam(param, f"{param}={value!r}: {fix}")
        if self.stream_options is not None and not self.stream:
            raise BadParam("stream_options", "stream_options is only allowed when stream is true")


class CompletionRequest(Sampling):
    """``POST /v1/completions``."""

    prompt: str = Field(description="the text to continue (a string, or a list of one string)")

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list):
            if prompt and not all(isinstance(p, str) for p in prompt):
                raise ValueError("token-id prompts are not accepted: send the prompt as text")
            if len(prompt) != 1:
                raise ValueError(f"a list of {len(prompt)} prompts: send one prompt (a string) per request")
            return prompt[0]
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="only text parts: these models read text alone")
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: list[TextPart] = Field(description="the message's text, or its text parts")
    name: str | None = Field(None, description="the participant's name (accepted; the template omits it)")

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, content):
        return [{"type": "text", "text": content}] if isinstance(content, str) else content

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
