"""A model hub on 127.0.0.1 for the tests: serves local folders under repo ids, as two servers do.

* the Hugging Face Hub as ``huggingface_hub`` 0.24 asks it (``HF_ENDPOINT=http://127.0.0.1:PORT``):
  ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}`` answered with ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length``; a missing file is ``404`` with ``X-Error-Code: EntryNotFound``, a missing repo
  ``404`` with ``RepoNotFound``;
* ppdiffusers' / paddlenlp's download server (``PPNLP_ENDPOINT=http://127.0.0.1:PORT``):
  ``HEAD``/``GET /models/community/{repo_id}/{path}``, a plain ``404`` when missing.

Every request is recorded (method, path) so tests can count them. ``python tests/helpers/hub_mimic.py
FOLDER REPO_ID`` serves one folder by hand and prints the two variables to export.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubMimic:
    """``with HubMimic({"some-org/tiny-sd": folder}) as hub: ... hub.url ... hub.requests``"""

    def __init__(self, repos: Dict[str, str]):
        self.repos = {k: os.path.abspath(v) for k, v in repos.items()}
        self.requests: List[Tuple[str, str]] = []
        self.lock = threading.Lock()
        mimic = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                mimic._answer(self, body=False)

            def do_GET(self):
                mimic._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubMimic":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def _locate(self, path: str) -> Tuple[Optional[str], Optional[str], str]:
        """(repo id, file path inside it, server kind) for a request path."""
        parts = [unquote(p) for p in urlsplit(path).path.strip("/").split("/")]
        if parts[:2] == ["models", "community"]:
            kind, parts = "bos", parts[2:]
            for repo in self.repos:
                n = len(repo.split("/"))
                if "/".join(parts[:n]) == repo:
                    return repo, "/".join(parts[n:]), kind
            return None, None, kind
        if len(parts) >= 5 and parts[2] == "resolve":
            return "/".join(parts[:2]), "/".join(parts[4:]), "hf"
        return None, None, "hf"

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        with self.lock:
            self.requests.append((handler.command, handler.path))
        repo, rel, kind = self._locate(handler.path)
        if repo not in self.repos:
            return self._missing(handler, kind, "RepoNotFound")
        file = os.path.join(self.repos[repo], *rel.split("/"))
        if not rel or not os.path.isfile(file):
            return self._missing(handler, kind, "EntryNotFound")
        with open(file, "rb") as f:
            data = f.read()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("Accept-Ranges", "bytes")
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    @staticmethod
    def _missing(handler: BaseHTTPRequestHandler, kind: str, code: str) -> None:
        handler.send_response(404)
        if kind == "hf":
            handler.send_header("X-Error-Code", code)
            handler.send_header("X-Error-Message", f"{code}: {handler.path}")
        handler.send_header("Content-Length", "0")
        handler.end_headers()


if __name__ == "__main__":
    folder, repo_id = sys.argv[1], sys.argv[2]
    with HubMimic({repo_id: folder}) as hub:
        print(f"export HF_ENDPOINT={hub.url} PPNLP_ENDPOINT={hub.url}   # serving {folder} as {repo_id}; Ctrl-C stops")
        try:
            hub.thread.join()
        except KeyboardInterrupt:
            pass
