"""hubserver.py — a small Hugging Face Hub that speaks the protocol huggingface_hub and lathe use,
for the tests of `%load ORG/NAME[@REVISION]` (tests/hub/test_hub.py). Standard library only.

What it answers, as huggingface.co does:
- GET /api/models/ORG/NAME/revision/REV: {"id", "sha", "siblings": [{"rfilename"}]}; an unknown
  repository is 401 with X-Error-Code: RepoNotFound (the Hub's answer without a token), an
  unknown revision 404 with X-Error-Code: RevisionNotFound.
- HEAD/GET /ORG/NAME/resolve/REV/FILE: a regular file is a relative 307 to
  /api/resolve-cache/models/ORG/NAME/COMMIT/FILE, which answers 200 with ETag = its git blob
  sha1 and X-Repo-Commit (huggingface.co answers so since 2025); an LFS file (*.safetensors, tokenizer.model) is a 302 to the CDN with
  X-Linked-Etag = its SHA-256, X-Linked-Size and X-Repo-Commit. The CDN is the same server
  reached as http://localhost:PORT, another host than the endpoint http://127.0.0.1:PORT, so
  a client that sends its token to the CDN is caught.
- GET /cdn/SHA256: the bytes, honouring Range (206 + Content-Range).
- A gated repository answers resolve with 401 GatedRepo without a token and 403 GatedRepo with
  a token that has no access; its API call is public (as the Hub's is).
- A renamed repository answers with a relative 307 to the new name.
Faults a test switches on: drop the connection after N bytes of a CDN body (once), stall a
body after N bytes until the test releases it (once), serve wrong
bytes for a blob, answer the API with a status. Every request is logged (method, path, the
Authorization and Range headers) for the tests to count.

The server binds port 0 and its port is read back from the socket: no fixed port, no sleep.
"""
import hashlib
import http.server
import json
import os
import socket
import threading
import urllib.parse

LFS_SUFFIXES = (".safetensors", ".model", ".bin")


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, repo_id, gated_token=None):
        self.repo_id = repo_id
        self.commits = {}  # sha -> {filename: bytes}
        self.refs = {}  # name -> sha
        self.gated_token = gated_token  # a gated repo: the token that has access

    def add_commit(self, files, refs=("main",)):
        h = hashlib.sha1(self.repo_id.encode())
        for name in sorted(files):
            h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        sha = h.hexdigest()
        self.commits[sha] = dict(files)
        for r in refs:
            self.refs[r] = sha
        return sha

    def resolve(self, rev):
        if rev in self.commits:
            return rev
        return self.refs.get(rev)


def folder_files(path, extra=None):
    """{name: bytes} of the regular files of a folder (no subfolders), plus extra."""
    out = {}
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if os.path.isfile(p) and name not in ("logits.npy", "reference.json", "README.md"):
            with open(p, "rb") as f:
                out[name] = f.read()
    out.update(extra or {})
    return out


