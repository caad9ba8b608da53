"""Ask an LLM judge (any OpenAI-compatible endpoint) for many scores, robustly and only once.

    endpoint = Endpoint("gpt4o", "gpt-4o-2024-08-06", "https://api.openai.com/v1",
                        "OPENAI_API_KEY", "logprob_0_100")
    results, usage = judge_requests(endpoint, requests, JudgeCache("judge.sqlite"))

Each `Request` carries a cache key (`cache.cache_key(...)`), a short question label ("aligned",
"coherent") and the chat messages to send. `run_requests`:

1. looks every key up in the cache; cached results cost no call;
2. sends each remaining distinct key once (duplicates share one call), at most
   `max_concurrency` requests in flight (an asyncio.Semaphore around each HTTP call); above
   `SHARD_CONNECTIONS` (16) in flight the connections are split over several HTTP clients, each
   request taking the least busy one (httpx scans its whole pool on every request and response,
   so one pool of 64 connections costs the client more CPU per request than four of 16);
3. retries transport failures (429, 5xx, 408/409, timeouts, connection errors and malformed
   200 bodies) with exponential backoff and full jitter, `random() * min(backoff_max_s,
   backoff_base_s * 2**attempt)`, or the server's Retry-After (capped at `backoff_max_s`);
   other 4xx (400, 401, 403, 404, ...) stop the run at once with a `JudgeHTTPError` naming the
   judge, model, URL and status, since retrying cannot fix them;
4. parses each reply with the protocol's parser (`protocols.PARSERS`), asking again up to
   `unparseable_retries` times when it is `Unparseable`;
5. writes every outcome (`ok`, `low_mass`, `unparseable`) to the cache as it arrives, so a killed
   run keeps its progress; `failed` (transport retries exhausted) is not cached, so the next run
   tries again. Writes are batched: what arrives within `FLUSH_S` (50 ms; or `FLUSH_N` results,
   whichever comes first) is committed in one transaction (`JudgeCache.put_many`) on a writer
   thread, off the event loop (an SQLite commit is an fsync, 2-20 ms, more than a reply costs the
   client). The remainder is committed when the run ends, also on an error or a cancellation
   (Ctrl-C); a SIGKILL loses at most the last ~50 ms of results and the batch being committed.

Before its first call the client asks the endpoint who it is (`identify`: `GET <base_url>/models`
with the same client and key). When the endpoint lists its models and the configured model is not
among them, the run stops with a `JudgeModelError` naming the judge, model, endpoint and what it
serves (a server that echoes any `model` it is sent would otherwise answer under a name that is not
its own); when it cannot list them, that is recorded, not an error. A judge's identity is its
endpoint (`normalise_url` of the base URL: never the key), model, protocol and prompts: the
endpoint is part of every cache key (`cache.cache_key`), and the identity, with the models the
endpoint listed, goes into the provenance of every judgements file.

Results come back in request order. The openai client's own retries are off (`max_retries=0`):
the retry policy is all here. About malformed bodies, the openai client (3.x) does not raise one
exception type: a 200 whose JSON is broken raises a bare `json.JSONDecodeError` (a ValueError) from
inside the client; a 200 of valid JSON without `choices` returns a `ChatCompletion` whose `choices`
is None (models are constructed without validation); a 200 that is not `application/json` (a
proxy's HTML page) returns a plain `str`. All three are retried here as "malformed".

The API key is read from the environment variable `api_key_env` (None: a local server that wants
none, sent as "EMPTY") when the first call is needed, and lives only inside the openai client: it is
never logged, stored in the cache or results, or printed in an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from urllib.parse import urlsplit

import openai

try:  # openai 3.x transports on httpx2; older versions on httpx
    import httpx2 as _httpx
except ImportError:  # pragma: no cover
    import httpx as _httpx

from blockem.judge.cache import JudgeCache
from blockem.judge.protocols import PARSERS, REQUEST_KW, Completion, Unparseable

STATUSES = ("ok", "low_mass", "unparseable", "failed")
RETRYABLE_STATUS = {408, 409, 429}  # and every 5xx
FLUSH_S = 0.05  # cache writes: one transaction per FLUSH_S seconds ...
FLUSH_N = 256  # ... or per FLUSH_N results, whichever comes first
SHARD_CONNECTIONS = 16  # connections per HTTP client (pool); more concurrency: more clients


DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_url(url: str) -> str:
    """The identity of an endpoint: its base URL with the scheme and host lower-cased, the default
    port dropped, no user info, query or fragment, no trailing slash. It never holds a key (a key
    in the user-info part or the query is dropped). ValueError if it is not an http(s) URL."""
    parts = urlsplit(str(url).strip())
    scheme = parts.scheme.lower()
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a bad port
        host, port = None, None
    if scheme not in DEFAULT_PORTS or not host:
        # name only the parts that cannot hold a key
        raise ValueError(f"base URL {scheme + '://' if scheme else ''}{host or ''}... is not an "
                         f"http(s) URL with a host and a valid port")
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


class JudgeSetupError(RuntimeError, ValueError):
    """A judge that cannot be asked as configured (no API key, a model the endpoint does not
    serve): fix the setup, then rerun. Found before any call; a ValueError, so the command line
    prints it as one error line."""


@dataclass
class Endpoint:
    """One judge: a model behind an OpenAI-compatible URL, its protocol and its retry policy."""

    name: str
    model: str
    base_url: str
    api_key_env: str | None
    protocol: str
    max_concurrency: int = 16
    timeout_s: float = 60.0
    max_retries: int = 8
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    unparseable_retries: int = 2
    url_id: str = field(init=False, default="")  # normalise_url(base_url): the judge's endpoint

    def __post_init__(self):
        try:
            self.url_id = normalise_url(self.base_url)
        except ValueError as e:
            raise ValueError(f"judge {self.name!r}: {e}") from None
        if self.protocol not in PARSERS:
            raise ValueError(f"judge {self.name!r}: unknown protocol {self.protocol!r}; "
                             f"known: {sorted(PARSERS)}")
        if self.max_concurrency < 1:
            raise ValueError(f"judge {self.name!r}: max_concurrency must be >= 1")

    def api_key(self) -> str:
        """The API key from the environment (never printed), or "EMPTY" for keyless servers."""
        if self.api_key_env is None:
            return "EMPTY"
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeSetupError(f"judge {self.name!r} needs an API key: the environment "
                                  f"variable {self.api_key_env} is not set (or empty)")
        return key


@dataclass
class Request:
    key: str  # cache key, see cache.cache_key
    question: str  # short label stored with the score ("aligned", "coherent")
    messages: list[dict]


@dataclass
class Result:
    key: str
    score: float | None
    status: str  # one of STATUSES
    cached: bool
    error: str | None = None


@dataclass
class Usage:
    calls: int = 0  # HTTP requests sent, retries included
    retries: int = 0  # transport retries + unparseable re-asks
    cache_hits: int = 0  # requests answered from the cache
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: int = 0  # distinct keys whose transport retries ran out
    unparseable: int = 0  # distinct keys recorded as unparseable

    def as_dict(self) -> dict:
        return asdict(self)


class JudgeHTTPError(RuntimeError):
    """A non-retryable HTTP error (bad request, auth, unknown model): fix the setup, then rerun."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class JudgeModelError(JudgeSetupError):
    """The endpoint lists its models and the configured judge model is not one of them."""


