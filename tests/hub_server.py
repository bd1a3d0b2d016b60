"""A small Hub-compatible HTTP server for tests: the real ``huggingface_hub`` client talks to it over HTTP.

Only what uploads (``create_repo``, ``upload_folder``) and downloads (``hf_hub_download`` / ``from_pretrained``)
use: repo creation, repo info per revision, preupload (every file "regular", with the remote git blob oid so
unchanged files are skipped client-side), ndjson commits, tree listing, YAML validation and file resolve
(``HEAD``/``GET`` with ``X-Repo-Commit``, ``ETag``, ``Content-Length``). Repos live in memory, on branch ``main``.

It binds 127.0.0.1 only, on a free port, serves from a daemon thread, and caps request bodies.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

MAX_BODY = 64 * 1024 * 1024


def git_blob_oid(data: bytes) -> str:
    """The git SHA-1 of a blob (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self, repo_type: str, repo_id: str, private: bool):
        self.repo_type, self.repo_id, self.private = repo_type, repo_id, private
        first = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        self.commits: list[dict] = [{"oid": self._oid("", first, "initial commit"), "files": first,
                                     "message": "initial commit", "time": time.time()}]

    @staticmethod
    def _oid(parent: str, files: dict, message: str) -> str:
        h = hashlib.sha1(parent.encode() + message.encode())
        for path in sorted(files):
            h.update(path.encode() + git_blob_oid(files[path]).encode())
        return h.hexdigest()

    def snapshot(self, revision: str) -> dict | None:
        if revision in ("main", "HEAD"):
            return self.commits[-1]
        return next((c for c in self.commits if c["oid"] == revision), None)

    def commit(self, message: str, files: dict[str, bytes], deleted: list[str], deleted_folders: list[str]) -> dict:
        new = dict(self.commits[-1]["files"])
        for p in deleted:
            new.pop(p, None)
        for d in deleted_folders:
            for p in [p for p in new if p.startswith(d.rstrip("/") + "/")]:
                new.pop(p)
        new.update(files)
        c = {"oid": self._oid(self.commits[-1]["oid"], new, message), "files": new, "message": message,
             "time": time.time()}
        self.commits.append(c)
        return c


class HubState:
    def __init__(self):
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []

    def repo(self, repo_type: str, repo_id: str) -> _Repo | None:
        return self.repos.get((repo_type, repo_id))


