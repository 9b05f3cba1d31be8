"""``spotlane serve``'s app on a real uvicorn server, in a thread, on 127.0.0.1 only."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from pipeline.runtime import Runtime
from pipeline.serve.app import create_app
from tests.support import free_port

__all__ = ["chat_lines", "serving"]


@contextmanager
def serving(runtime: Runtime) -> Iterator[str]:
    """The base URL (``http://127.0.0.1:PORT/v1``) of the app over ``runtime``, while the block runs."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


def chat_lines(path: Path, rows: int, model: str, **body: Any) -> Path:
    """An OpenAI batch file of ``rows`` chat requests, ``req-00000``..."""
    with path.open("w") as out:
        for i in range(rows):
            line = {
                "custom_id": f"req-{i:05d}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": f"question {i}"}], **body},
            }
            out.write(json.dumps(line) + "\n")
    return path