def identify(ep: Endpoint) -> dict:
    """Who answers as this judge: its endpoint, model and protocol, and the models the endpoint
    lists (`GET <base_url>/models` with the openai client; `served_models` None and
    `served_models_error` when it does not answer with a list). Raises JudgeModelError when the
    list is non-empty and lacks the configured model, JudgeSetupError when the key is missing."""
    out = {"endpoint": ep.url_id, "model": ep.model, "protocol": ep.protocol}
    key = ep.api_key()
    try:
        with openai.OpenAI(api_key=key, base_url=ep.base_url, max_retries=0,
                           timeout=min(ep.timeout_s, 30.0)) as client:
            served = sorted({str(m.id) for m in client.models.list()})
    except openai.APIStatusError as e:
        return {**out, "served_models": None, "served_models_error": f"HTTP {e.status_code}"}
    except (openai.APIError, ValueError, TypeError, AttributeError, KeyError) as e:
        return {**out, "served_models": None, "served_models_error": type(e).__name__}
    if served and ep.model not in served:
        shown = ", ".join(served[:20]) + (f", ... ({len(served)} in all)" if len(served) > 20
                                          else "")
        raise JudgeModelError(
            f"judge {ep.name!r}: model {ep.model!r} is not served at {ep.url_id}: its /models "
            f"lists {shown}. Point the judge at an endpoint that serves {ep.model!r}, or set "
            f"judge.judges[].model to the model this endpoint serves")
    return {**out, "served_models": served}


