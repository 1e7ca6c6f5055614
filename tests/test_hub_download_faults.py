"""A hub download cut off half-way (issue 22, section 3).

A local stand-in for the Hugging Face hub (http.server on 127.0.0.1, a free port) serves one tiny
real model repo, `org/tiny`, with the endpoints huggingface_hub 2.x uses for `snapshot_download`:

- GET  /api/models/org/tiny/revision/<rev>        the commit a branch points at (`sha`)
- GET  /api/models/org/tiny/tree/<commit>         the file listing (size, blob id, LFS sha256)
- HEAD /org/tiny/resolve/<commit>/<file>          X-Repo-Commit, ETag / X-Linked-Etag, Content-Length /
                                                  X-Linked-Size (what hf_hub_download checks)
- GET  /org/tiny/resolve/<commit>/<file>          the bytes (206 for a `Range: bytes=N-` resume)

While `hub.cut` names model.safetensors, every GET of it announces the whole file's
Content-Length (or the rest of it, for a resume) and the connection is closed once the first half
of the file has been sent. huggingface_hub 2.4 writes a download to a process-unique
`<etag>.<random>.incomplete` file, retries a cut-off body 5 times, 1 s apart (from byte 0 here:
it reads the body in 10 MB chunks, so nothing of a small file was written; a Range resume of a
larger one would get nothing past the half either), then raises httpx2.RemoteProtocolError and
deletes its temporary file. `hub.short` is the other way a file comes in short: a complete
response holding half the size the HEAD announced (huggingface_hub's size check, no retries).

The real CLIs run against it as subprocesses (HF_ENDPOINT=http://127.0.0.1:PORT, a fresh HF_HOME
under tmp_path, HF_HUB_OFFLINE unset, Xet off) and must exit 2 with one line naming the model and
the cut-off file, leave nothing in the cache that a later run would take as the weights (no blob
named by its etag, no snapshot link, no file holding their first part), refuse the partial
snapshot offline, and succeed once the server serves the whole file.

The server answers at most MAX_REQUESTS requests and is shut down by the fixture (and, failing
that, by a timer); only the loopback address is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from helpers import make_model, read_model, tiny_config

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
EVOLVE = str(BIN / "mergekit-evolve")
MERGEKIT_YAML = str(BIN / "mergekit-yaml")

REPO = "org/tiny"
COMMIT = "5" * 40  # the commit `main` points at on the stand-in hub
WEIGHTS = "model.safetensors"
MAX_REQUESTS = 300  # every run below makes a few dozen at most; past this the server answers 503
SERVER_LIFETIME_S = 900  # the fixture shuts it down; the timer is only the backstop


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class StandInHub:
    """One model repo at one commit, served over HTTP on 127.0.0.1 (see the module docstring)."""

    def __init__(self, repo_id: str, files: dict[str, bytes]):
        self.repo_id = repo_id
        self.files = files
        self.lfs = {name for name in files if name.endswith(".safetensors")}  # served like LFS files on the hub
        self.cut: set[str] = set()  # files whose GETs announce the whole file, then stop half-way
        self.short: set[str] = set()  # files whose GETs are complete responses holding half the file
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._backstop = threading.Timer(SERVER_LIFETIME_S, self.server.shutdown)
        self._backstop.daemon = True

    def __enter__(self) -> "StandInHub":
        self._thread.start()
        self._backstop.start()
        return self

    def __exit__(self, *exc) -> None:
        self._backstop.cancel()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if name in self.lfs else _git_blob_id(data)

    def gets(self, name: str) -> list[str | None]:
        """The Range header of every GET of `name` so far (None: the whole file)."""
        path = f"/{self.repo_id}/resolve/{COMMIT}/{name}"
        with self._lock:
            return [rng for method, p, rng in self.requests if method == "GET" and p == path]

    def paths(self) -> set[str]:
        with self._lock:
            return {p for _, p, _ in self.requests}

    # -- what the hub answers -------------------------------------------------------------------

    def _record(self, method: str, path: str, rng: str | None) -> bool:
        with self._lock:
            self.requests.append((method, path, rng))
            return len(self.requests) <= MAX_REQUESTS

    def _tree(self) -> list[dict]:
        entries = []
        for name, data in sorted(self.files.items()):
            entry = {"type": "file", "path": name, "size": len(data), "oid": _git_blob_id(data)}
            if name in self.lfs:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries

    def _handler_class(self):
        hub = self
        api = f"/api/models/{hub.repo_id}/"
        resolve = re.compile(rf"^/{re.escape(hub.repo_id)}/resolve/([^/]+)/(.+)$")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: a cut-off ends it

            def log_message(self, *args) -> None:  # quiet: the test reads hub.requests
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _send(self, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _json(self, value, body: bool) -> None:
                data = json.dumps(value).encode()
                self._send(200, {"Content-Type": "application/json", "Content-Length": str(len(data))}, data, body)

            def _error(self, status: int, code: str, body: bool) -> None:
                data = json.dumps({"error": code}).encode()
                headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), "X-Error-Code": code}
                self._send(status, headers, data, body)

            def _answer(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                rng = self.headers.get("Range")
                if not hub._record(self.command, path, rng):
                    return self._error(503, "TooManyRequestsForThisTest", body)
                if path.startswith(api + "revision/"):
                    if path[len(api + "revision/"):] not in ("main", COMMIT):
                        return self._error(404, "RevisionNotFound", body)
                    siblings = [{"rfilename": name} for name in sorted(hub.files)]
                    return self._json({"id": hub.repo_id, "sha": COMMIT, "siblings": siblings}, body)
                if path.startswith(api + "tree/"):
                    if path[len(api + "tree/"):] not in ("main", COMMIT):
                        return self._error(404, "RevisionNotFound", body)
                    return self._json(hub._tree(), body)
                match = resolve.match(path)
                if match is None:
                    return self._error(404, "RepoNotFound", body)
                revision, name = match.groups()
                if revision not in ("main", COMMIT):
                    return self._error(404, "RevisionNotFound", body)
                if name not in hub.files:
                    self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT, "Content-Length": "0"},
                               b"", body)
                    return
                self._file(name, rng, body)

            def _file(self, name: str, rng: str | None, body: bool) -> None:
                data = hub.files[name]
                etag = hub.etag(name)
                headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                           "X-Repo-Commit": COMMIT, "ETag": f'"{_git_blob_id(data)}"'}
                if name in hub.lfs:  # the hub names an LFS file by its sha256 and its real size
                    headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
                else:
                    headers["ETag"] = f'"{etag}"'
                start, status = 0, 200
                if body and rng:
                    found = re.fullmatch(r"bytes=(\d+)-", rng.strip())
                    if found is None or int(found.group(1)) >= len(data):
                        return self._error(416, "RangeNotSatisfiable", body)
                    start, status = int(found.group(1)), 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                headers["Content-Length"] = str(len(data) - start)  # the whole (rest of the) file is announced
                if not body:
                    return self._send(status, headers, b"", body)
                end = max(start, len(data) // 2)
                if name in hub.cut:  # ... but the connection ends once the first half has been sent
                    self._send(status, headers, data[start:end], body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if name in hub.short:  # a well-formed response whose file is half the size the HEAD said
                    headers["Content-Length"] = str(end - start)
                    headers.pop("Content-Range", None)
                    return self._send(status, headers, data[start:end], body)
                self._send(status, headers, data[start:], body)

        return Handler


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The model the stand-in hub serves as org/tiny (`hub`), and a fine-tune of it kept local (`ft`)."""
    root = tmp_path_factory.mktemp("hub_models")
    cfg = tiny_config("llama", layers=2)
    hub = make_model(root / "hub_model", cfg, seed=0)
    ft = make_model(root / "ft", cfg, seed=1, base=hub)
    return {"hub": hub, "ft": ft}


