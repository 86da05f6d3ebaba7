"""test_hub.py — `%load ORG/NAME[@REVISION]` and `lathe logits ORG/NAME` against a real local HTTP
server that speaks the Hub's protocol (hubserver.py), each test with an empty HF_HOME of its
own (or one a previous step of the same test filled).

What is checked: a first download that loads and gives the same logits as the folder itself;
a second load that makes only the revision call; a commit revision that makes none; the cache
layout huggingface_hub reads (refs, relative symlinks into blobs/ named by ETag, .locks); the
files chosen (nothing else of the repository is fetched); @REVISION; a sharded checkpoint
through its index; the LFS 302 to a CDN on another host (no token sent there); a relative
307 of a renamed repository; HF_HUB_CACHE; the token from HF_TOKEN and from the token file as
"Authorization: Bearer"; the progress bar per file in a cell; an interrupt mid-file (the part
is kept and resumed); huggingface_hub's lock on a blob respected (lathe waits and links the
blob the other tool wrote); two loads at once downloading a blob once.
Bad inputs tried: a gated repository without a token (401: the message names HF_TOKEN and the
model page) and with a token that has no access (403); an unknown repository (401
RepoNotFound) and an unknown revision (404 RevisionNotFound); a connection dropped mid-file
(resumed with a Range request); a partial file left by an earlier run (resumed from its
length); a blob whose bytes do not match its SHA-256 ETag (refused, nothing kept under any
name); HF_HUB_OFFLINE=1 with and without a cached snapshot; an endpoint that refuses
connections, with a complete cached snapshot (used, with a note saying so) and with an
incomplete one (refused, naming what is missing); an API answering 500 (the cache is used);
an X-Linked-Etag that is a path ("../../../escaped": refused, nothing written outside); an API
answer that is not JSON (a captive portal's page); an HF_ENDPOINT that is not a URL; ids that
are not Hub ids (checked in the C unit test, test_hub_unit.c).
"""
import fcntl
import hashlib
import os
import signal
import subprocess
import threading
import time

import pytest

from hubserver import HubServer, Repo, closed_endpoint, folder_files

BUILDDIR = os.environ.get("LATHE_BUILDDIR", os.getcwd())
SRCDIR = os.environ.get("LATHE_SRCDIR", os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
LATHE = os.path.join(BUILDDIR, "lathe")
IDS = "2,17,40,1000,7,311"
TINY = os.path.join(SRCDIR, "models", "tiny")
FLAT = os.path.join(SRCDIR, "tests", "fixtures", "flat")
TF5 = os.path.join(SRCDIR, "tests", "fixtures", "tf5")
# small files lathe takes beside the weights (transformers reads them too)
TINY_EXTRA = {"generation_config.json": b'{"bos_token_id": 2, "eos_token_id": [1, 106]}\n',
              "tokenizer_config.json": b'{"add_bos_token": true}\n'}
TINY_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
              "tokenizer_config.json"]
HF_VARS = ("HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN",
           "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
           "XDG_CACHE_HOME")


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def read(path):
    with open(path, "rb") as f:
        return f.read()


# ---- the server and its repositories ----------------------------------------------------------

@pytest.fixture(scope="module")
def hub():
    s = HubServer()
    tiny = Repo("tiny-org/tiny")
    extra = dict(TINY_EXTRA, **{"README.md": b"# tiny\n", "pytorch_model.bin": b"not read",
                                "original/model.safetensors": b"a subfolder is not read",
                                "unused.safetensors": b"no index names it"})
    s.main = tiny.add_commit(folder_files(TINY, extra))
    s.v1 = tiny.add_commit(folder_files(FLAT), refs=("v1",))
    s.add_repo(tiny)
    sharded = Repo("tiny-org/sharded")
    sharded.add_commit(folder_files(TF5, {"model-extra.safetensors": b"not in the index"}))
    s.add_repo(sharded)
    gated = Repo("gated-org/tiny", gated_token="hf_good")
    gated.add_commit(folder_files(TINY))
    s.add_repo(gated)
    bad = Repo("bad-org/tiny")
    s.bad_blob = bytes(hashlib.sha256(b"%d" % i).digest()[0] for i in range(5000))
    bad.add_commit(folder_files(TINY, {"model.safetensors": s.bad_blob}))
    s.add_repo(bad)
    s.renamed["old-org/tiny"] = "tiny-org/tiny"
    yield s
    s.close()