class HubServer:
    def __init__(self):
        self.repos = {}
        self.renamed = {}  # old repo id -> new repo id
        self.blobs = {}  # sha256 -> bytes
        self.log = []
        self.lock = threading.Lock()
        self.reset_faults()
        handler = self._handler_class()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.endpoint = "http://127.0.0.1:%d" % self.port
        self.cdn = "http://localhost:%d" % self.port
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset_faults(self):
        self.drop_after = {}  # sha256 -> byte count at which the next body is cut (once)
        self.stall_after = {}  # sha256 -> (byte count, sent Event, release Event): once, the
        #                        body stops there, sent is set, and it waits for release
        self.corrupt = set()  # sha256 whose bytes are served wrong
        self.api_status = None  # answer every API call with this status
        self.api_body = None  # answer every API call with these bytes (status 200)
        self.linked_etag = None  # the X-Linked-Etag of every LFS file, as sent

    def add_repo(self, repo):
        self.repos[repo.repo_id] = repo
        for files in repo.commits.values():
            for data in files.values():
                self.blobs[hashlib.sha256(data).hexdigest()] = data
        return repo

    def requests(self, kind=None):
        with self.lock:
            return [r for r in self.log if kind is None or r["kind"] == kind]

    def clear_log(self):
        with self.lock:
            self.log.clear()

    def _handler_class(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # quiet: the test log has the requests
                pass

            def do_HEAD(self):
                self.route(head=True)

            def do_GET(self):
                self.route(head=False)

            # ---- helpers ----
            def reply(self, status, headers=(), body=b"", head=False):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def error(self, status, code, message, head):
                self.reply(status, [("X-Error-Code", code), ("X-Error-Message", message),
                                    ("Content-Type", "application/json")],
                           json.dumps({"error": message}).encode(), head)

            def record(self, kind):
                with server.lock:
                    server.log.append({
                        "kind": kind, "method": self.command, "path": self.path,
                        "host": self.headers.get("Host", ""),
                        "authorization": self.headers.get("Authorization"),
                        "range": self.headers.get("Range")})

            def token(self):
                a = self.headers.get("Authorization") or ""
                return a[7:] if a.startswith("Bearer ") else None

            # ---- routes ----
            def route(self, head):
                path = urllib.parse.urlsplit(self.path).path
                parts = [urllib.parse.unquote(p) for p in path.split("/")[1:]]
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
                    self.record("api")
                    return self.api(parts[2] + "/" + parts[3], "/".join(parts[5:]), head)
                if parts[:3] == ["api", "resolve-cache", "models"] and len(parts) >= 7:
                    self.record("resolve-cache")
                    return self.resolve_cache(parts[3] + "/" + parts[4], parts[5],
                                              "/".join(parts[6:]), head)
                if len(parts) >= 5 and parts[2] == "resolve":
                    self.record("resolve")
                    return self.resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]),
                                        head)
                if len(parts) == 2 and parts[0] == "cdn":
                    self.record("cdn")
                    return self.cdn(parts[1], head)
                self.record("other")
                self.error(404, "NotFound", "no such route", head)

            def api(self, repo_id, rev, head):
                if server.api_status:
                    return self.error(server.api_status, "", "the test says so", head)
                if server.api_body is not None:
                    return self.reply(200, [("Content-Type", "application/json")],
                                      server.api_body, head)
                if repo_id in server.renamed:
                    new = server.renamed[repo_id]
                    loc = "/api/models/%s/revision/%s" % (new, urllib.parse.quote(rev, safe=""))
                    return self.reply(307, [("Location", loc)], b"", head)
                repo = server.repos.get(repo_id)
                if repo is None:
                    return self.error(401, "RepoNotFound", "Repository not found", head)
                sha = repo.resolve(rev)
                if sha is None:
                    return self.error(404, "RevisionNotFound", "Invalid rev id: " + rev, head)
                body = json.dumps({"id": repo_id, "sha": sha,
                                   "siblings": [{"rfilename": f}
                                                for f in sorted(repo.commits[sha])]}).encode()
                self.reply(200, [("Content-Type", "application/json")], body, head)

            def resolve(self, repo_id, rev, filename, head):
                if repo_id in server.renamed:
                    new = server.renamed[repo_id]
                    loc = "/%s/resolve/%s/%s" % (new, urllib.parse.quote(rev, safe=""),
                                                 urllib.parse.quote(filename))
                    return self.reply(307, [("Location", loc)], b"", head)
                repo = server.repos.get(repo_id)
                if repo is None:
                    return self.error(401, "RepoNotFound", "Repository not found", head)
                if repo.gated_token is not None and self.token() != repo.gated_token:
                    if self.token() is None:
                        return self.error(401, "GatedRepo",
                                          "Access to model %s is restricted. You must have access "
                                          "to it and be authenticated to access it." % repo_id,
                                          head)
                    return self.error(403, "GatedRepo",
                                      "Access to model %s is restricted and you are not in the "
                                      "authorized list." % repo_id, head)
                sha = repo.resolve(rev)
                if sha is None:
                    return self.error(404, "RevisionNotFound", "Invalid rev id: " + rev, head)
                files = repo.commits[sha]
                if filename not in files:
                    return self.error(404, "EntryNotFound", filename + " does not exist", head)
                data = files[filename]
                common = [("X-Repo-Commit", sha)]
                if filename.endswith(LFS_SUFFIXES):
                    digest = hashlib.sha256(data).hexdigest()
                    # signed like a CDN's links: a query of a few thousand bytes
                    loc = "%s/cdn/%s?Policy=%s&Signature=test" % (server.cdn, digest, "p" * 3000)
                    return self.reply(302, common + [
                        ("Location", loc), ("ETag", '"%s"' % git_blob_sha1(b"pointer " + data[:64])),
                        ("X-Linked-Etag", server.linked_etag or '"%s"' % digest),
                        ("X-Linked-Size", str(len(data)))],
                        b"", head)
                # as huggingface.co does now: a relative 307 to its resolve cache
                loc = "/api/resolve-cache/models/%s/%s/%s?etag=%%22%s%%22" % (
                    repo_id, sha, urllib.parse.quote(filename), git_blob_sha1(data))
                self.reply(307, common + [("Location", loc)], b"", head)

            def resolve_cache(self, repo_id, sha, filename, head):
                repo = server.repos.get(repo_id)
                files = repo.commits.get(sha) if repo else None
                if files is None or filename not in files:
                    return self.error(404, "EntryNotFound", filename + " does not exist", head)
                data = files[filename]
                self.reply(200, [("X-Repo-Commit", sha), ("ETag", '"%s"' % git_blob_sha1(data))],
                           data, head)

            def cdn(self, digest, head):
                data = server.blobs.get(digest)
                if data is None:
                    return self.error(404, "", "no such blob", head)
                if digest in server.corrupt:
                    data = bytes(b ^ 0x5A for b in data)  # same size, other bytes
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    if start >= len(data):
                        return self.reply(416, [("Content-Range", "bytes */%d" % len(data))],
                                          b"", head)
                body = data[start:]
                status = 206 if rng else 200
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"%s"' % digest)
                if rng:
                    self.send_header("Content-Range",
                                     "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
                self.end_headers()
                if head:
                    return
                stall = server.stall_after.pop(digest, None)
                if stall is not None and start < stall[0]:
                    self.wfile.write(body[:stall[0] - start])
                    self.wfile.flush()
                    stall[1].set()
                    stall[2].wait(300)
                    self.close_connection = True
                    return
                cut = server.drop_after.pop(digest, None)
                if cut is not None and start < cut:
                    self.wfile.write(body[:cut - start])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler


def closed_endpoint():
    """An endpoint that refuses connections: a socket bound to a port that never listens (held
    open by the caller, so no other process takes the port meanwhile)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    return s, "http://127.0.0.1:%d" % s.getsockname()[1]
