"""Hostile HTTP traffic and replica loss against the Serve app, over real HTTP to 127.0.0.1.

Every hostile request is drawn from a seeded RNG (``SEED``): a failure names the
request's index and kind, and rerunning reproduces it. Each request carries the exact
status it must get: 4xx for a malformed one, 200 for one that is odd but valid (emoji,
zero-width or right-to-left marks, NUL characters, a JSON content type with parameters).
"""

import collections
import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psutil
import pytest
import requests

from dolly_ray.generate.generator import GenerationParams
from dolly_ray.serve import server as dolly_serve
from dolly_ray.serve.config import ServeConfig

SEED = 20261122
NUM_HOSTILE = 600
TOKENS = 4  # new tokens of every valid request: the model's answers are not on trial here
LIMIT = 64  # max_new_tokens_limit of the test servers
BODY_LIMIT = 16 * 1024
KEY = "hostile-test-key"
ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
GREEDY = GenerationParams(greedy=True, max_new_tokens=TOKENS)


def _config(tiny_model_dir, **overrides) -> ServeConfig:
    common = dict(model=tiny_model_dir, max_new_tokens=TOKENS, max_new_tokens_limit=LIMIT, max_request_bytes=BODY_LIMIT)
    return ServeConfig(**{**common, **overrides})


@pytest.fixture(scope="module")
def server(serve_http, tiny_model_dir):
    """The open application at / and one that wants an API key at /keyed."""
    from ray import serve

    serve.run_many(
        [
            serve.RunTarget(dolly_serve.build_app(_config(tiny_model_dir, num_cpus_per_replica=0.25)), name="hostile_open", route_prefix="/"),
            serve.RunTarget(dolly_serve.build_app(_config(tiny_model_dir, num_cpus_per_replica=0.25, api_key=KEY)), name="hostile_keyed", route_prefix="/keyed"),
        ]
    )
    yield serve_http
    serve.delete("hostile_open")
    serve.delete("hostile_keyed")


# --- the hostile requests ---------------------------------------------------------------


@dataclass
class Hostile:
    """One request and the status it must get."""

    kind: str
    method: str
    path: str
    status: int | frozenset
    body: bytes | list[bytes] | None = None  # a list is sent chunked, with no declared length
    headers: dict = field(default_factory=dict)
    stream: bool = False
    message: str = ""  # text the error message must hold
    allow: str = ""  # the Allow header a 405 must carry

    def expects(self, status: int) -> bool:
        return status in self.status if isinstance(self.status, frozenset) else status == self.status


JSON = {"content-type": "application/json"}

# Text a client may well send: the server must answer it (200).
ODD_BUT_VALID = [
    "Translate 😀🚀👩‍👩‍👧 into words.",
    "\u202eReverse this\u202c please",  # right-to-left override
    "\u200fשלום\u200f, say hello",  # right-to-left marks around Hebrew
    "Say\u200b hi\u200c\u200d\u2060",  # zero-width characters
    "\ufeffSay hi.",  # a byte order mark inside the text
    "\u200b",  # only a zero-width space: not whitespace, so not empty
    "Say\x00 hi\x00",  # NUL characters
    "Z\u0351\u0362a\u0337\u035flg\u0322o\u0328",  # stacked combining marks
    "### Respon\u200bse: is not a prompt key",  # a key split by a zero-width space
    "＃＃＃ Ｒｅｓｐｏｎｓｅ：",  # fullwidth lookalike of a prompt key
    "Line\u2028separator and\u2029paragraph",
    "日本語で答えてください。",
    "\U0010ffff\U000e0001 private use and tags",
    "\x1b[31mred\x1b[0m \x07",  # terminal escapes
]
# Text that is empty once whitespace (including Unicode spaces) is stripped.
BLANK = [" ", "\u3000", " \t\n\r\u2028\u2029\x1c\x1d\x1e\x1f\x85\xa0 "]
# Raw JSON string contents that are not Unicode text: unpaired or reversed surrogates.
SURROGATES = [r"\ud800", r"\udfff", r"abc\udc00def", r"\ude00\ud83d"]
WRONG_TEXT = [0, -1, 3.5, True, False, [], ["hi"], {}, {"text": "hi"}, [[["deep"]]]]
WRONG_INT = ["5", "", "many", 4.0, 1.5, True, [4], {"n": 4}, None]  # None only where the field is required
WRONG_FLOAT = ["0.5", "hot", True, [0.5], {"t": 0.5}]
WRONG_BOOL = ["yes", "true", 1, 0, [], {}, None]