_PREFIX = {"models": "model", "datasets": "dataset", "spaces": "space"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState = None  # set per server

    def log_message(self, *args):  # quiet
        pass

    # ------------------------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None,
              head: bool = False):
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
            ctype = "application/json"
        else:
            ctype = "application/octet-stream"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, head: bool = False):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers=headers, head=head)

    def _base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------------------------ verbs
    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str):
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        query = parse_qs(url.query)
        with self.state.lock:
            self.state.requests.append((method, url.path))
        try:
            if parts[:1] == ["api"]:
                return self._api(method, parts[1:], query)
            return self._resolve(method, parts)
        except Exception as e:  # noqa: BLE001 - report to the client rather than drop the connection
            self._error(500, None, f"{type(e).__name__}: {e}")

    # ------------------------------------------------------------------------------------ /api
    def _api(self, method: str, parts: list[str], query: dict):
        st = self.state
        if method == "POST" and parts == ["repos", "create"]:
            req = json.loads(self._body() or b"{}")
            repo_type = req.get("type") or "model"
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else f"user/{req['name']}"
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            url = f"{self._base()}/{prefix}{repo_id}"
            with st.lock:
                if st.repo(repo_type, repo_id) is not None:  # the client reads `url` from the 409 too
                    return self._send(409, {"error": "You already created this repo", "url": url})
                st.repos[(repo_type, repo_id)] = _Repo(repo_type, repo_id, req.get("visibility") == "private")
            return self._send(200, {"url": url, "name": repo_id})
        if method == "POST" and parts == ["validate-yaml"]:
            self._body()
            return self._send(200, {"errors": [], "warnings": []})
        if len(parts) < 3 or parts[0] not in _PREFIX:
            return self._error(404, None, f"unknown endpoint /api/{'/'.join(parts)}")
        repo_type, repo_id, rest = _PREFIX[parts[0]], f"{parts[1]}/{parts[2]}", parts[3:]
        repo = st.repo(repo_type, repo_id)
        if repo is None:
            self._body()
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        if method == "GET" and (not rest or rest[0] == "revision"):
            snap = repo.snapshot(rest[1] if len(rest) > 1 else "main")
            if snap is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            return self._send(200, {
                "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": snap["oid"],
                "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(snap["time"])),
                "siblings": [{"rfilename": p} for p in sorted(snap["files"])],
            })
        if method == "POST" and rest[:1] == ["preupload"]:
            req = json.loads(self._body() or b"{}")
            snap = repo.snapshot(unquote(rest[1]) if len(rest) > 1 else "main")
            files = snap["files"] if snap else {}
            return self._send(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None}
                for f in req.get("files", [])]})
        if method == "POST" and rest[:1] == ["commit"]:
            if (len(rest) > 1 and unquote(rest[1]) != "main") or "create_pr" in query:
                self._body()
                return self._error(400, None, "this test server commits to main only")
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            message, files, deleted, deleted_folders = "", {}, [], []
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value.get("summary", "")
                elif key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    deleted.append(value["path"])
                elif key == "deletedFolder":
                    deleted_folders.append(value["path"])
                else:
                    return self._error(400, None, f"unsupported commit operation {key!r} (no LFS/xet here)")
            with st.lock:
                c = repo.commit(message, files, deleted, deleted_folders)
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            return self._send(200, {"success": True, "commitOid": c["oid"],
                                    "commitUrl": f"{self._base()}/{prefix}{repo_id}/commit/{c['oid']}"})
        if method == "GET" and rest[:1] == ["tree"]:
            snap = repo.snapshot(rest[1] if len(rest) > 1 else "main")
            if snap is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            base = "/".join(rest[2:]).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            entries, dirs = [], set()
            for path, data in sorted(snap["files"].items()):
                if base and not path.startswith(base + "/"):
                    continue
                rel = path[len(base) + 1:] if base else path
                if "/" in rel and not recursive:
                    dirs.add((f"{base}/" if base else "") + rel.split("/")[0])
                    continue
                if recursive:
                    segs = rel.split("/")[:-1]
                    for i in range(1, len(segs) + 1):
                        dirs.add((f"{base}/" if base else "") + "/".join(segs[:i]))
                entries.append({"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path})
            if base and not entries and not dirs:
                return self._error(404, "EntryNotFound", f"{base} does not exist")
            entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                        for d in sorted(dirs)]
            return self._send(200, entries)
        return self._error(404, None, f"unknown endpoint /api/{'/'.join(parts)}")

    # ------------------------------------------------------------------------------------ /resolve
    def _resolve(self, method: str, parts: list[str]):
        head = method == "HEAD"
        repo_type = "model"
        if parts[:1] in (["datasets"], ["spaces"]):
            repo_type, parts = _PREFIX[parts[0]], parts[1:]
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, None, "not found", head=head)
        repo_id, revision, path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
        repo = self.state.repo(repo_type, repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
        snap = repo.snapshot(revision)
        if snap is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        if path not in snap["files"]:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {revision}", head=head)
        data = snap["files"][path]
        self._send(200, body=data, head=head, headers={
            "X-Repo-Commit": snap["oid"], "ETag": f'"{git_blob_oid(data)}"', "Accept-Ranges": "bytes"})


class HubServer:
    """``with HubServer() as hub: HfApi(endpoint=hub.url)``. ``hub.state`` exposes repos and the request log."""

    def __init__(self):
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.timeout = 30
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def commits(self, repo_id: str, repo_type: str = "model") -> list[dict]:
        repo = self.state.repo(repo_type, repo_id)
        return [] if repo is None else list(repo.commits)

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        repo = self.state.repo(repo_type, repo_id)
        return {} if repo is None else dict(repo.commits[-1]["files"])
