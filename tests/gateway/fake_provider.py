"""A fake provider for the gateway tests and the benchmark: a Starlette app that counts every
request it receives and records its headers and body.

Served on a free loopback port by uvicorn in a background thread (:class:`FakeProvider`), or
as a process for the benchmark: ``python tests/gateway/fake_provider.py --port N``.

Usage figures are fixed so tests can compute exact charges: chat completions report
``PROMPT_TOKENS`` in and ``min(bound, COMPLETION_TOKENS)`` out; Anthropic messages report
``ANTHROPIC_USAGE``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

PROMPT_TOKENS = 12
COMPLETION_TOKENS = 7
ANTHROPIC_USAGE = {"input": 20, "cache_read": 100, "cache_write": 10, "output": 15}
EMBED_TOKENS = 8
RESPONSES_USAGE = {"input": 30, "output": 9}
HEADER_COST = "0.0123"


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Recorder:
    """Everything the provider received, thread-safe (the server runs on its own thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: list[Seen] = []

    def add(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    @property
    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._seen)

    def count_path(self, path: str) -> int:
        return sum(1 for s in self.requests if s.path == path)

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()


def _bound(body: dict[str, Any]) -> int:
    values = [body[k] for k in ("max_tokens", "max_completion_tokens", "max_output_tokens") if k in body]
    return min(values) if values else COMPLETION_TOKENS


def chat_usage(body: dict[str, Any]) -> dict[str, int]:
    out = min(_bound(body), COMPLETION_TOKENS)
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": out, "total_tokens": PROMPT_TOKENS + out}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def _chat_stream(body: dict[str, Any], *, delay: float = 0.0, chunks: int = 3) -> AsyncIterator[bytes]:
    model = body.get("model", "gpt-test")
    for i in range(chunks):
        if delay:
            await asyncio.sleep(delay)
        yield _sse({"id": "c1", "object": "chat.completion.chunk", "model": model,
                    "choices": [{"index": 0, "delta": {"content": f"w{i} "}}]})  # fmt: skip
    yield _sse({"id": "c1", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})  # fmt: skip
    if (body.get("stream_options") or {}).get("include_usage"):
        yield _sse({"id": "c1", "object": "chat.completion.chunk", "model": model, "choices": [],
                    "usage": chat_usage(body)})  # fmt: skip
    yield b"data: [DONE]\n\n"


def _anthropic_usage_start() -> dict[str, int]:
    return {
        "input_tokens": ANTHROPIC_USAGE["input"],
        "cache_read_input_tokens": ANTHROPIC_USAGE["cache_read"],
        "cache_creation_input_tokens": ANTHROPIC_USAGE["cache_write"],
        "output_tokens": 1,
    }


async def _anthropic_stream(body: dict[str, Any]) -> AsyncIterator[bytes]:
    model = body.get("model", "claude-test")

    def event(name: str, obj: Any) -> bytes:
        return f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode()

    yield event("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [],
        "usage": _anthropic_usage_start()}})  # fmt: skip
    yield event("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": {"type": "text", "text": ""}})  # fmt: skip
    yield event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": "Hello"}})  # fmt: skip
    yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                  "usage": {"output_tokens": 5}})  # fmt: skip
    yield event("message_delta", {"type": "message_delta", "delta": {},
                                  "usage": {"output_tokens": ANTHROPIC_USAGE["output"]}})  # fmt: skip
    yield event("message_stop", {"type": "message_stop"})


class CutStream(Exception):
    """Raised inside a streaming body: uvicorn drops the connection mid-response."""


