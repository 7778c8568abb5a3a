"""An OpenAI-compatible chat endpoint on loopback that misbehaves on purpose: it trickles a
fixed reply one word at a time, answers 200 with garbage, or streams nothing. The app's
behaviour against a failing server is what is under test, not any model's text."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackOpenAI:
    """``mode``: "trickle" (one word every ``delay_s``), "garbage", "empty"."""

    def __init__(self, mode: str = "trickle", delay_s: float = 0.2, words: int = 20):
        self.mode, self.delay_s, self.words = mode, delay_s, words
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                if outer.mode == "garbage":
                    payload = b"<html>this is not an OpenAI reply</html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                words = [] if outer.mode == "empty" else [f"w{i} " for i in range(outer.words)]
                try:
                    for word in words:
                        self._chunk({"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
                        time.sleep(outer.delay_s)
                    self._chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                    self._chunk({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(words) * 2,
                                                          "total_tokens": 5 + len(words) * 2}})
                    self._raw(b"data: [DONE]\n\n")
                    self._raw(b"")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _chunk(self, data: dict) -> None:
                data = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "loopback", **data}
                self._raw(f"data: {json.dumps(data)}\n\n".encode())

            def _raw(self, payload: bytes) -> None:
                self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