@pytest.fixture
def home(hub, tmp_path):
    hub.reset_faults()
    hub.clear_log()
    return str(tmp_path / "hf")


def lathe_env(home, endpoint, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k not in HF_VARS}
    env.update({"HF_HOME": home, "HF_ENDPOINT": endpoint, "LATHE_THREADS": "2",
                "OPENBLAS_NUM_THREADS": "1"})
    env.update(extra_env or {})
    return env


def lathe(args, home, endpoint, extra_env=None, timeout=300):
    return subprocess.run([LATHE] + args, capture_output=True, text=True, timeout=timeout,
                          env=lathe_env(home, endpoint, extra_env))


def logits(model, home, endpoint, out, extra_env=None):
    """`lathe logits MODEL`: (exit status, stderr, the .npy bytes or None)."""
    r = lathe(["logits", model, "--ids", IDS, "--out", out], home, endpoint, extra_env)
    return r.returncode, r.stderr, read(out) if r.returncode == 0 else None


def load_cell(model, home, endpoint, tmp_path, extra_env=None):
    """`%load MODEL` in a cell through `lathe run`: (exit status, stdout, stderr)."""
    script = tmp_path / "load.lathe"
    script.write_text("%%load %s\n" % model)
    r = lathe(["run", str(script)], home, endpoint, extra_env)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Logits of the folders loaded directly (no Hub)."""
    d = tmp_path_factory.mktemp("ref")
    out = {}
    for name, path in (("tiny", TINY), ("flat", FLAT), ("tf5", TF5)):
        p = str(d / (name + ".npy"))
        r = lathe(["logits", path, "--ids", IDS, "--out", p], str(d / "nohome"),
                  "http://127.0.0.1:9")
        assert r.returncode == 0, r.stderr
        out[name] = read(p)
    return out


def repo_dir(home, repo_id):
    return os.path.join(home, "hub", "models--" + repo_id.replace("/", "--"))


# ---- downloads ------------------------------------------------------------------------------

def test_first_download_gives_the_folders_logits(hub, home, reference, tmp_path):
    rc, err, npy = logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))
    assert rc == 0, err
    assert npy == reference["tiny"]
    api = hub.requests("api")
    assert [r["path"] for r in api] == ["/api/models/tiny-org/tiny/revision/main"]
    fetched = sorted({r["path"].split("/resolve/%s/" % hub.main)[1]
                      for r in hub.requests("resolve")})
    assert fetched == TINY_FILES
    # the regular files through the relative 307 to the resolve cache, with auth kept
    cached = sorted({r["path"].split("?")[0].rsplit("/", 1)[1]
                     for r in hub.requests("resolve-cache")})
    assert cached == ["config.json", "generation_config.json", "tokenizer_config.json"]
    # the LFS files came from the CDN host, once each
    cdn = [r for r in hub.requests("cdn") if r["method"] == "GET"]
    assert sorted(r["path"].split("?")[0] for r in cdn) == sorted(
        "/cdn/" + sha256(read(os.path.join(TINY, f)))
        for f in ("model.safetensors", "tokenizer.model"))
    assert all(r["host"].startswith("localhost:") for r in cdn)


def test_cache_layout_is_huggingface_hubs(hub, home, tmp_path):
    rc, err, _ = logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))
    assert rc == 0, err
    root = repo_dir(home, "tiny-org/tiny")
    assert sorted(os.listdir(root)) == ["blobs", "refs", "snapshots"]
    assert read(os.path.join(root, "refs", "main")) == hub.main.encode()  # no newline
    snap = os.path.join(root, "snapshots", hub.main)
    assert sorted(os.listdir(snap)) == TINY_FILES
    for name in os.listdir(snap):
        p = os.path.join(snap, name)
        data = TINY_EXTRA[name] if name in TINY_EXTRA else read(os.path.join(TINY, name))
        assert os.path.islink(p)
        link = os.readlink(p)
        # LFS files are named by their SHA-256, the others by their git blob sha1
        lfs = name.endswith((".safetensors", ".model"))
        etag = sha256(data) if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        assert link == "../../blobs/" + etag, (name, link)
        assert read(p) == data
    blobs = os.listdir(os.path.join(root, "blobs"))
    assert not [b for b in blobs if b.endswith(".incomplete")]
    assert len(blobs) == len(TINY_FILES)
    locks = os.path.join(home, "hub", ".locks", "models--tiny-org--tiny")
    assert sorted(os.listdir(locks)) == sorted(b + ".lock" for b in blobs)


def test_second_load_makes_only_the_revision_call(hub, home, reference, tmp_path):
    assert logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))[0] == 0
    hub.clear_log()
    rc, err, npy = logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "b.npy"))
    assert rc == 0, err
    assert npy == reference["tiny"]
    assert [r["kind"] for r in hub.requests()] == ["api"]


def test_commit_revision_in_the_cache_makes_no_request(hub, home, reference, tmp_path):
    assert logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))[0] == 0
    hub.clear_log()
    rc, err, npy = logits("tiny-org/tiny@" + hub.main, home, hub.endpoint,
                          str(tmp_path / "b.npy"))
    assert rc == 0, err
    assert npy == reference["tiny"]
    assert hub.requests() == []


def test_revision_tag(hub, home, reference, tmp_path):
    rc, err, npy = logits("tiny-org/tiny@v1", home, hub.endpoint, str(tmp_path / "a.npy"))
    assert rc == 0, err
    assert npy == reference["flat"]
    root = repo_dir(home, "tiny-org/tiny")
    assert read(os.path.join(root, "refs", "v1")) == hub.v1.encode()
    assert not os.path.exists(os.path.join(root, "refs", "main"))
    assert os.listdir(os.path.join(root, "snapshots")) == [hub.v1]


def test_sharded_checkpoint_through_its_index(hub, home, reference, tmp_path):
    rc, err, npy = logits("tiny-org/sharded", home, hub.endpoint, str(tmp_path / "a.npy"))
    assert rc == 0, err
    assert npy == reference["tf5"]
    names = {r["path"].rsplit("/", 1)[1] for r in hub.requests("resolve")}
    assert "model-extra.safetensors" not in names
    assert {"model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors",
            "model.safetensors.index.json"} <= names


def test_renamed_repository_follows_the_relative_redirect(hub, home, reference, tmp_path):
    rc, err, npy = logits("old-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))
    assert rc == 0, err
    assert npy == reference["tiny"]
    paths = [r["path"] for r in hub.requests("resolve")]
    assert any(p.startswith("/old-org/tiny/resolve/") for p in paths)
    assert any(p.startswith("/tiny-org/tiny/resolve/") for p in paths)
    # stored under the name asked for, as huggingface_hub stores it
    assert os.path.isdir(os.path.join(repo_dir(home, "old-org/tiny"), "snapshots", hub.main))


def test_hf_hub_cache_moves_the_cache(hub, home, tmp_path):
    cache = str(tmp_path / "elsewhere")
    rc, err, _ = logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"),
                        {"HF_HUB_CACHE": cache})
    assert rc == 0, err
    assert os.path.isdir(os.path.join(cache, "models--tiny-org--tiny", "snapshots", hub.main))
    assert not os.path.exists(os.path.join(home, "hub"))


def test_progress_bar_per_file_in_the_cell(hub, home, tmp_path):
    rc, out, err = load_cell("tiny-org/tiny", home, hub.endpoint, tmp_path)
    assert rc == 0, out + err
    assert "tiny-org/tiny: downloading from " + hub.endpoint in out
    assert "%d files downloaded" % len(TINY_FILES) in out
    for name in TINY_FILES:
        assert name + " (KiB) [" in err, err
    size_kib = (os.path.getsize(os.path.join(TINY, "model.safetensors")) + 1023) // 1024
    assert "model.safetensors (KiB) [##############################] %d/%d" % (
        size_kib, size_kib) in err


# ---- tokens and refusals --------------------------------------------------------------------

def test_gated_without_token_names_hf_token_and_the_page(hub, home, tmp_path):
    rc, err, _ = logits("gated-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))
    assert rc == 1
    assert "HF_TOKEN" in err
    assert hub.endpoint + "/gated-org/tiny" in err
    assert "401" in err and "gated" in err
    snaps = os.path.join(repo_dir(home, "gated-org/tiny"), "snapshots")
    assert not os.path.exists(snaps) or not any(
        f.endswith(".safetensors") for _, _, fs in os.walk(snaps) for f in fs)


def test_gated_with_hf_token_sends_bearer_and_not_to_the_cdn(hub, home, reference, tmp_path):
    rc, err, npy = logits("gated-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"),
                          {"HF_TOKEN": "hf_good"})
    assert rc == 0, err
    assert npy == reference["tiny"]
    to_hub = hub.requests("api") + hub.requests("resolve") + hub.requests("resolve-cache")
    assert to_hub and all(r["authorization"] == "Bearer hf_good" for r in to_hub)
    cdn = hub.requests("cdn")
    assert cdn and all(r["authorization"] is None for r in cdn)


def test_token_file_under_hf_home(hub, home, reference, tmp_path):
    os.makedirs(home)
    with open(os.path.join(home, "token"), "w") as f:
        f.write("hf_good\n")
    rc, err, npy = logits("gated-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))
    assert rc == 0, err
    assert npy == reference["tiny"]
    assert all(r["authorization"] == "Bearer hf_good" for r in hub.requests("resolve"))


def test_gated_with_a_token_without_access(hub, home, tmp_path):
    rc, err, _ = logits("gated-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"),
                        {"HF_TOKEN": "hf_other"})
    assert rc == 1
    assert "403" in err and "HF_TOKEN" in err and hub.endpoint + "/gated-org/tiny" in err


def test_unknown_repository(hub, home, tmp_path):
    rc, err, _ = logits("nobody/nothing", home, hub.endpoint, str(tmp_path / "a.npy"))
    assert rc == 1
    assert "nobody/nothing was not found" in err and "HF_TOKEN" in err


def test_unknown_revision(hub, home, tmp_path):
    rc, err, _ = logits("tiny-org/tiny@v9", home, hub.endpoint, str(tmp_path / "a.npy"))
    assert rc == 1
    assert "tiny-org/tiny has no revision 'v9'" in err


# ---- broken transfers -----------------------------------------------------------------------

def test_dropped_connection_is_resumed_with_range(hub, home, reference, tmp_path):
    data = read(os.path.join(TINY, "model.safetensors"))
    digest = sha256(data)
    cut = len(data) // 2
    hub.drop_after[digest] = cut
    rc, err, npy = logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))
    assert rc == 0, err
    assert npy == reference["tiny"]
    gets = [r for r in hub.requests("cdn") if r["path"].startswith("/cdn/" + digest)
            and r["method"] == "GET"]
    assert [r["range"] for r in gets] == [None, "bytes=%d-" % cut]


def test_partial_file_of_an_earlier_run_is_resumed(hub, home, reference, tmp_path):
    data = read(os.path.join(TINY, "model.safetensors"))
    digest = sha256(data)
    blobs = os.path.join(repo_dir(home, "tiny-org/tiny"), "blobs")
    os.makedirs(blobs)
    k = 12345
    with open(os.path.join(blobs, digest + ".incomplete"), "wb") as f:
        f.write(data[:k])
    rc, err, npy = logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))
    assert rc == 0, err
    assert npy == reference["tiny"]
    gets = [r for r in hub.requests("cdn") if r["path"].startswith("/cdn/" + digest)
            and r["method"] == "GET"]
    assert [r["range"] for r in gets] == ["bytes=%d-" % k]
    assert not os.path.exists(os.path.join(blobs, digest + ".incomplete"))


def test_interrupt_mid_download_keeps_the_partial_file(hub, home, reference, tmp_path):
    data = read(os.path.join(TINY, "model.safetensors"))
    digest = sha256(data)
    cut = len(data) // 3
    sent, release = threading.Event(), threading.Event()
    hub.stall_after[digest] = (cut, sent, release)
    script = tmp_path / "load.lathe"
    script.write_text("%load tiny-org/tiny\n")
    part = os.path.join(repo_dir(home, "tiny-org/tiny"), "blobs", digest + ".incomplete")
    p = subprocess.Popen([LATHE, "run", str(script)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=lathe_env(home, hub.endpoint))
    try:
        assert sent.wait(120), "the download never started"
        deadline = time.monotonic() + 120  # until the sent bytes are on disk (no fixed wait)
        while not (os.path.exists(part) and os.path.getsize(part) == cut):
            assert time.monotonic() < deadline and p.poll() is None, "the bytes never arrived"
            time.sleep(0.02)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        release.set()
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1, out + err
    assert "interrupted" in out + err
    assert os.path.getsize(part) == cut
    assert not os.path.exists(part[:-len(".incomplete")])
    assert not os.path.exists(os.path.join(repo_dir(home, "tiny-org/tiny"), "snapshots",
                                           hub.main, "model.safetensors"))
    hub.clear_log()
    rc, err, npy = logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))
    assert rc == 0, err
    assert npy == reference["tiny"]
    gets = [r for r in hub.requests("cdn") if r["method"] == "GET"]
    assert [r["range"] for r in gets] == ["bytes=%d-" % cut]


def test_wrong_checksum_is_refused_and_nothing_kept(hub, home, tmp_path):
    digest = sha256(hub.bad_blob)
    hub.corrupt.add(digest)
    rc, err, _ = logits("bad-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))
    assert rc == 1
    assert "SHA-256" in err and digest in err and "model.safetensors" in err
    root = repo_dir(home, "bad-org/tiny")
    assert not [b for b in os.listdir(os.path.join(root, "blobs")) if b.startswith(digest)]
    snaps = os.path.join(root, "snapshots")
    assert not any("model.safetensors" in fs for _, _, fs in os.walk(snaps))
    # the good bytes afterwards: the same load succeeds
    hub.corrupt.clear()
    rc, err, _ = logits("bad-org/tiny", home, hub.endpoint, str(tmp_path / "b.npy"))
    assert rc == 1 and "SHA-256" not in err  # these bytes are no checkpoint, but they arrived
    assert os.path.exists(os.path.join(root, "blobs", digest))


def test_an_etag_that_is_a_path_is_refused(hub, home, tmp_path):
    hub.linked_etag = '"../../../escaped"'
    rc, err, _ = logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))
    assert rc == 1
    assert "is not a usable blob name" in err
    assert not os.path.exists(os.path.join(home, "escaped"))
    assert not os.path.exists(os.path.join(home, "hub", "escaped"))


def test_an_api_answer_that_is_not_json(hub, home, tmp_path):
    hub.api_body = b"<html>a captive portal</html>"
    rc, err, _ = logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))
    assert rc == 1
    assert "not the Hub's revision answer" in err


def test_an_endpoint_that_is_not_a_url(hub, home, tmp_path):
    rc, err, _ = logits("tiny-org/tiny", home, "huggingface.co", str(tmp_path / "a.npy"))
    assert rc == 1
    assert "HF_ENDPOINT='huggingface.co' is not an http:// or https:// URL" in err


# ---- no Hub ---------------------------------------------------------------------------------

def test_offline_uses_the_cache_without_a_request(hub, home, reference, tmp_path):
    assert logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))[0] == 0
    hub.clear_log()
    rc, out, err = load_cell("tiny-org/tiny", home, hub.endpoint, tmp_path,
                             {"HF_HUB_OFFLINE": "1"})
    assert rc == 0, out + err
    assert "HF_HUB_OFFLINE is set; using the cached snapshot " + hub.main in out
    rc, err, npy = logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "b.npy"),
                          {"HF_HUB_OFFLINE": "1"})
    assert rc == 0 and npy == reference["tiny"]
    assert hub.requests() == []


def test_offline_with_an_empty_cache_is_refused(hub, home, tmp_path):
    rc, err, _ = logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"),
                        {"HF_HUB_OFFLINE": "1"})
    assert rc == 1
    assert "HF_HUB_OFFLINE" in err and "not complete in the Hugging Face cache" in err
    assert hub.requests() == []


def test_unreachable_hub_falls_back_to_a_complete_snapshot(hub, home, reference, tmp_path):
    assert logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))[0] == 0
    sock, dead = closed_endpoint()
    try:
        rc, out, err = load_cell("tiny-org/tiny", home, dead, tmp_path)
        assert rc == 0, out + err
        assert "the Hub at %s could not be reached" % dead in out
        assert "using the cached snapshot %s (revision main)" % hub.main in out
        rc, err, npy = logits("tiny-org/tiny", home, dead, str(tmp_path / "b.npy"))
        assert rc == 0 and npy == reference["tiny"]
    finally:
        sock.close()


def test_unreachable_hub_with_an_incomplete_snapshot_is_refused(hub, home, tmp_path):
    assert logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))[0] == 0
    os.unlink(os.path.join(repo_dir(home, "tiny-org/tiny"), "snapshots", hub.main,
                           "tokenizer.model"))
    sock, dead = closed_endpoint()
    try:
        rc, err, _ = logits("tiny-org/tiny", home, dead, str(tmp_path / "b.npy"))
    finally:
        sock.close()
    assert rc == 1
    assert "could not be reached" in err and "missing: tokenizer.model" in err


def test_server_error_falls_back_to_the_cache(hub, home, reference, tmp_path):
    assert logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))[0] == 0
    hub.api_status = 500
    rc, out, err = load_cell("tiny-org/tiny", home, hub.endpoint, tmp_path)
    assert rc == 0, out + err
    assert "could not be reached (HTTP 500" in out and "using the cached snapshot" in out


def test_missing_file_is_fetched_into_an_existing_snapshot(hub, home, reference, tmp_path):
    """A snapshot another tool filled only partly (no tokenizer.model) is completed."""
    assert logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "a.npy"))[0] == 0
    snap = os.path.join(repo_dir(home, "tiny-org/tiny"), "snapshots", hub.main)
    os.unlink(os.path.join(snap, "tokenizer.model"))
    hub.clear_log()
    rc, err, npy = logits("tiny-org/tiny", home, hub.endpoint, str(tmp_path / "b.npy"))
    assert rc == 0, err and npy == reference["tiny"]
    assert [r["path"].rsplit("/", 1)[1] for r in hub.requests("resolve")] == ["tokenizer.model"]
    # its blob was still there: linked again, not downloaded
    assert hub.requests("cdn") == []


# ---- two tools, one cache -------------------------------------------------------------------

def wait_for(cond, what, proc=None, seconds=120):
    """Polls cond until it holds (a deadline, never a fixed wait a busy machine outruns)."""
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        assert proc is None or proc.poll() is None, what + ": the process ended first"
        time.sleep(0.02)


def heads_of(hub, name):
    return [r for r in hub.requests("resolve") if r["method"] == "HEAD"
            and r["path"].endswith("/" + name)]


def test_waits_for_another_tools_lock_and_uses_its_blob(hub, home, reference, tmp_path):
    """huggingface_hub holds .locks/<folder>/<etag>.lock (filelock: flock) while it writes a
    blob: lathe waits for it, then links the blob the other tool wrote instead of fetching."""
    data = read(os.path.join(TINY, "model.safetensors"))
    digest = sha256(data)
    locks = os.path.join(home, "hub", ".locks", "models--tiny-org--tiny")
    blobs = os.path.join(repo_dir(home, "tiny-org/tiny"), "blobs")
    os.makedirs(locks)
    os.makedirs(blobs)
    fd = os.open(os.path.join(locks, digest + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    out = str(tmp_path / "a.npy")
    p = subprocess.Popen([LATHE, "logits", "tiny-org/tiny", "--ids", IDS, "--out", out],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=lathe_env(home, hub.endpoint))
    try:
        wait_for(lambda: heads_of(hub, "model.safetensors"), "lathe's HEAD", p)
        with open(os.path.join(blobs, digest + ".tmp"), "wb") as f:
            f.write(data)
        os.rename(os.path.join(blobs, digest + ".tmp"), os.path.join(blobs, digest))
        fcntl.flock(fd, fcntl.LOCK_UN)
        _, err = p.communicate(timeout=300)
    finally:
        os.close(fd)
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert read(out) == reference["tiny"]
    assert not [r for r in hub.requests("cdn") if r["path"].startswith("/cdn/" + digest)]


def test_two_loads_at_once_download_a_blob_once(hub, home, reference, tmp_path):
    data = read(os.path.join(TINY, "model.safetensors"))
    digest = sha256(data)
    cut = len(data) // 4
    sent, release = threading.Event(), threading.Event()
    hub.stall_after[digest] = (cut, sent, release)
    procs = []
    try:
        for k in range(2):
            procs.append(subprocess.Popen(
                [LATHE, "logits", "tiny-org/tiny", "--ids", IDS, "--out",
                 str(tmp_path / ("%d.npy" % k))], stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, env=lathe_env(home, hub.endpoint)))
            if k == 0:
                assert sent.wait(120), "the first download never started"
        # the second has asked for the file's metadata; the first holds the blob's lock
        wait_for(lambda: len(heads_of(hub, "model.safetensors")) == 2, "the second HEAD",
                 procs[1])
        release.set()  # the first's transfer breaks here and resumes
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        release.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
    for k, p in enumerate(procs):
        assert p.returncode == 0, errs[k]
        assert read(str(tmp_path / ("%d.npy" % k))) == reference["tiny"]
    gets = [r["range"] for r in hub.requests("cdn")
            if r["path"].startswith("/cdn/" + digest) and r["method"] == "GET"]
    assert gets == [None, "bytes=%d-" % cut]