@pytest.fixture
def hub(models):
    files = {f.name: f.read_bytes() for f in sorted(models["hub"].iterdir()) if f.is_file()}
    assert WEIGHTS in files and len(files[WEIGHTS]) > 1000
    with StandInHub(REPO, files) as server:
        yield server


@pytest.fixture
def env(hub, tmp_path):
    """The CLIs' environment: huggingface_hub online against the stand-in, a cache of their own."""
    home = tmp_path / "hf_home"
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("HF_", "HUGGINGFACE_")) and k.lower() not in
                   ("transformers_offline", "http_proxy", "https_proxy", "all_proxy")}
    environment.update(
        HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_DOWNLOAD_TIMEOUT="10",
        HF_HUB_ETAG_TIMEOUT="10", HF_DATASETS_OFFLINE="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
    )
    return environment


def _run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def _repo_cache(env: dict) -> Path:
    return Path(env["HF_HUB_CACHE"]) / ("models--" + REPO.replace("/", "--"))


def _half_files(env: dict, data: bytes) -> list[Path]:
    """Files in the cache, other than huggingface_hub's own `.incomplete` temporaries, that hold a
    strict, non-empty beginning of `data`."""
    found = []
    for p in Path(env["HF_HUB_CACHE"]).rglob("*"):
        if p.is_file() and not p.name.endswith(".incomplete"):
            head = p.read_bytes()
            if head and len(head) < len(data) and data.startswith(head):
                found.append(p)
    return found