def _text_field(route: str) -> str:
    return {"/generate": "instruction", "/v1/completions": "prompt", "/v1/chat/completions": "messages.0.content"}[route]


def _body(route: str, text: str, stream: bool = False, **extra) -> dict:
    """A valid request for ``route`` whose instruction is ``text``."""
    if route == "/generate":
        body = {"instruction": text, "max_new_tokens": TOKENS, "temperature": 0}
    elif route == "/v1/completions":
        body = {"prompt": text, "max_tokens": TOKENS, "temperature": 0}
    else:
        body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}], "max_tokens": TOKENS, "temperature": 0}
        body["messages"] = body["messages"][1:] if len(text) % 2 else body["messages"]
    if stream:
        body["stream"] = True
    return {**body, **extra}


def _set(body: dict, dotted: str, value) -> dict:
    """A deep copy of ``body`` with the field at ``a.0.b`` replaced (or added)."""
    body = json.loads(json.dumps(body))
    *parents, last = dotted.split(".")
    target = body
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return body


def _dump(rng: random.Random, body) -> bytes:
    return json.dumps(body, ensure_ascii=rng.random() < 0.5).encode()


def _route(rng: random.Random) -> tuple[str, bool]:
    route = rng.choice(ROUTES)
    return route, route != "/generate" and rng.random() < 0.4


def _request(kind, route, status, body, stream=False, headers=None, method="POST") -> Hostile:
    return Hostile(kind, method, route, status, body, JSON if headers is None else headers, stream)


def bad_json(rng):
    route, stream = _route(rng)
    good = json.dumps(_body(route, "Say hi.", stream))
    broken = rng.choice(
        [
            good[: rng.randrange(1, len(good))],  # cut short: no prefix of an object is JSON
            good + rng.choice(["}", " x", ",", "{}", "\x00"]),  # trailing garbage
            good.replace('"', "'"),
            good.replace("}", ",}", 1) if route == "/generate" else good[:-1] + ",}",  # trailing comma
            "".join(rng.choice("{}[]:,\"'\\ntrue0.5e-") for _ in range(rng.randrange(1, 200))),
            "/* comment */ " + good,
        ]
    )
    # Random punctuation can spell a JSON value, but never a valid request: still 422.
    return _request("bad_json", route, 422, broken.encode(), stream)


def invalid_utf8(rng):
    route, stream = _route(rng)
    raw = _dump(rng, _body(route, "Say PLACEHOLDER.", stream))
    bad, status = rng.choice([(b"\xff\xfe", 400), (b"\xc3(", 400), (b"\x80", 400), (b"\xed\xa0\x80", 422)])  # the last: a UTF-8-encoded lone surrogate
    return _request("invalid_utf8", route, status, raw.replace(b"PLACEHOLDER", bad), stream)


def wrong_type(rng):
    route, stream = _route(rng)
    body = _body(route, "Say hi.", stream)
    fields = {
        "/generate": {"instruction": WRONG_TEXT + [None], "input": WRONG_TEXT, "max_new_tokens": WRONG_INT[:-1], "temperature": WRONG_FLOAT, "top_p": WRONG_FLOAT, "seed": WRONG_INT[:-1]},
        "/v1/completions": {"prompt": WRONG_TEXT + [None], "max_tokens": WRONG_INT[:-1], "model": WRONG_TEXT, "stream": WRONG_BOOL[:-1], "n": WRONG_INT, "user": WRONG_TEXT, "stream_options": [0, 3.5, True, [], "x", {"include_usage": "yes"}, {"extra": 1}]},
        "/v1/chat/completions": {
            "messages": WRONG_TEXT[:5] + [None, ["hi"], [{"content": "hi"}], "hi"],
            f"messages.{len(body.get('messages', [])) - 1}.content": WRONG_TEXT + [None],
            f"messages.{len(body.get('messages', [])) - 1}.role": WRONG_TEXT + [None, "robot", "USER"],
            "max_completion_tokens": WRONG_INT[:-1],
            "temperature": WRONG_FLOAT,
            "stream": WRONG_BOOL[:-1],
        },
    }[route]
    name = rng.choice(sorted(fields))
    return _request(f"wrong_type:{name.split('.')[-1]}", route, 422, _dump(rng, _set(body, name, rng.choice(fields[name]))), stream)


