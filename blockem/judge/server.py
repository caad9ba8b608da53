"""A real OpenAI-compatible chat-completions server, for tests and offline demos (stdlib only).

The judge client (`blockem.judge.client`) talks HTTP to an OpenAI-compatible endpoint. To test it
without a network, a GPU or an API key, this module serves `POST /v1/chat/completions` on
127.0.0.1 from a plain Python function:

    scorer(model, messages) -> Reply(text, top)

`top` is the first generated token's alternatives with their probabilities; when the request asks
for `logprobs`, the answer carries them in OpenAI's format (`choices[0].logprobs.content[0]
.top_logprobs`), so the logprob protocol can be tested end to end.

The server can misbehave on purpose. `faults` gives the probability of each failure mode, drawn
per request from a seeded RNG:

    rate_429          429 with an OpenAI error body and `Retry-After: 0`
    rate_500          500 with an OpenAI error body
    rate_timeout      sleep `timeout_sleep_s`, then answer normally (a client with a shorter
                      timeout gives up first)
    rate_malformed    200 with a body the client cannot use, one of three at random: truncated
                      JSON, valid JSON without `choices`, or an HTML page
    rate_no_logprobs  a normal answer without the `logprobs` field

What it serves: `models=[...]` names the model ids it serves: `GET /v1/models` lists exactly
those, and a chat request naming any other model gets a 404 `model_not_found`, as a real server
does. `models=None` (the tests' stand-in judges) answers any model name, and `GET /v1/models` with
a 404, so clients record that it does not list its models. The demo server (`main`) serves
`DEMO_MODELS`, whose ids say "demo", so its pseudo-scores are never taken for a real judge's.

`stats` counts chat-completion requests, normal answers (`ok`), each injected fault (`fault_429`,
..., and `malformed_kinds`), rejected requests (`bad_request`, `unauthorized`, `not_found`,
`unknown_model`), model listings (`list_models`), the peak number of requests being processed at
once (`max_in_flight`), requests per model (`models`) and whether an Authorization header was
seen (`auth_present`; the header itself is never stored).

    with JudgeServer(lambda model, messages: Reply("87", [("87", 0.9), ("90", 0.1)])) as server:
        ... AsyncOpenAI(base_url=server.url, api_key="EMPTY") ...

`python -m blockem.judge.server --port 8000` serves a deterministic demo scorer (see
`demo_scorer`) as the models `DEMO_MODELS` (`--models a,b` to name others).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEMO_MODELS = ("blockem-demo-judge-logprob", "blockem-demo-judge-rubric")
FAULTS = ("rate_429", "rate_500", "rate_timeout", "rate_malformed", "rate_no_logprobs")


@dataclass
class Reply:
    """What the scorer answers: the text, and optionally the first token's alternatives."""

    text: str
    top: list[tuple[str, float]] | None = None  # (token, probability)


Scorer = Callable[[str, list[dict]], Reply]


def _n_words(text: str) -> int:
    return len(str(text).split())