def build_app(recorder: Recorder) -> Starlette:
    async def record(request: Request) -> tuple[bytes, dict[str, Any]]:
        raw = await request.body()
        recorder.add(Seen(request.method, request.url.path, request.url.query,
                          {k.lower(): v for k, v in request.headers.items()}, raw))  # fmt: skip
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {}
        return raw, parsed if isinstance(parsed, dict) else {}

    async def chat(request: Request) -> Response:
        _, body = await record(request)
        if body.get("stream"):
            return StreamingResponse(_chat_stream(body), media_type="text/event-stream")
        return JSONResponse({"id": "c1", "object": "chat.completion", "model": body.get("model"),
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                             "usage": chat_usage(body)})  # fmt: skip

    async def responses(request: Request) -> Response:
        _, body = await record(request)
        return JSONResponse({"id": "r1", "object": "response", "model": body.get("model"), "output": [],
                             "usage": {"input_tokens": RESPONSES_USAGE["input"],
                                       "output_tokens": RESPONSES_USAGE["output"]}})  # fmt: skip

    async def embeddings(request: Request) -> Response:
        _, body = await record(request)
        usage = {"prompt_tokens": EMBED_TOKENS, "total_tokens": EMBED_TOKENS}
        return JSONResponse({"object": "list", "model": body.get("model"), "data": [], "usage": usage})

    async def messages(request: Request) -> Response:
        _, body = await record(request)
        if body.get("stream"):
            return StreamingResponse(_anthropic_stream(body), media_type="text/event-stream")
        usage = _anthropic_usage_start() | {"output_tokens": ANTHROPIC_USAGE["output"]}
        return JSONResponse({"id": "msg_1", "type": "message", "model": body.get("model"),
                             "content": [{"type": "text", "text": "Hello"}], "usage": usage})  # fmt: skip

    async def geocode(request: Request) -> Response:
        await record(request)
        return JSONResponse({"lat": 48.85, "lon": 2.35, "q": request.query_params.get("q")})

    async def translate(request: Request) -> Response:
        _, body = await record(request)
        return JSONResponse({"translated": str(body.get("text", ""))[::-1]})

    async def knowledge(request: Request) -> Response:
        await record(request)
        return JSONResponse({"entities": ["a", "b"]})

    async def redirect(request: Request) -> Response:
        await record(request)
        return Response(b"moved", status_code=302, headers={"location": "/elsewhere"})

    async def fail_usage(request: Request) -> Response:
        _, body = await record(request)
        return JSONResponse({"error": {"message": "boom"}, "usage": chat_usage(body)}, status_code=500)

    async def fail_plain(request: Request) -> Response:
        await record(request)
        return JSONResponse({"error": {"message": "boom"}}, status_code=500)

    async def cut(request: Request) -> Response:
        await record(request)

        async def stream() -> AsyncIterator[bytes]:
            yield _sse({"id": "c1", "choices": [{"index": 0, "delta": {"content": "par"}}]})
            await asyncio.sleep(0.01)
            raise CutStream("cut before usage")

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def slow_cut(request: Request) -> Response:
        await record(request)

        async def stream() -> AsyncIterator[bytes]:
            for i in range(6):
                yield _sse({"id": "c1", "choices": [{"index": 0, "delta": {"content": f"w{i}"}}]})
                await asyncio.sleep(0.05)
            raise CutStream("cut before usage, slowly")

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def slow(request: Request) -> Response:
        _, body = await record(request)
        return StreamingResponse(_chat_stream(body, delay=0.05, chunks=12), media_type="text/event-stream")

    async def cost(request: Request) -> Response:
        await record(request)
        return JSONResponse({"ok": True}, headers={"x-cost": HEADER_COST})

    async def echo_headers(request: Request) -> Response:
        await record(request)
        # a careless upstream that echoes what it got, and tries to speak for the authority
        return JSONResponse({"ok": True}, headers={"x-paymaster-charged": "0.00", "set-cookie": "sid=1"})

    async def anything(request: Request) -> Response:
        await record(request)
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/geocode", geocode, methods=["GET"]),
            Route("/translate", translate, methods=["POST"]),
            Route("/kg/query", knowledge, methods=["GET", "POST"]),
            Route("/redirect", redirect, methods=["GET", "POST"]),
            Route("/v1/fail/usage", fail_usage, methods=["POST"]),
            Route("/v1/fail/plain", fail_plain, methods=["POST"]),
            Route("/v1/cut/chat/completions", cut, methods=["POST"]),
            Route("/v1/slow/chat/completions", slow, methods=["POST"]),
            Route("/v1/slowcut/chat/completions", slow_cut, methods=["POST"]),
            Route("/cost", cost, methods=["GET", "POST"]),
            Route("/echo", echo_headers, methods=["GET", "POST"]),
            Route("/{rest:path}", anything, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ]
    )


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def closed_port() -> int:
    """A loopback port nothing listens on."""
    sock = free_socket()
    port = int(sock.getsockname()[1])
    sock.close()
    return port


class ServerThread:
    """An ASGI app served by uvicorn (uvloop, httptools) on a free loopback port, in a thread."""

    def __init__(self, app: Any, *, lifespan: str = "off") -> None:
        import uvicorn

        self.sock = free_socket()
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(app, log_level="warning", lifespan=lifespan, timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            threading.Event().wait(0.01)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


class FakeProvider(ServerThread):
    def __init__(self) -> None:
        self.recorder = Recorder()
        super().__init__(build_app(self.recorder))

    @property
    def count(self) -> int:
        return self.recorder.count

    @property
    def requests(self) -> list[Seen]:
        return self.recorder.requests


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    uvicorn.run(
        "fake_provider:app" if args.workers > 1 else build_app(Recorder()),
        host="127.0.0.1",
        port=args.port,
        workers=args.workers,
        log_level="warning",
        loop="uvloop",
        http="httptools",
        access_log=False,
        timeout_keep_alive=30,
    )


app = build_app(Recorder())

if __name__ == "__main__":
    main()