def out_of_range(rng):
    route, stream = _route(rng)
    tokens = {"/generate": "max_new_tokens", "/v1/completions": "max_tokens", "/v1/chat/completions": rng.choice(["max_tokens", "max_completion_tokens"])}[route]
    body = _body(route, "Say hi.", stream)
    body.pop("max_tokens", None)
    name, value, status = rng.choice(
        [
            (tokens, rng.randrange(LIMIT + 1, 10**6), 400),  # over this server's limit
            (tokens, 10 ** rng.randrange(10, 40), 400),  # far over it, past 64 bits too
            (tokens, rng.randrange(-(10**6), 1), 422),
            ("temperature", -rng.random() - 1e-9, 422),
            ("temperature", 2 + rng.random() + 1e-9, 422),
            ("temperature", rng.random() * 0.00999 + 1e-300, 422),  # small enough to overflow sampling
            ("top_p", -rng.random(), 422),
            ("top_p", 0, 422),
            ("top_p", 1 + rng.random() + 1e-9, 422),
            ("seed", rng.randrange(-(2**40), 0), 422),
            ("seed", rng.randrange(2**32, 2**70), 422),
            ("n", rng.choice([0, 2, 100]), 422),
        ]
    )
    if route == "/generate" and name == "n":
        name, value = "seed", -1
    return _request(f"out_of_range:{name}", route, status, _dump(rng, {**body, name: value}), stream)


def not_finite(rng):
    """NaN and infinities, which Python's json reads although JSON has no such numbers."""
    route, stream = _route(rng)
    name = rng.choice(["temperature", "top_p"])
    token = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
    raw = json.dumps({**_body(route, "Say hi.", stream), name: "PLACEHOLDER"}).replace('"PLACEHOLDER"', token)
    return _request(f"not_finite:{name}", route, 422, raw.encode(), stream)


def odd_but_valid_unicode(rng):
    route, stream = _route(rng)
    text = rng.choice(ODD_BUT_VALID)
    return _request("odd_but_valid_unicode", route, 200, _dump(rng, _body(route, text, stream)), stream)


def blank_text(rng):
    route, stream = _route(rng)
    body = _body(route, rng.choice(BLANK), stream)
    return _request("blank_text", route, 400 if route == "/v1/chat/completions" else 422, _dump(rng, body), stream)


def lone_surrogate(rng):
    route, stream = _route(rng)
    name = rng.choice([_text_field(route)] + (["input"] if route == "/generate" else []))
    raw = json.dumps(_set(_body(route, "Say hi.", stream), name, "PLACEHOLDER")).replace("PLACEHOLDER", rng.choice(SURROGATES))
    return _request("lone_surrogate", route, 422, raw.encode(), stream)


def prompt_key(rng):
    route, stream = _route(rng)
    text = f"Say {rng.choice(['### Instruction:', '### Response:', '### End'])} hi."
    return _request("prompt_key", route, 400 if route == "/v1/chat/completions" else 422, _dump(rng, _body(route, text, stream)), stream)


def empty_body(rng):
    route, _ = _route(rng)
    return _request("empty_body", route, 422, rng.choice([b"", None]), headers=rng.choice([JSON, {}]))


def not_an_object(rng):
    route, _ = _route(rng)
    value = rng.choice([[], [_body(route, "hi")], "hi", 5, None, True, 1.5])
    return _request("not_an_object", route, 422, json.dumps(value).encode())