class _Retryable(Exception):
    """A transport failure worth another try; `wait` is the server's Retry-After, if any."""

    def __init__(self, why: str, wait: float | None = None):
        super().__init__(why)
        self.why, self.wait = why, wait


# ---- one HTTP call ----

def _retry_after(headers, cap: float) -> float | None:
    """Seconds the server asks us to wait (Retry-After / retry-after-ms), capped; None if absent."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value is not None:
            try:
                return min(cap, max(0.0, float(value) * scale))
            except ValueError:  # an HTTP date: fall back to our own backoff
                return None
    return None


def _fatal(ep: Endpoint, e: openai.APIStatusError, key: str) -> JudgeHTTPError:
    status = e.status_code
    detail = str(getattr(e, "message", "") or "")
    if ep.api_key_env:  # never echo the key, should the server quote it
        detail = detail.replace(key, "***")
    hint = {401: (f"check the environment variable {ep.api_key_env}" if ep.api_key_env
                  else "the endpoint wants an API key: set api_key_env"),
            403: "the key is not allowed to use this model",
            404: "check the model name and base_url"}.get(status, "the request was rejected")
    return JudgeHTTPError(f"judge {ep.name!r} (model {ep.model!r} at {ep.url_id}): HTTP {status}"
                          f" ({hint}); server said: {detail[:300]}", status)


def _completion(resp) -> Completion:
    """Our view of a ChatCompletion; _Retryable when the body has no usable choice."""
    try:
        choice = resp.choices[0]
        text = choice.message.content or ""
        lp = getattr(choice, "logprobs", None)
        content = getattr(lp, "content", None) if lp is not None else None
        top = [(t.token, t.logprob) for t in content[0].top_logprobs] if content else None
    except (AttributeError, IndexError, KeyError, TypeError):
        raise _Retryable(f"malformed body ({type(resp).__name__} without choices)") from None
    usage = getattr(resp, "usage", None)
    return Completion(text, top or None, getattr(usage, "prompt_tokens", 0) or 0,
                      getattr(usage, "completion_tokens", 0) or 0)


async def _call(client: openai.AsyncOpenAI, ep: Endpoint, messages: list[dict],
                key: str) -> Completion:
    try:
        if all(isinstance(m.get("content"), str) for m in messages):
            # Plain-text chat messages go in `extra_body` (which overrides the body's key): the
            # client's request transform, a recursive walk over the message TypedDict union, is
            # an identity on them and costs ~15% of the client's CPU per request.
            resp = await client.chat.completions.create(
                model=ep.model, messages=[], extra_body={"messages": messages},
                timeout=ep.timeout_s, **REQUEST_KW[ep.protocol])
        else:
            resp = await client.chat.completions.create(
                model=ep.model, messages=messages, timeout=ep.timeout_s, **REQUEST_KW[ep.protocol])
    except openai.APIStatusError as e:
        if e.status_code in RETRYABLE_STATUS or e.status_code >= 500:
            raise _Retryable(f"HTTP {e.status_code}",
                             _retry_after(e.response.headers, ep.backoff_max_s)) from None
        raise _fatal(ep, e, key) from None
    except openai.APIConnectionError as e:  # APITimeoutError is a subclass
        raise _Retryable(type(e).__name__) from None
    except openai.APIResponseValidationError:  # only in strict mode
        raise _Retryable("malformed body (schema)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a 200 whose body is not JSON
        raise _Retryable(f"malformed body ({type(e).__name__})") from None
    return _completion(resp)


# ---- one judgement: transport retries, then parse, re-asking when unparseable ----

def _backoff(ep: Endpoint, attempt: int) -> float:
    return random.random() * min(ep.backoff_max_s, ep.backoff_base_s * 2 ** attempt)


class _Clients:
    """`max_concurrency` slots over one or more openai clients (HTTP connection pools).

    `async with clients.slot() as client:` waits for one of the n slots (the semaphore), then
    takes the client with the fewest requests in flight: with n in flight at most and
    ceil(n / shards) connections per client, that client always has a free connection."""

    def __init__(self, ep: Endpoint, key: str):
        n = ep.max_concurrency
        shards = max(1, math.ceil(n / SHARD_CONNECTIONS))
        per = math.ceil(n / shards)
        self.sem = asyncio.Semaphore(n)
        self.clients = []
        for _ in range(shards):
            http = openai.DefaultAsyncHttpxClient(  # a pool at least as large as its share
                limits=_httpx.Limits(max_connections=max(per, 100),
                                     max_keepalive_connections=per))
            self.clients.append(openai.AsyncOpenAI(
                api_key=key, base_url=ep.base_url, max_retries=0, timeout=ep.timeout_s,
                http_client=http))
        self.load = [0] * shards

    @contextlib.asynccontextmanager
    async def slot(self):
        async with self.sem:
            i = min(range(len(self.load)), key=self.load.__getitem__)
            self.load[i] += 1
            try:
                yield self.clients[i]
            finally:
                self.load[i] -= 1

    async def aclose(self) -> None:
        for c in self.clients:
            await c.close()


async def _judge_one(clients: _Clients, ep: Endpoint, req: Request, key: str,
                     usage: Usage) -> Result:
    parse = PARSERS[ep.protocol]
    reasks = ep.unparseable_retries
    while True:
        completion, why = None, None
        for attempt in range(ep.max_retries + 1):
            usage.calls += 1
            try:
                async with clients.slot() as client:
                    completion = await _call(client, ep, req.messages, key)
                break
            except _Retryable as e:
                why = e.why
                if attempt == ep.max_retries:
                    break
                usage.retries += 1
                await asyncio.sleep(e.wait if e.wait is not None else _backoff(ep, attempt))
        if completion is None:
            usage.failures += 1
            return Result(req.key, None, "failed", False,
                          f"{why} (gave up after {ep.max_retries + 1} attempts)")
        usage.prompt_tokens += completion.prompt_tokens
        usage.completion_tokens += completion.completion_tokens
        try:
            score = parse(completion)
        except Unparseable as e:
            if reasks > 0:
                reasks -= 1
                usage.retries += 1
                continue
            usage.unparseable += 1
            return Result(req.key, None, "unparseable", False, str(e))
        return Result(req.key, score, "ok" if score is not None else "low_mass", False)


# ---- cache writes: batched, on a writer thread ----

class _CacheWriter:
    """Collects results on the event loop and commits them in batches on a worker thread.

    At most one batch is being committed at a time; rows arriving meanwhile wait for the next
    one. A batch starts when FLUSH_N rows are pending or FLUSH_S after the oldest pending row
    arrived. `close()` commits what is left (always call it, also after an error). A failed
    commit is raised by the next `add` or by `close`, so a broken cache stops the run as before.
    """

    def __init__(self, cache: JudgeCache, flush_s: float = FLUSH_S, flush_n: int = FLUSH_N):
        self.cache, self.flush_s, self.flush_n = cache, flush_s, flush_n
        self.loop = asyncio.get_running_loop()
        self.pending: list[dict] = []
        self.busy: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.error: BaseException | None = None
        self.oldest = 0.0  # loop time the oldest pending row arrived

    def add(self, row: dict) -> None:
        if self.error is not None:
            raise self.error
        if not self.pending:
            self.oldest = self.loop.time()
        self.pending.append(row)
        if len(self.pending) >= self.flush_n:
            self._kick()
        elif self.timer is None:
            self._schedule()

    def _schedule(self) -> None:
        """Kick when the oldest pending row is FLUSH_S old (now, if it is already)."""
        delay = 0.0 if len(self.pending) >= self.flush_n else \
            max(0.0, self.oldest + self.flush_s - self.loop.time())
        self.timer = self.loop.call_later(delay, self._kick)

    def _kick(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.busy is not None or not self.pending:
            return  # the running commit's callback starts the next batch
        batch, self.pending = self.pending, []
        self.busy = self.loop.run_in_executor(None, self.cache.put_many, batch)
        self.busy.add_done_callback(self._done)

    def _done(self, fut: asyncio.Future) -> None:
        self.busy = None
        if fut.cancelled():  # the executor is shutting down; close() writes synchronously
            return
        if fut.exception() is not None:
            self.error = self.error or fut.exception()
            return
        if self.pending and self.timer is None:
            self._schedule()

    async def close(self) -> None:
        """Commit everything still pending; raise the first commit error, if any."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        busy = self.busy
        if busy is not None:
            # asyncio.wait never cancels `busy`: if we are cancelled here, the thread still commits
            await asyncio.wait([busy])
        if self.pending and self.error is None:
            batch, self.pending = self.pending, []
            self.cache.put_many(batch)  # synchronous: must not be lost
        if self.error is not None:
            raise self.error


