"""What one `eardrum serve` serves and the limits it enforces: `ServerSettings`, whose defaults the
command line reads. Imports nothing heavy, so `eardrum serve` checks its arguments before torch loads."""

from __future__ import annotations

from dataclasses import dataclass

BATCHING = ("continuous", "static")  # how requests share the model (eardrum.inference.batch_engine)


@dataclass(frozen=True)
class ServerSettings:
    """What one server serves and the limits it enforces."""

    model_name: str  # the id clients must send as `model`
    max_batch: int = 8  # rows decoded together at most
    batch_wait_ms: float = 5.0  # how long the oldest request waits for others to share its batch
    batching: str = "continuous"  # "continuous": requests join and leave a running batch; "static": they wait for it
    max_new_tokens: int = 512  # larger max_tokens are capped to this
    max_request_bytes: int = 25_000_000  # larger bodies get 413
    max_audio_seconds: float = 600.0  # per request, all clips together
    max_prompt_tokens: int | None = None  # longer prompts (audio tokens included) get 400; None: the LLM's context
    api_key: str | None = None  # set: every /v1 request needs `Authorization: Bearer <api_key>` (else 401)
    cors_origins: tuple[str, ...] = ()  # web origins allowed to call the API from a browser; none: no CORS headers
    library: str | None = None  # a library file (eardrum index): requests with "library": true are answered from it
    max_connections: int = 256  # open connections; one more is answered 503 server_busy and closed at once
    header_timeout_s: float = 10.0  # a connection without a whole request head this long after it opens: closed
    body_timeout_s: float = 120.0  # a request body not all received this long after its head: 408 request_timeout
    web: bool = False  # also serve the chat page at / (eardrum.inference.web)

    def validate(self) -> None:
        """Raise one ValueError listing every setting out of range."""
        problems = [
            f"{name}: expected a positive number, got {getattr(self, name)!r}"
            for name in ("max_batch", "max_new_tokens", "max_request_bytes", "max_audio_seconds", "max_connections",
                         "header_timeout_s", "body_timeout_s")
            if not getattr(self, name) > 0
        ]
        if self.max_prompt_tokens is not None and not self.max_prompt_tokens > 0:
            problems.append(f"max_prompt_tokens: expected a positive number or none, got {self.max_prompt_tokens!r}")
        if self.batching not in BATCHING:
            problems.append(f"batching: expected one of {', '.join(BATCHING)}, got {self.batching!r}")
        if not self.batch_wait_ms >= 0:
            problems.append(f"batch_wait_ms: expected a number >= 0, got {self.batch_wait_ms!r}")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("api_key (--api-key): expected a non-empty key, or none for a server without one")
        problems += [
            f"cors_origins (--cors-origin): expected an origin such as https://example.com, got {origin!r}"
            for origin in self.cors_origins
            if not _is_origin(origin)
        ]
        if not self.model_name:
            problems.append("model_name: expected a non-empty name")
        if problems:
            raise ValueError("invalid server settings: " + "; ".join(problems))


def _is_origin(text: str) -> bool:
    """"*" or a browser origin: scheme and host (and port), no path, e.g. https://app.example.com:8443."""
    scheme, _, host = text.partition("://")
    return text == "*" or (scheme in ("http", "https") and bool(host) and "/" not in host)