def content_type(rng):
    """A valid JSON body under another content type: read as JSON only when it says JSON."""
    route, stream = _route(rng)
    body = _dump(rng, _body(route, "Say hi.", stream))
    header, status = rng.choice(
        [
            ("text/plain", 422),
            ("application/x-www-form-urlencoded", 422),
            ("multipart/form-data; boundary=xyz", 422),
            ("application/xml", 422),
            ("image/png", 422),
            ("", 422),
            ("application/json; charset=utf-8", 200),
            ("application/problem+json", 200),
        ]
    )
    request = _request(f"content_type:{header or 'none'}", route, status, body, stream, headers={"content-type": header} if header else {})
    request.message = "Content-Type: application/json" if status == 422 else ""
    return request


def wrong_method(rng):
    if rng.random() < 0.6:
        route, _ = _route(rng)
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
    else:
        route, method = rng.choice(["/healthz", "/v1/models", "/v1/stats"]), rng.choice(["POST", "PUT", "DELETE", "PATCH"])
    return _request(f"wrong_method:{method}", route, 405, _dump(rng, _body("/generate", "Say hi.")) if method != "GET" else None, method=method)


def unknown_path(rng):
    path = rng.choice(
        [
            "/v1/completion",
            "/v2/completions",
            "/v1/chat",
            "/v1/chat/completions/x",
            "/generate/" + "".join(rng.choice("abc") for _ in range(3)),
            "/v1/models/nope",
            "/v1/embeddings",
            "/" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_") for _ in range(rng.randrange(1, 300))),
            "/%00",
            "/..%2f..%2fetc%2fpasswd",
            "/%e2%80%ae%f0%9f%98%80",
            "/docs",
            "/openapi.json",
        ]
    )
    method = rng.choice(["GET", "POST"])
    return _request("unknown_path", path, 404, _dump(rng, _body("/generate", "Say hi.")) if method == "POST" else None, method=method)


def trailing_slash(rng):
    route, stream = _route(rng)
    return _request("trailing_slash", route + "/", 404, _dump(rng, _body(route, "Say hi.", stream)), stream)


