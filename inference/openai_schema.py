"""The OpenAI chat-completions wire format: request validation, response bodies, stream chunks, errors.

Only JSON in and JSON out: nothing here touches the model, audio decoding or the network. A request
is checked completely before it is queued, and every problem is an `APIError` that names the field
(`param`) in OpenAI's error shape, so a client never sees a 500 for its own input.

Audio reaches the model only as base64 `input_audio` data; parts that name a path, a URL or a file
are refused, so the server never opens a file a client chose.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

# the `format` an input_audio part may name; the bytes are decoded by their content (webm, m4a and the other
# containers browsers and phones record need PyAV: `pip install 'eardrum[web]'`)
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "webm", "m4a", "mp4", "opus", "aac")
ROLES = ("system", "developer", "user", "assistant")
MAX_STOP_SEQUENCES = 4
MAX_SEED = 2**63 - 1

# Options that would change the answer in ways this server cannot honour are refused, not ignored;
# each predicate says which values are harmless.
_UNSUPPORTED = {
    "n": lambda v: v in (None, 1),
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "logprobs": lambda v: not v,
    "top_logprobs": lambda v: not v,
    "logit_bias": lambda v: not v,
    "presence_penalty": lambda v: not v,
    "frequency_penalty": lambda v: not v,
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
}


class APIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 `invalid_request_error` about `param`."""
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class SamplingOptions:
    """How one request wants its answer generated (already validated and capped).

    Attributes:
        max_tokens: New tokens at most, after capping by the server's limit.
        temperature: 0 means greedy decoding.
        top_p: Nucleus sampling mass; used only when sampling.
        seed: Seeds this request's own sampler, so its answer does not depend on other requests.
        stop: Strings that end the answer; the answer is cut before the first one found.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class AudioClip:
    """The still-encoded bytes of one `input_audio` part and where it stood in the request."""

    data: bytes
    where: str  # e.g. "messages[0].content[1]", for error messages


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request.

    `messages` are in eardrum's conversation format, except that each audio part holds an
    `AudioClip` under "audio" until the server decodes it.
    """

    model: str
    messages: list[dict[str, Any]]
    options: SamplingOptions
    stream: bool
    include_usage: bool
    library: bool = False  # eardrum's own field: answer from the server's library (`serve --library`)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why it is not one."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}", code="invalid_json") from err
    except RecursionError as err:
        raise bad_request("the request body nests JSON too deeply", code="invalid_json") from err
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    return body