# ---- many judgements ----

async def run_requests(endpoint: Endpoint, requests: list[Request], cache: JudgeCache,
                       progress: Callable[[int, int], None] | None = None,
                       identity: dict | None = None) -> tuple[list[Result], Usage]:
    """Judge every request (cache first); results in request order, and what it cost. Before the
    first call the endpoint is checked (`identify`), unless the caller passes its `identity`."""
    usage = Usage()
    total = len(requests)
    results: list[Result | None] = [None] * total
    hits = cache.get_many(r.key for r in requests)
    todo: dict[str, list[int]] = {}  # distinct uncached key -> its request indices
    for i, r in enumerate(requests):
        if r.key in hits:
            results[i] = Result(r.key, hits[r.key]["score"], hits[r.key]["status"], True)
            usage.cache_hits += 1
        else:
            todo.setdefault(r.key, []).append(i)
    done = total - sum(len(ix) for ix in todo.values())
    if progress is not None and done:
        progress(done, total)
    if not todo:
        return results, usage

    key = endpoint.api_key()
    if identity is None:
        await asyncio.to_thread(identify, endpoint)
    clients = _Clients(endpoint, key)
    writer = _CacheWriter(cache)

    async def one(indices: list[int]) -> tuple[list[int], Result]:
        req = requests[indices[0]]
        res = await _judge_one(clients, endpoint, req, key, usage)
        if res.status != "failed":
            writer.add({"key": req.key, "judge_model": endpoint.model,
                        "endpoint": endpoint.url_id, "protocol": endpoint.protocol,
                        "question": req.question,
                        "score": res.score, "status": res.status})
        return indices, res

    tasks = [asyncio.create_task(one(ix)) for ix in todo.values()]
    try:
        for next_done in asyncio.as_completed(tasks):
            indices, res = await next_done
            for i in indices:  # duplicates of one key share its answer
                results[i] = replace(res)
            done += len(indices)
            if progress is not None:
                progress(done, total)
    finally:  # a fatal error (or cancellation) stops the other calls ...
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await clients.aclose()
        finally:  # ... and what was answered is kept, whatever stopped the run
            await writer.close()
    return results, usage


def judge_requests(endpoint: Endpoint, requests: list[Request], cache: JudgeCache,
                   progress: Callable[[int, int], None] | None = None,
                   identity: dict | None = None) -> tuple[list[Result], Usage]:
    """Synchronous `run_requests`."""
    return asyncio.run(run_requests(endpoint, requests, cache, progress, identity))