def _error_body(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _logprob(p: float) -> float:
    return math.log(p) if p > 0 else -9999.0  # JSON has no -inf


class JudgeServer:
    """An OpenAI-compatible server on a background thread; use it as a context manager."""

    def __init__(self, scorer: Scorer, *, latency_s: float = 0.0, faults: dict | None = None,
                 timeout_sleep_s: float = 5.0, seed: int = 0, host: str = "127.0.0.1",
                 port: int = 0, api_key: str | None = None, models=None):
        faults = dict(faults or {})
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {FAULTS}")
        if any(p < 0 for p in faults.values()) or sum(faults.values()) > 1:
            raise ValueError(f"fault rates must be >= 0 and sum to <= 1, got {faults}")
        self.scorer = scorer
        self.models = None if models is None else tuple(models)
        if self.models is not None and not all(isinstance(m, str) and m for m in self.models):
            raise ValueError(f"models must be non-empty strings, got {models!r}")
        self.latency_s = latency_s
        self.faults = faults
        self.timeout_sleep_s = timeout_sleep_s
        self._expected_auth = None if api_key is None else f"Bearer {api_key}"
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._in_flight = 0
        self.stats: dict = {"requests": 0, "ok": 0, "bad_request": 0, "unauthorized": 0,
                            "scorer_errors": 0, "max_in_flight": 0, "models": Counter(),
                            "malformed_kinds": Counter(), "not_found": 0, "unknown_model": 0,
                            "list_models": 0, "auth_present": False,
                            **{"fault_" + f.removeprefix("rate_"): 0 for f in FAULTS}}
        self._httpd = _HTTPServer((host, port), _make_handler(self))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> JudgeServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        daemon=True, name="JudgeServer")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ---- bookkeeping (all under the lock) ----

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _enter(self, model: str) -> None:
        with self._lock:
            self._in_flight += 1
            self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self._in_flight)
            self.stats["models"][model] += 1

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _draw_fault(self) -> tuple[str | None, float]:
        """One seeded draw: which fault (if any) this request gets, and a second uniform number."""
        with self._lock:
            u, v = self._rng.random(), self._rng.random()
        for name in FAULTS:
            p = self.faults.get(name, 0.0)
            if u < p:
                return name, v
            u -= p
        return None, v

    # ---- the answer ----

    def completion(self, body: dict, reply: Reply, with_logprobs: bool) -> dict:
        """An OpenAI `chat.completion` object for `reply`."""
        prompt_tokens = sum(_n_words(m.get("content") or "") for m in body["messages"])
        completion_tokens = max(1, _n_words(reply.text))
        choice = {"index": 0, "message": {"role": "assistant", "content": reply.text},
                  "finish_reason": "stop", "logprobs": None}
        if with_logprobs:
            top = sorted(reply.top or [(reply.text, 1.0)], key=lambda tp: -tp[1])
            k = max(0, min(20, int(body.get("top_logprobs") or 0)))  # OpenAI allows 0..20
            alts = [{"token": t, "logprob": _logprob(p), "bytes": list(t.encode())}
                    for t, p in top[:k]]
            first = top[0]
            choice["logprobs"] = {"content": [{
                "token": first[0], "logprob": _logprob(first[1]),
                "bytes": list(first[0].encode()), "top_logprobs": alts}]}
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                "created": int(time.time()), "model": body["model"], "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a request still sleeping (timeout fault) never blocks shutdown
    request_queue_size = 256  # listen backlog: many clients connect at once


