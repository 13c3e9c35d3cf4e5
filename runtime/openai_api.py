"""OpenAI's API as data, the requests: the error a refused request gets, the fields every
endpoint shares checked and turned into sampling parameters, and the grammar a request asks
its output to follow. runtime/openai_chat.py adds what is particular to chat requests
(tools, thinking) and to the assistant's message; runtime/openai_responses.py builds the
responses; runtime/server.py and its endpoint modules do the HTTP around them.
"""

from __future__ import annotations

from runtime.sampling import SamplingParams

MAX_TOP_LOGPROBS = 20

# Request fields that ask for something this server does not do (a 400 when set).
UNSUPPORTED_WHEN_SET = ("functions", "function_call", "audio", "modalities", "prediction",
                        "suffix")


class RequestError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _ERROR_TYPES.get(status, "invalid_request_error")


_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                500: "server_error", 503: "unavailable_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type_: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


# --- requests ------------------------------------------------------------------------------

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                   "frequency_penalty", "repeat_penalty", "repeat_last_n", "logit_bias", "stop")


def _param_of(message: str) -> str:
    """The field a SamplingParams ValueError names: its first word, up to '[' ."""
    return message.split(" ", 1)[0].split("[", 1)[0]


def int_field(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())
    if not ok or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer between {low} and {high}"
        raise RequestError(400, f"{name} must be {allowed}, got {value!r}", name)
    return int(value)


def bool_field(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"{name} must be true or false, got {value!r}", name)
    return value


def sampling_params(body: dict, n_vocab: int):
    """SamplingParams from a request body; a 400 naming the field when one is wrong."""
    max_tokens = int_field(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = int_field(body, "max_tokens", 1)
    given = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    try:
        params = SamplingParams(max_tokens=max_tokens, **given)
    except ValueError as e:
        raise RequestError(400, str(e), _param_of(str(e))) from None
    outside = sorted(t for t in params.logit_bias if t >= n_vocab)
    if outside:
        raise RequestError(400, f"logit_bias names token {outside[0]}, outside the vocabulary "
                                f"(ids 0..{n_vocab - 1})", "logit_bias")
    return params


def refuse_unsupported(body: dict) -> None:
    """400 for request fields that ask for what this server does not do."""
    int_field(body, "n", 1)  # how many the slots allow: the server checks (choices)
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise RequestError(400, f"best_of must be 1, got {best_of!r}", "best_of")
    for name in UNSUPPORTED_WHEN_SET:
        value = body.get(name)
        if value is None or value == [] or value == "":
            continue
        hint = " (use tools and tool_choice)" if name in ("functions", "function_call") else ""
        raise RequestError(400, f"{name} is not supported by this server{hint}", name)
    if bool_field(body, "echo"):
        raise RequestError(400, "echo is not supported", "echo")


def requested_grammar(body: dict):
    """The grammar a request asks its output to follow, as (field, runtime.constraint.Grammar),
    or None: OpenAI's response_format ({"type": "json_object"}, or "json_schema" with
    json_schema.schema), or llama.cpp's `json_schema` (a schema) and `grammar` (GBNF) fields,
    at most one of them. A malformed one is a 400 naming the field."""
    from runtime.constraint import ConstraintError, Grammar

    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "text" or fmt is None:
        fmt = None
    given = [name for name, value in (("response_format", fmt), ("json_schema", body.get("json_schema")),
                                      ("grammar", body.get("grammar"))) if value is not None]
    if len(given) > 1:
        raise RequestError(400, f"{' and '.join(given)} both constrain the output: give only one",
                           given[1])
    if not given:
        return None
    name = given[0]
    try:
        if name == "grammar":
            return name, Grammar.gbnf(body["grammar"])
        if name == "json_schema":
            return name, Grammar.json_schema(body["json_schema"])
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":  # llama.cpp also takes a schema here
            schema = fmt.get("schema")
            return name, Grammar.json_object() if schema is None else Grammar.json_schema(schema)
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise RequestError(400, 'response_format json_schema needs "json_schema": '
                                        '{"name": ..., "schema": {...}}', name)
            schema = spec.get("schema")
            return name, Grammar.json_object() if schema is None else Grammar.json_schema(schema)
    except ConstraintError as e:
        raise RequestError(400, f"{name}: {e}", name) from None
    raise RequestError(400, f"response_format {kind or fmt!r} is not supported; use "
                            '{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                            '"json_schema": {"name": ..., "schema": {...}}}', name)
