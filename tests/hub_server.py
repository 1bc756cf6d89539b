"""A local stand-in for the Hub's HTTP API, far enough for huggingface_hub's `create_repo` and `create_commit`.

It speaks the routes the real client calls (`POST /api/repos/create`, `POST /api/validate-yaml` (a card's front
matter must parse as a YAML mapping), `POST /api/{type}s/{repo}/preupload/{rev}`,
`POST /api/{type}s/{repo}/commit/{rev}` with an NDJSON body), answers every file "regular" (its bytes travel base64
inside the commit, so no LFS or Xet storage is needed) and records each request: method, path, headers, body, and
the files of each commit decoded. Any other route answers 404 and is recorded too, so a test sees it.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HubState:
    requests: list[Request] = field(default_factory=list)
    repos: dict[str, dict] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)
    cards: list[str] = field(default_factory=list)
    """README.md texts sent to `/api/validate-yaml`."""
    fail_commits: int = 0
    """Answer this many commits with 500 before accepting them."""


def _handler(state: HubState, endpoint: list[str]):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _reply(self, code: int, payload: dict | None = None):
            body = json.dumps(payload or {}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.requests.append(Request("POST", self.path, dict(self.headers), body))
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts[:3] == ["api", "repos", "create"]:
                req = json.loads(body)
                repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                private = req.get("private", req.get("visibility") == "private" if "visibility" in req else None)
                state.repos.setdefault(repo_id, {"type": req.get("type") or "model", "private": private})
                return self._reply(200, {"url": f"{endpoint[0]}/{repo_id}", "name": repo_id})
            if parts[:2] == ["api", "validate-yaml"]:  # the card's front matter, as the Hub checks it
                content = json.loads(body)["content"]
                state.cards.append(content)
                if not content.startswith("---\n") or "\n---" not in content[4:]:
                    return self._reply(400, {"errors": [{"message": "README.md has no YAML front matter"}]})
                try:
                    meta = yaml.safe_load(content[4 : content.index("\n---", 4)])
                except yaml.YAMLError as e:
                    return self._reply(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
                if not isinstance(meta, dict):
                    return self._reply(400, {"errors": [{"message": "the front matter is not a mapping"}]})
                return self._reply(200, {"errors": [], "warnings": []})
            if len(parts) >= 6 and parts[0] == "api" and parts[4] in ("preupload", "commit"):
                repo_id = f"{parts[2]}/{parts[3]}"
                if repo_id not in state.repos:
                    return self._reply(404, {"error": f"Repository not found: {repo_id}"})
                if parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._reply(200, {"files": modes, "commitOid": "0" * 40})
                if state.fail_commits:
                    state.fail_commits -= 1
                    return self._reply(500, {"error": "Internal Error"})
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                files = {
                    line["value"]["path"]: base64.b64decode(line["value"]["content"])
                    for line in lines
                    if line["key"] == "file"
                }
                state.commits.append(
                    {"repo_id": repo_id, "kind": parts[1], "summary": header["summary"], "files": files}
                )
                oid = f"{len(state.commits):040x}"
                return self._reply(200, {"commitUrl": f"{endpoint[0]}/{repo_id}/commit/{oid}", "commitOid": oid})
            return self._reply(404, {"error": f"no route {self.path}"})

        def do_GET(self):  # noqa: N802
            state.requests.append(Request("GET", self.path, dict(self.headers), b""))
            return self._reply(404, {"error": f"no route {self.path}"})

    return Handler


class LocalHub:
    """`with LocalHub() as hub:` serves on 127.0.0.1 (a free port) in a thread; `hub.endpoint` is its URL."""

    def __init__(self):
        self.state = HubState()
        self._endpoint: list[str] = [""]
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state, self._endpoint))
        self.endpoint = self._endpoint[0] = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