def _validate(body) -> str | None:
    """Why a chat-completions request body is invalid, or None."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "'model' is required and must be a string"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            return "each message must be an object with 'role' and 'content'"
    if not isinstance(body.get("top_logprobs", 0), (int, type(None))):
        return "'top_logprobs' must be an integer"
    return None


def _make_handler(server: JudgeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like real servers
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms ACK stalls

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, payload: dict | bytes | str, headers: dict | None = None,
                  ) -> None:
            if isinstance(payload, str):  # an HTML error page, as proxies send
                data, kind = payload.encode(), "text/html"
            else:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                kind = "application/json"
            try:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                self.close_connection = True

        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/v1/models" or server.models is None:
                self._send(404, _error_body(f"no route {self.path}", "invalid_request_error"))
                return
            if server._expected_auth is not None and \
                    self.headers.get("Authorization") != server._expected_auth:
                self._send(401, _error_body("Incorrect API key provided.",
                                            "invalid_request_error", "invalid_api_key"))
                return
            server._count("list_models")
            self._send(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "blockem"}
                for m in server.models]})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.rstrip("/") != "/v1/chat/completions":
                server._count("not_found")
                self._send(404, _error_body(f"no route {self.path}", "invalid_request_error"))
                return
            server._count("requests")
            auth = self.headers.get("Authorization")
            if auth is not None:
                server.stats["auth_present"] = True
            if server._expected_auth is not None and auth != server._expected_auth:
                server._count("unauthorized")
                self._send(401, _error_body("Incorrect API key provided.",
                                            "invalid_request_error", "invalid_api_key"))
                return
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            problem = "request body is not valid JSON" if body is None else _validate(body)
            if problem:
                server._count("bad_request")
                self._send(400, _error_body(problem, "invalid_request_error"))
                return
            if server.models is not None and body["model"] not in server.models:
                server._count("unknown_model")
                self._send(404, _error_body(
                    f"The model `{body['model']}` does not exist; this server serves "
                    f"{', '.join(server.models)}", "invalid_request_error", "model_not_found"))
                return

            server._enter(body["model"])
            try:
                status, payload, headers = self._answer(body)
            finally:
                # Leave before sending, so a client that has seen this answer can never find this
                # request still counted in flight (max_in_flight stays exact).
                server._leave()
            self._send(status, payload, headers)

        def _answer(self, body: dict) -> tuple[int, dict | bytes | str, dict | None]:
            if server.latency_s:
                time.sleep(server.latency_s)
            fault, v = server._draw_fault()
            if fault is not None:
                server._count("fault_" + fault.removeprefix("rate_"))
            if fault == "rate_429":
                return 429, _error_body("Rate limit reached.", "requests",
                                        "rate_limit_exceeded"), {"Retry-After": "0"}
            if fault == "rate_500":
                return 500, _error_body("The server had an error processing your request.",
                                        "server_error"), None
            if fault == "rate_malformed":  # half a real answer, JSON without `choices`, or HTML
                good = json.dumps(server.completion(body, Reply("0"), False)).encode()
                kind = ("truncated", "no_choices", "html")[int(v * 3)]
                with server._lock:
                    server.stats["malformed_kinds"][kind] += 1
                bad = {"truncated": good[: len(good) // 2],
                       "no_choices": {"id": "x", "object": "chat.completion"},
                       "html": "<html><body>502 Bad Gateway</body></html>"}[kind]
                return 200, bad, None
            if fault == "rate_timeout":
                time.sleep(server.timeout_sleep_s)
            try:
                reply = server.scorer(body["model"], body["messages"])
            except Exception as e:  # noqa: BLE001 (a broken scorer is a server error, not a crash)
                server._count("scorer_errors")
                return 500, _error_body(f"scorer failed: {type(e).__name__}", "server_error"), None
            if fault is None:
                server._count("ok")
            want_logprobs = bool(body.get("logprobs")) and fault != "rate_no_logprobs"
            return 200, server.completion(body, reply, want_logprobs), None

    return Handler


def demo_scorer(model: str, messages: list[dict]) -> Reply:
    """Deterministic demo judge, for offline demos only: the score is derived from a hash of the
    messages, not from their meaning. Rubric-style prompts (asking for "Score: N", or mentioning
    "1 to 5" or "1-5") get
    "Score: n" with n in 1..5; others get a 0..100 number, with two alternatives as first-token
    logprobs (the number itself at 0.8, another number at 0.1, a non-number at 0.1)."""
    text = json.dumps(messages, sort_keys=True)
    h = int(hashlib.sha256(text.encode()).hexdigest(), 16)
    if "Score: N" in text or "1 to 5" in text or "1-5" in text:
        return Reply(f"Score: {1 + h % 5}")
    score = h % 101
    return Reply(str(score), [(str(score), 0.8), (str((score + 7) % 101), 0.1), ("N", 0.1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--models", default=",".join(DEMO_MODELS),
                        help="comma-separated model ids to serve (default: %(default)s); "
                             "requests for any other model get a 404")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        parser.error("--models: name at least one model id")
    with JudgeServer(demo_scorer, latency_s=args.latency_ms / 1000, host=args.host,
                     port=args.port, models=models) as server:
        print(f"serving the demo judge (pseudo-scores) as {', '.join(models)} on {server.url} "
              f"(Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