def parse_chat_request(body: dict[str, Any], *, max_new_tokens: int) -> ChatRequest:
    """Validate a chat-completions body; `max_new_tokens` caps the tokens any request may ask for."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request(f"model: expected the model's name as a non-empty string, got {model!r:.60}", "model")
    for name, harmless in _UNSUPPORTED.items():
        if not harmless(body.get(name)):
            raise bad_request(
                f"{name}={body[name]!r:.80} is not supported by this server", name, code="unsupported_parameter"
            )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"stream: expected true or false, got {stream!r:.60}", "stream")
    library = body.get("library")
    if library is not None and not isinstance(library, bool):
        raise bad_request(f"library: expected true (answer from the server's library) or false, got {library!r:.60}",
                          "library")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad_request("stream_options: expected an object such as {'include_usage': true}", "stream_options")
    return ChatRequest(
        model=model,
        messages=_parse_messages(body.get("messages")),
        options=_parse_options(body, max_new_tokens),
        stream=bool(stream),
        include_usage=bool(stream_options.get("include_usage")),
        library=bool(library),
    )


# ------------------------------------------------------------------ messages
def _parse_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages: expected a non-empty list of {'role', 'content'} objects", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where}: expected an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role: expected one of {', '.join(ROLES)}, got {role!r:.60}", f"{where}.role")
        # The LLM's chat template knows "system"; "developer" is OpenAI's newer name for it.
        role = "system" if role == "developer" else role
        out.append({"role": role, "content": _parse_content(message.get("content"), role, f"{where}.content")})
    return out


def _parse_content(content: Any, role: str, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}: expected a string or a list of content parts, got {content!r:.60}", where)
    return [_parse_part(part, role, f"{where}[{k}]") for k, part in enumerate(content)]


def _parse_part(part: Any, role: str, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.text: expected a string", f"{where}.text")
        return {"type": "text", "text": part["text"]}
    if kind == "input_audio":
        if role != "user":
            raise bad_request(f"{where}: input_audio is accepted in user messages only, not in {role}", where)
        return {"type": "audio", "audio": parse_input_audio(part.get("input_audio"), where)}
    if kind in ("audio", "audio_url", "file", "image_url", "input_file"):
        raise bad_request(
            f"{where}: content parts of type {kind!r} are refused: this server takes audio only as base64 data "
            "in {'type': 'input_audio', 'input_audio': {'data': ..., 'format': 'wav'}} and never opens paths, "
            "URLs or files",
            f"{where}.type",
            code="unsupported_content_type",
        )
    raise bad_request(
        f"{where}: expected {{'type': 'text', 'text': ...}} or {{'type': 'input_audio', 'input_audio': ...}}, "
        f"got {part!r:.80}",
        f"{where}.type",
    )


def parse_input_audio(value: Any, where: str) -> AudioClip:
    """An `input_audio` object ({"data": BASE64 or a data URL, "format": one of AUDIO_FORMATS or none}) -> its
    still-encoded bytes; APIError naming `where` for anything else. The bytes are decoded by content later."""
    if not isinstance(value, dict) or not isinstance(value.get("data"), str):
        raise bad_request(f"{where}.input_audio: expected {{'data': BASE64, 'format': ...}}", f"{where}.input_audio")
    fmt = value.get("format")
    if fmt is not None and fmt not in AUDIO_FORMATS:
        raise bad_request(
            f"{where}.input_audio.format: expected one of {', '.join(AUDIO_FORMATS)}, got {fmt!r:.40}",
            f"{where}.input_audio.format",
        )
    data = value["data"]
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]  # a data URL: the base64 follows the comma
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(
            f"{where}.input_audio.data: not valid base64 ({err})", f"{where}.input_audio.data", code="invalid_base64"
        ) from err
    return AudioClip(blob, where)


# ------------------------------------------------------------------ options
def _parse_options(body: dict[str, Any], max_new_tokens: int) -> SamplingOptions:
    asked = [(name, _integer(body, name, 1)) for name in ("max_completion_tokens", "max_tokens")]
    given = [(name, value) for name, value in asked if value is not None]
    if len(given) == 2 and given[0][1] != given[1][1]:
        raise bad_request("give max_completion_tokens or max_tokens, not both with different values", "max_tokens")
    # A request may ask for less than the server's limit, never more: larger values are capped.
    max_tokens = min(given[0][1], max_new_tokens) if given else max_new_tokens
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, default=1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, default=1.0, above_low=True),
        seed=_integer(body, "seed", 0, MAX_SEED),
        stop=_parse_stop(body.get("stop")),
    )


def _integer(body: dict[str, Any], name: str, minimum: int, maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum and value > maximum):
        upper = f" and <= {maximum}" if maximum else ""
        raise bad_request(f"{name}: expected an integer >= {minimum}{upper}, got {value!r:.60}", name)
    return value


def _number(
    body: dict[str, Any], name: str, low: float, high: float, *, default: float, above_low: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and low <= value <= high and not (above_low and value == low)):
        span = f"above {low:g} up to {high:g}" if above_low else f"from {low:g} to {high:g}"
        raise bad_request(f"{name}: expected a number {span}, got {value!r:.60}", name)
    return float(value)


def _parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise bad_request(
            f"stop: expected a non-empty string or a list of 1 to {MAX_STOP_SEQUENCES} non-empty strings, "
            f"got {value!r:.80}",
            "stop",
        )
    return tuple(stops)


# ------------------------------------------------------------------ responses
def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's `usage`; prompt tokens include the audio tokens."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    request_id: str, created: int, model: str, text: str, finish_reason: str, usage: dict[str, int]
) -> dict[str, Any]:
    """A `chat.completion` object with one choice."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
    }


def chunk_body(
    request_id: str,
    created: int,
    model: str,
    delta: dict[str, str] | None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A `chat.completion.chunk`; `delta=None` gives the usage-only chunk with no choices."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event carrying `data` (a JSON object, or a literal such as "[DONE]")."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


def model_body(model: str, created: int) -> dict[str, Any]:
    """One entry of `GET /v1/models`."""
    return {"id": model, "object": "model", "created": created, "owned_by": "eardrum"}
