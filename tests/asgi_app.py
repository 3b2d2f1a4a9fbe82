"""A Starlette app over :class:`AsyncEmbeddingClient`, served by the asyncio
test under Gunicorn with uvicorn workers: ``POST /embed`` ({"text": ...})
answers the text's vector, ``GET /ping`` answers at once (the event loop's
responsiveness while embeds wait). The client attaches in the lifespan,
after the fork, and closes at shutdown."""

from __future__ import annotations

import contextlib

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from shm_protocol.aio import AsyncEmbeddingClient


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):
    async with await AsyncEmbeddingClient.connect() as client:
        app.state.client = client
        yield


async def embed(request: Request) -> JSONResponse:
    body = await request.json()
    vectors = await request.app.state.client.embed([body["text"]])
    return JSONResponse({"text": body["text"], "vector": vectors[0].tolist()})


async def ping(request: Request) -> PlainTextResponse:
    return PlainTextResponse("pong")


async def health(request: Request) -> JSONResponse:
    return JSONResponse(await request.app.state.client.info())


app = Starlette(routes=[Route("/embed", embed, methods=["POST"]), Route("/ping", ping),
                        Route("/health", health)], lifespan=lifespan)