def assert_no_trusted_half_file(hub: StandInHub, env: dict) -> None:
    """What a later run would trust: the snapshot's model.safetensors and the blob named by its
    etag. Neither exists; no other file holds the first part of the weights either."""
    data = hub.files[WEIGHTS]
    repo = _repo_cache(env)
    pointer = repo / "snapshots" / COMMIT / WEIGHTS
    assert not pointer.exists() and not pointer.is_symlink(), sorted(str(p) for p in repo.rglob("*"))
    assert not (repo / "blobs" / hub.etag(WEIGHTS)).exists()
    assert _half_files(env, data) == []


def assert_one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- mergekit-yaml ----------------------------------------------------------------------------------


def _recipe(path: Path, first: str, second: str) -> Path:
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": first, "parameters": {"weight": 0.6}},
            {"model": second, "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def _merge(recipe: Path, out: Path, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return _run([MERGEKIT_YAML, str(recipe), str(out), "--quiet"], env, cwd)


def _only_hub_paths(hub: StandInHub) -> None:
    """Every request was one of the endpoints above, for org/tiny (nothing else was asked of the hub)."""
    for path in hub.paths():
        assert path.startswith((f"/api/models/{REPO}/revision/", f"/api/models/{REPO}/tree/", f"/{REPO}/resolve/")), path


def test_mergekit_yaml_download_cut_off_half_way_is_one_line_and_never_trusted(hub, env, models, tmp_path):
    data = hub.files[WEIGHTS]
    recipe = _recipe(tmp_path / "hub.yml", REPO, str(models["ft"]))
    hub.cut.add(WEIGHTS)
    proc = _merge(recipe, tmp_path / "out", env, tmp_path)
    line = assert_one_line(proc, "error: model org/tiny: ", f"the download of {WEIGHTS} ", "was cut off",
                           f"expected {len(data)}")
    assert proc.stdout == "" and not (tmp_path / "out").exists(), line
    # huggingface_hub retried (each GET cut off at the same byte), then gave up: a bounded number of tries
    assert 2 <= len(hub.gets(WEIGHTS)) <= 10, hub.gets(WEIGHTS)
    assert_no_trusted_half_file(hub, env)
    # the rest of the snapshot is complete; the files that did arrive are whole
    snapshot = _repo_cache(env) / "snapshots" / COMMIT
    for name, content in hub.files.items():
        if name != WEIGHTS:
            assert (snapshot / name).read_bytes() == content, name

    # offline, a later run does not take the partial snapshot as the model
    offline = _merge(recipe, tmp_path / "out", dict(env, HF_HUB_OFFLINE="1"), tmp_path)
    assert_one_line(offline, "error: model org/tiny: ", "is incomplete", WEIGHTS)
    assert not (tmp_path / "out").exists()

    # online again, the hub now serves the whole file: the merge is the merge of the local model
    hub.cut.clear()
    done = _merge(recipe, tmp_path / "out", env, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (_repo_cache(env) / "snapshots" / COMMIT / WEIGHTS).read_bytes() == data
    assert (_repo_cache(env) / "blobs" / hub.etag(WEIGHTS)).read_bytes() == data
    local = _merge(_recipe(tmp_path / "local.yml", str(models["hub"]), str(models["ft"])), tmp_path / "out_local", env,
                   tmp_path)
    assert local.returncode == 0, local.stderr[-4000:]
    merged, expected = read_model(tmp_path / "out"), read_model(tmp_path / "out_local")
    assert merged.keys() == expected.keys() and merged
    for name, tensor in expected.items():
        assert merged[name].dtype == tensor.dtype and merged[name].equal(tensor), name
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "out_local" / "model.safetensors").read_bytes()
    _only_hub_paths(hub)


def test_mergekit_yaml_hub_serving_half_the_file_is_one_line_and_never_trusted(hub, env, models, tmp_path):
    """The other way a download comes in short: a complete HTTP response holding only half the
    file the HEAD announced (huggingface_hub's size check, no retries)."""
    recipe = _recipe(tmp_path / "hub.yml", REPO, str(models["ft"]))
    hub.short.add(WEIGHTS)
    proc = _merge(recipe, tmp_path / "out", env, tmp_path)
    assert_one_line(proc, "error: model org/tiny: ", f"the download of {WEIGHTS} ", "was cut off",
                    f"should be of size {len(hub.files[WEIGHTS])}")
    assert not (tmp_path / "out").exists()
    assert_no_trusted_half_file(hub, env)
    _only_hub_paths(hub)


# -- mergekit-evolve: the driver downloads the genome's models before any worker starts -------------


def test_mergekit_evolve_download_cut_off_half_way_is_one_line_and_never_trusted(hub, env, models, tmp_path):
    data = hub.files[WEIGHTS]
    search = tmp_path / "search.yml"
    search.write_text(yaml.safe_dump({
        "genome": {"models": [REPO, str(models["ft"])], "merge_method": "linear", "layer_granularity": 1},
        "tasks": ["no_such_task_here"],
        "budget": {"max_fevals": 4},
    }))
    storage = tmp_path / "experiment"
    # no --quiet: huggingface_hub's retry warnings are not shown without -v (progress bars are off here)
    env = dict(env, HF_HUB_DISABLE_PROGRESS_BARS="1")
    hub.cut.add(WEIGHTS)
    proc = _run([EVOLVE, str(search), "--storage-path", str(storage)], env, tmp_path)
    assert_one_line(proc, "error: genome.models[0]: model org/tiny: ", f"the download of {WEIGHTS} ", "was cut off")
    assert proc.stdout == ""
    assert not storage.exists()  # stopped before the experiment directory (and Ray) was started
    assert 2 <= len(hub.gets(WEIGHTS)) <= 10, hub.gets(WEIGHTS)
    assert_no_trusted_half_file(hub, env)

    # the whole file now: the driver's check passes and the search stops only at its (unknown) task
    hub.cut.clear()
    again = _run([EVOLVE, str(search), "--storage-path", str(storage)], env, tmp_path)
    line = assert_one_line(again, "no_such_task_here")
    assert "org/tiny" not in line and "genome.models" not in line, line
    assert (_repo_cache(env) / "snapshots" / COMMIT / WEIGHTS).read_bytes() == data
    assert len(hub.gets(WEIGHTS)) >= 3  # the second run fetched the weights again, whole
    _only_hub_paths(hub)