def deep_nesting(rng):
    """Nested arrays: too deep for the JSON parser (400), or parsed and then refused (422)."""
    route, stream = _route(rng)
    depth = rng.choice([rng.randrange(2, 500), rng.randrange(5000, BODY_LIMIT // 2 - 100)])
    name = rng.choice([_text_field(route), "extra"])
    raw = json.dumps(_set(_body(route, "Say hi.", stream), name, "PLACEHOLDER")).replace('"PLACEHOLDER"', "[" * depth + "]" * depth)
    return _request("deep_nesting", route, frozenset({400, 422}), raw.encode(), stream)


def long_key(rng):
    route, stream = _route(rng)
    key = rng.choice(["k", "\u200b", "é", "🔑"]) * rng.randrange(500, BODY_LIMIT // 16)  # under the cap even escaped
    body = _body(route, "Say hi.", stream)
    if route == "/v1/chat/completions" and rng.random() < 0.5:
        body["messages"][-1][key] = "x"
    else:
        body[key] = "x"
    return _request("long_key", route, 422, _dump(rng, body), stream)


def huge_body(rng):
    """Over the size cap: declared up front (refused before reading) or sent in chunks."""
    route, stream = _route(rng)
    size = rng.randrange(BODY_LIMIT + 1, 4 * BODY_LIMIT)
    raw = json.dumps(_body(route, "x" * size, stream)).encode()
    if rng.random() < 0.5:
        return _request("huge_body:declared", route, 413, raw, stream)
    chunk = rng.randrange(1000, BODY_LIMIT)
    return _request("huge_body:chunked", route, 413, [raw[i : i + chunk] for i in range(0, len(raw), chunk)], stream)


def context_overflow(rng):
    """A prompt under the body cap but longer than the model's context."""
    route, stream = _route(rng)
    text = "tell me more about this " * rng.randrange(500, BODY_LIMIT // 25)
    return _request("context_overflow", route, 400, _dump(rng, _body(route, text, stream)), stream)


def unknown_model(rng):
    route = rng.choice(ROUTES[1:])
    stream = rng.random() < 0.4
    name = rng.choice(["gpt-4", "", "../../etc/passwd", "x" * 5000, "😀"])
    return _request("unknown_model", route, 404, _dump(rng, _body(route, "Say hi.", stream, model=name)), stream)


def chat_shape(rng):
    stream = rng.random() < 0.4
    body = _body("/v1/chat/completions", "Say hi.", stream)
    variant, messages, status = rng.choice(
        [
            ("no_user_message", [{"role": rng.choice(["system", "assistant", "developer"]), "content": "hi"}], 400),
            ("empty_messages", [], 422),
            ("content_parts", [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], 422),
            ("missing_content", [{"role": "user"}], 422),
            ("missing_role", [{"content": "hi"}], 422),
            ("many_messages", [{"role": rng.choice(["user", "assistant"]), "content": "hi"} for _ in range(rng.randrange(50, 300))] + [{"role": "user", "content": "Say hi."}], 200),
        ]
    )
    return _request(f"chat_shape:{variant}", "/v1/chat/completions", status, _dump(rng, {**body, "messages": messages}), stream)


def duplicate_keys(rng):
    """Python's json keeps the last of duplicate keys; a valid last value makes a valid request."""
    route, stream = _route(rng)
    good = json.dumps(_body(route, "Say hi.", stream))
    return _request("duplicate_keys", route, 200, ('{"temperature": "hot", ' + good[1:]).encode(), stream)


def valid(rng):
    route, stream = _route(rng)
    body = _body(route, rng.choice(["Name a color.", "Reverse the word.", "Sort 3 1 2."]), stream)
    if route == "/generate" and rng.random() < 0.5:
        body["input"] = rng.choice(ODD_BUT_VALID)
    return _request("valid", route, 200, _dump(rng, body), stream)


KINDS = [
    bad_json, invalid_utf8, wrong_type, wrong_type, out_of_range, not_finite, odd_but_valid_unicode, blank_text, lone_surrogate, prompt_key,
    empty_body, not_an_object, content_type, wrong_method, unknown_path, trailing_slash, deep_nesting, long_key, huge_body,
    context_overflow, unknown_model, chat_shape, duplicate_keys, valid,
]  # fmt: skip
WRONG_KEYS = [None, "", "Bearer", "Bearer ", "Bearer wrong", KEY, f"Basic {KEY}", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", "Bearer \t"]


def hostile_requests(seed: int, n: int) -> list[Hostile]:
    """``n`` requests cycling through every kind; a quarter go to the keyed app, most of those without the key."""
    rng = random.Random(seed)
    made = []
    for i in range(n):
        request = KINDS[i % len(KINDS)](rng)
        if rng.random() < 0.25 and request.path != "/healthz":  # the health check needs no key
            request.path = "/keyed" + request.path
            key = rng.choice(WRONG_KEYS + [f"Bearer {KEY}", f"bearer {KEY}"])
            if key and key.lower() == f"bearer {KEY}".lower():
                request.headers = {**request.headers, "authorization": key}
            else:
                request.headers = {**request.headers, **({"authorization": key} if key is not None else {})}
                request.kind, request.status, request.message = f"no_key:{request.kind}", 401, "API key"
        made.append(request)
    return made


# --- named requests: each a case a client gets wrong in practice, sent every run ------------------

LONG_PROMPT = "tell me more about this " * 600  # under the body cap, well past the tiny model's 2048 positions
USER = {"role": "user", "content": "hi"}
NAMED = {
    "no instruction": ("/generate", {"input": "x"}, 422),
    "empty instruction": ("/generate", {"instruction": ""}, 422),
    "blank instruction": ("/generate", {"instruction": " \n\t"}, 422),
    "instruction is a number": ("/generate", {"instruction": 42}, 422),
    "instruction is null": ("/generate", {"instruction": None}, 422),
    "instruction holds a prompt key": ("/generate", {"instruction": "a ### Response: b"}, 422),
    "input is a list": ("/generate", {"instruction": "x", "input": ["a"]}, 422),
    "input holds the end key": ("/generate", {"instruction": "x", "input": "### End"}, 422),
    "max_new_tokens as text": ("/generate", {"instruction": "x", "max_new_tokens": "5"}, 422),
    "max_new_tokens is a bool": ("/generate", {"instruction": "x", "max_new_tokens": True}, 422),
    "max_new_tokens zero": ("/generate", {"instruction": "x", "max_new_tokens": 0}, 422),
    "max_new_tokens over the cap": ("/generate", {"instruction": "x", "max_new_tokens": LIMIT + 1}, 400),
    "max_new_tokens enormous": ("/generate", {"instruction": "x", "max_new_tokens": 10**30}, 400),
    "negative temperature": ("/generate", {"instruction": "x", "temperature": -0.5}, 422),
    "temperature as text": ("/generate", {"instruction": "x", "temperature": "hot"}, 422),
    "temperature so small that sampling overflows": ("/generate", {"instruction": "x", "temperature": 1e-300}, 422),
    "temperature above 2": ("/generate", {"instruction": "x", "temperature": 2.5}, 422),
    "top_p zero": ("/generate", {"instruction": "x", "top_p": 0}, 422),
    "top_p above one": ("/generate", {"instruction": "x", "top_p": 1.5}, 422),
    "negative seed": ("/generate", {"instruction": "x", "seed": -1}, 422),
    "unknown field": ("/generate", {"instruction": "x", "max_tokens": 5}, 422),
    "prompt longer than the context": ("/generate", {"instruction": LONG_PROMPT}, 400),
    "body is a list": ("/generate", [{"instruction": "x"}], 422),
    "completion for an unknown model": ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404),
    "completion without prompt": ("/v1/completions", {"model": None}, 422),
    "completion prompt as a list": ("/v1/completions", {"prompt": ["x", "y"]}, 422),
    "completion with n=2": ("/v1/completions", {"prompt": "x", "n": 2}, 422),
    "completion with stop sequences": ("/v1/completions", {"prompt": "x", "stop": ["\n"]}, 422),
    "completion max_tokens over the cap": ("/v1/completions", {"prompt": "x", "max_tokens": LIMIT + 1}, 400),
    "streamed completion too long for the context": ("/v1/completions", {"prompt": LONG_PROMPT, "stream": True}, 400),
    "stream flag as text": ("/v1/completions", {"prompt": "x", "stream": "yes"}, 422),
    "chat with an unknown model": ("/v1/chat/completions", {"model": "nope", "messages": [USER]}, 404),
    "chat without messages": ("/v1/chat/completions", {"messages": []}, 422),
    "chat with no user message": ("/v1/chat/completions", {"messages": [{"role": "system", "content": "be nice"}]}, 400),
    "chat with an unknown role": ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 422),
    "chat content not text": ("/v1/chat/completions", {"messages": [{"role": "user", "content": {"text": "hi"}}]}, 422),
    "chat last user message blank": ("/v1/chat/completions", {"messages": [USER, {"role": "user", "content": "  "}]}, 400),
    "chat with both token limits": ("/v1/chat/completions", {"messages": [USER], "max_tokens": 3, "max_completion_tokens": 3}, 400),
}
NAMED_RAW = {
    "malformed JSON": ("POST", "/generate", b'{"instruction": ', JSON, 422),
    "NaN temperature": ("POST", "/generate", b'{"instruction": "x", "temperature": NaN}', JSON, 422),
    "unpaired surrogate": ("POST", "/generate", b'{"instruction": "x \\ud800"}', JSON, 422),
    "invalid UTF-8": ("POST", "/generate", b'{"instruction": "\xff\xfe"}', JSON, 400),
    "empty body": ("POST", "/generate", b"", JSON, 422),
    "form instead of JSON": ("POST", "/generate", b"instruction=x", {"content-type": "application/x-www-form-urlencoded"}, 422),
    "body over the size cap": ("POST", "/generate", b'{"instruction": "' + b"a" * BODY_LIMIT + b'"}', JSON, 413),
    "chunked body over the size cap": ("POST", "/generate", [b'{"instruction": "'] + [b"b" * (BODY_LIMIT // 4)] * 8 + [b'"}'], JSON, 413),
    "GET on a POST route": ("GET", "/generate", None, {}, 405),
    "unknown path": ("POST", "/v2/complete", b"{}", JSON, 404),
}


def named_requests() -> list[Hostile]:
    made = [Hostile(f"named:{name}", "POST", path, status, json.dumps(body).encode(), JSON) for name, (path, body, status) in NAMED.items()]
    made += [Hostile(f"named:{name}", method, path, status, body, headers) for name, (method, path, body, headers, status) in NAMED_RAW.items()]
    for request in made:
        request.allow = "POST" if request.status == 405 else ""
    return made


# --- sending and checking -------------------------------------------------------------------


def _send(url: str, request: Hostile) -> tuple[int | str, str]:
    """(status, problem): the problem is empty when the reply is what the request deserved."""
    body = iter(request.body) if isinstance(request.body, list) else request.body
    try:
        reply = requests.request(request.method, url + request.path, data=body, headers=request.headers, timeout=120, allow_redirects=False)
    except requests.RequestException as e:
        return type(e).__name__, f"no reply: {e}"
    if not request.expects(reply.status_code):
        return reply.status_code, f"status {reply.status_code}, expected {request.status}: {reply.text[:300]}"
    if reply.status_code != 200:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return reply.status_code, f"error body is not an OpenAI-style JSON error: {reply.text[:300]!r}"
        if not isinstance(message, str) or not message or request.message not in message:
            return reply.status_code, f"error message {message!r} does not say {request.message!r}"
        if request.allow and reply.headers.get("allow") != request.allow:
            return reply.status_code, f"Allow header {reply.headers.get('allow')!r}, expected {request.allow!r}"
        return reply.status_code, ""
    if request.stream:
        events = [line[len("data: ") :] for line in reply.text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]" or any("error" in json.loads(e) for e in events[:-1]):
            return 200, f"bad stream: {reply.text[:300]!r}"
        return 200, ""
    answer = reply.json()
    if not isinstance(answer.get("response", answer.get("choices")), (str, list)):
        return 200, f"no answer in {answer}"
    return 200, ""


def _answer(url: str, instruction: str) -> str:
    reply = requests.post(f"{url}/generate", json={"instruction": instruction, "temperature": 0}, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["response"]


def test_hostile_requests_are_reproducible():
    first, again = hostile_requests(SEED, 200), hostile_requests(SEED, 200)
    assert [(r.kind, r.path, r.body, r.headers) for r in first] == [(r.kind, r.path, r.body, r.headers) for r in again]
    assert {r.kind.split(":")[0] for r in first} >= {k.__name__ for k in KINDS} | {"no_key"}


@pytest.mark.slow
def test_hostile_traffic_gets_4xx_and_the_server_keeps_answering(server, generator):
    made = named_requests() + hostile_requests(SEED, NUM_HOSTILE)
    replica = requests.get(f"{server}/v1/stats", timeout=60).json()["replica"]
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda request: _send(server, request), made))
    elapsed = time.monotonic() - start

    problems = [f"#{i} {r.kind} {r.method} {r.path}: {problem}" for i, (r, (_, problem)) in enumerate(zip(made, results, strict=True)) if problem]
    statuses = collections.Counter(status for status, _ in results)
    print(f"\nhostile requests: {len(made)} in {elapsed:.1f}s, by status {dict(sorted(statuses.items(), key=str))}")
    assert not problems, f"{len(problems)} of {len(made)} (seed {SEED}):\n" + "\n".join(problems[:40])
    assert statuses[200] >= 50 and sum(n for s, n in statuses.items() if 400 <= s < 500) >= 400 + len(NAMED) + len(NAMED_RAW)
    assert sum(statuses.values()) == len(made) and not {s for s in statuses if not isinstance(s, int) or s >= 500}, statuses  # no 5xx, no dropped connection

    # The same replica, never restarted, still answers correctly.
    assert requests.get(f"{server}/v1/stats", timeout=60).json()["replica"] == replica
    for instruction in ["Name a primary color.", "Say\x00 hi 😀"]:
        assert _answer(server, instruction) == generator.generate([instruction], GREEDY)[0].response
    reply = requests.post(f"{server}/keyed/generate", json={"instruction": "Name a primary color.", "temperature": 0}, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert reply.status_code == 200 and reply.json()["response"] == generator.generate(["Name a primary color."], GREEDY)[0].response


# --- a replica killed under load ----------------------------------------------------------


def _replica_processes(app: str) -> dict[int, psutil.Process]:
    """This test's Ray's replica processes of ``app`` (never another Ray on the machine)."""
    found = {}
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[:1] and process.cmdline()[0].startswith(f"ray::ServeReplica:{app}:"):
                found[process.pid] = process
        except psutil.Error:  # exited meanwhile
            pass
    return found


class Load(threading.Thread):
    """Sends greedy requests in a loop, keeping (sent, finished, status, instruction) of each."""

    def __init__(self, url: str, instructions: list[str], stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.instructions, self.stop = url, instructions, stop
        self.log: list[tuple[float, float, int | str, str, str]] = []

    def run(self):
        i = 0
        while not self.stop.is_set():
            instruction = self.instructions[i % len(self.instructions)]
            sent = time.monotonic()
            try:
                reply = requests.post(f"{self.url}/generate", json={"instruction": instruction, "temperature": 0}, timeout=60)
                status, text = reply.status_code, reply.json().get("response", "") if reply.status_code == 200 else reply.text[:200]
            except (requests.RequestException, ValueError) as e:
                status, text = type(e).__name__, str(e)[:200]
            self.log.append((sent, time.monotonic(), status, instruction, text))
            i += 1


@pytest.mark.slow
def test_a_killed_replica_is_replaced_and_requests_after_recovery_all_succeed(serve_http, tiny_model_dir, generator):
    from ray import serve

    app = "hostile_replicas"
    serve.run(dolly_serve.build_app(_config(tiny_model_dir, num_replicas=2, num_cpus_per_replica=0.25)), name=app, route_prefix="/replicas")
    url = f"{serve_http}/replicas"
    before = _replica_processes(app)
    assert len(before) == 2
    instructions = [f"Repeat the word {word}." for word in ("ray", "serve", "dolly", "replica", "kill")]
    expected = {i: r.response for i, r in zip(instructions, generator.generate(instructions, GREEDY, batch_size=1), strict=True)}

    stop = threading.Event()
    load = [Load(url, instructions, stop) for _ in range(4)]
    for thread in load:
        thread.start()
    try:
        while sum(len(t.log) for t in load) < 20:
            time.sleep(0.1)
        victim = next(iter(before))
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        deadline = killed_at + 240
        while True:
            assert time.monotonic() < deadline, f"not recovered: {serve.status().applications[app].deployments}"
            now = _replica_processes(app)
            deployment = serve.status().applications[app].deployments["InstructionServer"]
            new = set(now) - set(before)
            if victim not in now and new and deployment.status == "HEALTHY" and deployment.replica_states.get("RUNNING") == 2:
                break
            time.sleep(0.5)
        recovered_at = time.monotonic()
        while sum(1 for t in load for sent, *_ in t.log if sent > recovered_at) < 60:
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in load:
            thread.join(timeout=120)

    log = [entry for thread in load for entry in thread.log]
    after = [entry for entry in log if entry[0] > recovered_at]
    failed = [entry for entry in log if entry[2] != 200]
    print(
        f"\nreplica kill: {len(log)} requests, by status {dict(collections.Counter(str(e[2]) for e in log))}; "
        f"failed {len(failed)} (all sent before recovery: {all(e[0] <= recovered_at for e in failed)}); "
        f"replaced in {recovered_at - killed_at:.1f}s; {len(after)} sent after recovery"
    )
    assert [(e[2], e[4]) for e in after] == [(200, expected[e[3]]) for e in after]
    # At most the requests in flight when the replica died fail: one per client, each sent before the kill.
    in_flight = [e for e in log if e[0] <= killed_at <= e[1]]
    assert len(failed) <= len(in_flight) <= len(load), failed
    assert all(e[0] <= killed_at <= e[1] for e in failed), failed
    # Both replicas, the new one included, answer.
    seen = {requests.get(f"{url}/v1/stats", timeout=60).json()["replica"] for _ in range(40)}
    assert len(seen) == 2
    serve.delete(app)
