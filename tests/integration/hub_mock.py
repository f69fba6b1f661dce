"""A local stand-in for the few Hugging Face Hub endpoints create_repo + upload_folder call, on 127.0.0.1,
recording every request. preupload answers "regular" so files travel inline (base64) in the commit ndjson."""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_REQUESTS = 200  # a bounded server: more than this many requests is a bug in the client loop


class HubMock:
    def __init__(self, status: int = 200):
        self.status = status
        self.requests: list[dict] = []
        self.files: dict[str, bytes] = {}
        mock = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, code, payload):
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                mock.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                      "body": body})
                if len(mock.requests) > MAX_REQUESTS:
                    return self._answer(500, {"error": "too many requests"})
                if mock.status != 200:
                    return self._answer(mock.status, {"error": "Invalid credentials in Authorization header"})
                path = self.path.split("?")[0]
                endpoint = f"http://127.0.0.1:{mock.port}"
                if path == "/api/repos/create":
                    repo = json.loads(body)
                    return self._answer(200, {"url": f"{endpoint}/{repo['organization']}/{repo['name']}"})
                if path == "/api/validate-yaml":
                    return self._answer(200, {})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._answer(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})
                if "/commit/" in path:
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            value = item["value"]
                            mock.files[value["path"]] = base64.b64decode(value["content"])
                    repo = path[len("/api/models/"):path.index("/commit/")]
                    return self._answer(200, {"commitUrl": f"{endpoint}/{repo}/commit/{'a' * 40}",
                                              "commitOid": "a" * 40, "pullRequestUrl": None})
                return self._answer(404, {"error": f"not mocked: {path}"})

            do_GET = do_POST = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
