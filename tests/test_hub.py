"""Hub publishing: what `publish` uploads, and loading the published pipeline through a fake Hub on 127.0.0.1.

The fake Hub is a small HTTP server that implements the few endpoints `huggingface_hub` calls: `hf_hub_download`
(HEAD and GET `/{repo_id}/resolve/{revision}/{filename}`), `model_info` (GET `/api/models/{repo_id}`), and for
`publish`, `create_repo`, README validation, `preupload` and `commit`. Nothing leaves the machine.
"""

import base64
import functools
import hashlib
import inspect
import json
import re
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from diffusers.utils import dynamic_modules_utils
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_api
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import _http

import pipeline_syncdiffusion
from syncdiffusion_utils.hub import model_card, model_repo_card, pipeline_source, publish, publish_model
from syncdiffusion_utils.testing import save_tiny_pipeline


SYNC_PARAMETERS = [
    "stride",
    "sync_weight",
    "sync_decay_rate",
    "sync_freq",
    "sync_thres",
    "sync_mode",
    "sync_gradient",
    "sync_reuse_noise",
    "sync_decoder",
    "sync_lpips_size",
    "sync_gradient_checkpointing",
]


DATASET = "datasets/"  # dataset repos are stored under this prefix
COMMUNITY_MIRROR = DATASET + "diffusers/community-pipelines-mirror"


def pipeline_file_bytes():
    return Path(pipeline_syncdiffusion.__file__).read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# A fake Hub
# ---------------------------------------------------------------------------------------------------------------


class FakeHub:
    """In-memory model repos served over HTTP on 127.0.0.1; `token`, if set, is required for writes."""

    def __init__(self, token=None):
        self.token = token
        self.repos = {}  # repo_id -> {"sha", "files": {path: bytes}, "private", "commits": [...]}
        self.requests = []  # (method, path) of every request, in order
        self.unhandled = []
        self.lock = threading.Lock()
        self.salt = uuid.uuid4().hex  # commit hashes differ between fake hubs (and dynamic module names with them)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def _new_sha(self, repo_id, files):
        digest = hashlib.sha1(f"{self.salt}/{repo_id}/{len(self.requests)}".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + files[path])
        return digest.hexdigest()

    def add_repo(self, repo_id, files, private=False):
        with self.lock:
            self.repos[repo_id] = {"sha": None, "files": dict(files), "private": private, "commits": []}
            self.repos[repo_id]["sha"] = self._new_sha(repo_id, files)
        return self.repos[repo_id]["sha"]

    def requested(self, method, path):
        return (method, path) in self.requests


def _make_handler(hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers after shutdown

        def log_message(self, *args):  # keep pytest output clean
            pass

        # -- helpers ------------------------------------------------------------------------------------------
        def _send(self, status, body=b"", headers=None, content_type="application/json"):
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status, code=None, message="error"):
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers)

        def _body(self):
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _authorized(self):
            return hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _repo(self, repo_id, revision="main"):
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
            elif revision not in ("main", repo["sha"]):
                self._error(404, "RevisionNotFound", "Invalid rev id")
                repo = None
            return repo

        # -- routes -------------------------------------------------------------------------------------------
        def _route(self):
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            if self.command == "GET" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)):
                return self._tree(*m.groups())
            if self.command == "GET" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)):
                return self._model_info(m.group(1), m.group(2) or "main")
            if self.command in ("GET", "HEAD") and (m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)):
                return self._resolve(*m.groups())
            if self.command in ("GET", "HEAD") and (
                m := re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            ):
                return self._resolve(DATASET + m.group(1), m.group(2), m.group(3))
            if self.command == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(self._body()))
            if self.command == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(self._body()))
            if self.command == "POST" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)):
                return self._preupload(m.group(1), m.group(2), json.loads(self._body()))
            if self.command == "POST" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)):
                return self._commit(m.group(1), m.group(2), self._body())
            hub.unhandled.append((self.command, path))
            self._error(404, message=f"fake hub: no route for {self.command} {path}")

        do_GET = do_HEAD = do_POST = _route

        def _model_info(self, repo_id, revision):
            if (repo := self._repo(repo_id, revision)) is None:
                return
            siblings = [{"rfilename": name} for name in sorted(repo["files"])]
            info = {"id": repo_id, "modelId": repo_id, "sha": repo["sha"], "private": repo["private"], "tags": []}
            self._send(200, {**info, "siblings": siblings})

        def _tree(self, repo_id, revision):
            """`list_repo_tree(recursive=True)`, which `snapshot_download` uses: every file, one page."""
            if (repo := self._repo(repo_id, revision)) is None:
                return
            entries = [
                {"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                for name, content in sorted(repo["files"].items())
            ]
            self._send(200, entries)

        def _resolve(self, repo_id, revision, filename):
            if (repo := self._repo(repo_id, revision)) is None:
                return
            headers = {"X-Repo-Commit": repo["sha"]}
            if filename not in repo["files"]:
                return self._send(404, {"error": "Entry not found"}, {**headers, "X-Error-Code": "EntryNotFound"})
            content = repo["files"][filename]
            headers["ETag"] = '"' + hashlib.sha1(content).hexdigest() + '"'
            self._send(200, content, headers, content_type="text/plain; charset=utf-8")

        def _create_repo(self, payload):
            if not self._authorized():
                return self._error(401, message="Invalid username or password.")
            repo_id = f"{payload['organization']}/{payload['name']}"
            url = f"{hub.url}/{repo_id}"
            if repo_id in hub.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            hub.add_repo(repo_id, {}, private=payload.get("visibility") == "private")
            self._send(200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex})

        def _validate_yaml(self, payload):
            text = payload["content"]
            match = re.match(r"---\n(.*?)\n---\n", text, re.S)
            try:
                metadata = yaml.safe_load(match.group(1)) if match else None
            except yaml.YAMLError as err:
                return self._send(400, {"errors": [{"message": str(err)}]})
            if not isinstance(metadata, dict):
                return self._send(400, {"errors": [{"message": "no YAML metadata"}]})
            self._send(200, {"errors": [], "warnings": []})

        def _preupload(self, repo_id, revision, payload):
            if not self._authorized():
                return self._error(401, message="Invalid username or password.")
            if self._repo(repo_id, revision) is None:
                return
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]]
            self._send(200, {"files": files})

        def _commit(self, repo_id, revision, body):
            if not self._authorized():
                return self._error(401, message="Invalid username or password.")
            if (repo := self._repo(repo_id, revision)) is None:
                return
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            if not lines or lines[0]["key"] != "header":
                return self._error(400, message="commit payload must start with a header")
            files = dict(repo["files"])
            for line in lines[1:]:
                value = line["value"]
                if line["key"] != "file" or value.get("encoding") != "base64":
                    return self._error(400, message=f"fake hub: unsupported commit operation {line['key']}")
                files[value["path"]] = base64.b64decode(value["content"])
            with hub.lock:
                repo["files"] = files
                repo["sha"] = hub._new_sha(repo_id, files)
                repo["commits"].append(
                    {"summary": lines[0]["value"]["summary"], "paths": [line["value"]["path"] for line in lines[1:]]}
                )
            sha = repo["sha"]
            self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True})

    return Handler


def _client_with_timeout():
    client = _http.default_client_factory()
    client.timeout = 30.0  # the default client waits forever
    return client


def _set_client_factory(factory):
    """huggingface_hub >= 1 (httpx) takes a client factory; older versions (requests) time out by themselves."""
    if hasattr(_http, "default_client_factory"):
        from huggingface_hub import set_client_factory

        set_client_factory(factory or _http.default_client_factory)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Start a fake Hub and point huggingface_hub and diffusers (and their caches) at it, then stop it."""
    hub = FakeHub(token="hf_fake_write_token").start()
    home = tmp_path / "hf_home"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    # huggingface_hub and diffusers read these at import time: patch the module attributes too.
    monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)
    url_template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url_template)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)  # `huggingface_hub.model_info` is bound to this instance
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(home / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # diffusers appends its modules cache
    monkeypatch.chdir(tmp_path)  # so no local folder named like the repo id can be picked up
    modules_before = set(sys.modules)
    _set_client_factory(_client_with_timeout)
    try:
        yield hub
    finally:
        _set_client_factory(None)
        hub.stop()
        for name in set(sys.modules) - modules_before:
            if name.startswith("diffusers_modules"):
                del sys.modules[name]


def load_from_hub(model_dir, repo_id):
    pipe = DiffusionPipeline.from_pretrained(str(model_dir), custom_pipeline=repo_id, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_tiny_generation(pipe):
    images = pipe("a cat", height=64, width=128, num_inference_steps=2, sync_weight=0, output_type="np").images
    assert images.shape == (1, 64, 128, 3)


# ---------------------------------------------------------------------------------------------------------------
# publish with a recording client
# ---------------------------------------------------------------------------------------------------------------


class RecordingApi:
    """Records `create_repo` and `create_commit` calls the way `HfApi` would receive them."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            with op.as_file() as f:
                files[op.path_in_repo] = f.read()
        self.calls.append(("create_commit", repo_id, files, kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}")


def test_publish_uploads_pipeline_and_model_card_in_one_commit():
    api = RecordingApi()
    url = publish("someone/syncdiffusion", token="hf_token", private=True, api=api)

    assert [call[0] for call in api.calls] == ["create_repo", "create_commit"]
    _, repo_id, kwargs = api.calls[0]
    assert repo_id == "someone/syncdiffusion"
    assert kwargs == {"exist_ok": True, "private": True, "token": "hf_token"}

    _, repo_id, files, kwargs = api.calls[1]
    assert repo_id == "someone/syncdiffusion"
    assert kwargs == {"commit_message": "Upload SyncDiffusion custom pipeline", "token": "hf_token"}
    assert sorted(files) == ["README.md", "pipeline.py"]
    assert files["pipeline.py"] == pipeline_file_bytes()
    assert files["README.md"] == model_card("someone/syncdiffusion").encode()
    assert url == f"https://huggingface.co/someone/syncdiffusion/commit/{'0' * 40}"


def test_pipeline_source_is_the_pipeline_file():
    assert pipeline_source().encode("utf-8") == pipeline_file_bytes()
    assert "class SyncDiffusionPipeline(" in pipeline_source()


def test_model_card_contents():
    card = model_card("someone/syncdiffusion")

    metadata = yaml.safe_load(re.match(r"---\n(.*?)\n---\n", card, re.S).group(1))
    assert metadata["library_name"] == "diffusers"
    assert metadata["license"] == "apache-2.0"
    assert {"diffusers", "text-to-image", "panorama", "stable-diffusion", "syncdiffusion"} <= set(metadata["tags"])

    assert 'custom_pipeline="someone/syncdiffusion"' in card
    assert "trust_remote_code=True" in card
    assert '"stabilityai/stable-diffusion-2-base"' in card
    assert "2306.05178" in card and "StableDiffusionPanoramaPipeline" in card
    assert "@article{lee2023syncdiffusion," in card

    # Every SyncDiffusion argument of the pipeline has a row: its actual default and its docstring's description.
    call = pipeline_syncdiffusion.SyncDiffusionPipeline.__call__
    signature = inspect.signature(call).parameters
    expected = {name for name in signature if name == "stride" or name.startswith("sync_")}
    table = re.findall(r"^\| `(\w+)` \| (.*?) \| (.*) \|$", card, re.M)
    rows = {name: (default, meaning) for name, default, meaning in table}
    assert set(SYNC_PARAMETERS) <= expected
    assert set(rows) == expected
    docstring = " ".join(call.__doc__.split())
    for name in expected:
        default, meaning = rows[name]
        value = signature[name].default
        assert default == (f'`"{value}"`' if isinstance(value, str) else f"`{value!r}`"), name
        assert meaning and " ".join(meaning.split()[:5]) in docstring, name
    assert "`sync_weight` | `20.0` | Step size" in card


@pytest.mark.parametrize("repo_id", ["syncdiffusion", "a/b/c", "", "someone/", "some one/x", "someone/x..y", None])
def test_publish_rejects_invalid_repo_id(repo_id):
    api = RecordingApi()
    with pytest.raises(ValueError, match="namespace/name"):
        publish(repo_id, api=api)
    assert api.calls == []


# ---------------------------------------------------------------------------------------------------------------
# Through the fake Hub
# ---------------------------------------------------------------------------------------------------------------


def test_custom_pipeline_loads_from_hub(fake_hub, tmp_path):
    repo_id = "syncdiffusion-test/syncdiffusion"
    marker = uuid.uuid4().hex
    served = pipeline_file_bytes() + f'\nSERVED_BY_FAKE_HUB = "{marker}"\n'.encode()
    sha = fake_hub.add_repo(repo_id, {"pipeline.py": served})
    model_dir = save_tiny_pipeline(tmp_path / "model")

    pipe = load_from_hub(model_dir, repo_id)

    assert type(pipe).__name__ == "SyncDiffusionPipeline"
    assert type(pipe) is not pipeline_syncdiffusion.SyncDiffusionPipeline
    module = sys.modules[type(pipe).__module__]
    assert module.SERVED_BY_FAKE_HUB == marker
    module_file = Path(module.__file__)
    assert module_file.name == "pipeline.py" and module_file.parent.name == sha
    assert module_file.read_bytes() == served
    assert fake_hub.requested("HEAD", f"/{repo_id}/resolve/main/pipeline.py")
    assert fake_hub.requested("GET", f"/{repo_id}/resolve/main/pipeline.py")
    assert fake_hub.requested("GET", f"/api/models/{repo_id}")
    check_tiny_generation(pipe)


def test_publish_then_load_through_fake_hub(fake_hub, tmp_path):
    repo_id = "syncdiffusion-test/published"

    url = publish(repo_id, token=fake_hub.token, private=True, commit_message="first")

    repo = fake_hub.repos[repo_id]
    assert repo["private"] is True
    assert repo["commits"] == [{"summary": "first", "paths": ["pipeline.py", "README.md"]}]
    assert repo["files"] == {"pipeline.py": pipeline_file_bytes(), "README.md": model_card(repo_id).encode()}
    assert url == f"{fake_hub.url}/{repo_id}/commit/{repo['sha']}"

    pipe = load_from_hub(save_tiny_pipeline(tmp_path / "model"), repo_id)
    assert type(pipe).__name__ == "SyncDiffusionPipeline"
    module_file = Path(sys.modules[type(pipe).__module__].__file__)
    assert module_file.parent.name == repo["sha"]
    assert module_file.read_bytes() == pipeline_file_bytes()
    assert fake_hub.requested("GET", f"/{repo_id}/resolve/main/pipeline.py")
    check_tiny_generation(pipe)

    # Publishing again to the existing repo adds a commit.
    publish(repo_id, token=fake_hub.token, commit_message="second")
    assert [commit["summary"] for commit in repo["commits"]] == ["first", "second"]


def test_publish_without_credentials_explains_how_to_log_in(fake_hub):
    with pytest.raises(HfHubHTTPError, match="hf auth login") as excinfo:
        publish("syncdiffusion-test/unauthorized")
    assert excinfo.value.response.status_code == 401
    assert "HF_TOKEN" in str(excinfo.value)
    assert "syncdiffusion-test/unauthorized" not in fake_hub.repos


# ---------------------------------------------------------------------------------------------------------------
# Saved pipelines, model repos and the community name, through the fake Hub
# ---------------------------------------------------------------------------------------------------------------

CLASS_NAME = ["syncdiffusion", "SyncDiffusionPipeline"]
SMALL = {"height": 64, "width": 128, "num_inference_steps": 2, "sync_thres": 1, "output_type": "np"}


def images(pipe, lpips_module):
    pipe.set_perceptual_loss(lpips_module)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of a beach", generator=torch.Generator().manual_seed(0), **SMALL).images


def folder_files(folder):
    return {
        path.relative_to(folder).as_posix(): path.read_bytes() for path in Path(folder).rglob("*") if path.is_file()
    }


def check_loads_back(repo_id, pipe, lpips_module):
    """Through `DiffusionPipeline` (the repo's own `syncdiffusion.py`) and through the class: the same images."""
    expected = images(pipe, lpips_module)
    remote = DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)
    module_file = Path(sys.modules[type(remote).__module__].__file__)
    assert module_file.name == "syncdiffusion.py" and module_file.read_bytes() == pipeline_file_bytes()
    # Same weights and code on the same CPU: bit-identical (measured max difference 0). The installed class loads
    # the repo too (its images: test_loading.py).
    np.testing.assert_array_equal(images(remote, lpips_module), expected)
    assert (
        type(pipeline_syncdiffusion.SyncDiffusionPipeline.from_pretrained(repo_id))
        is pipeline_syncdiffusion.SyncDiffusionPipeline
    )


def test_push_to_hub_then_load_back(fake_hub, pipe, lpips_module, tmp_path):
    repo_id = "syncdiffusion-test/pushed"

    pipe.save_pretrained(str(tmp_path / "local"), push_to_hub=True, repo_id=repo_id, token=fake_hub.token)

    files = fake_hub.repos[repo_id]["files"]
    assert files["syncdiffusion.py"] == pipeline_file_bytes()
    assert json.loads(files["model_index.json"])["_class_name"] == CLASS_NAME
    assert {name for name in files if name.endswith(".safetensors")} == {
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    }
    check_loads_back(repo_id, pipe, lpips_module)


def test_publish_model_then_load_back(fake_hub, pipe, lpips_module, tmp_path):
    repo_id = "syncdiffusion-test/panorama-tiny"

    url = publish_model(pipe, repo_id, base_model="someone/tiny-sd", token=fake_hub.token, commit_message="model")

    repo = fake_hub.repos[repo_id]
    assert [commit["summary"] for commit in repo["commits"]] == ["model"]
    assert url == f"{fake_hub.url}/{repo_id}/commit/{repo['sha']}"
    card = repo["files"]["README.md"].decode()
    assert card == model_repo_card(repo_id, "someone/tiny-sd")
    assert "base_model: someone/tiny-sd" in card
    assert f'DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)' in card
    # Exactly what `save_pretrained` writes, plus the card.
    pipe.save_pretrained(tmp_path / "saved")
    assert {**folder_files(tmp_path / "saved"), "README.md": card.encode()} == repo["files"]
    check_loads_back(repo_id, pipe, lpips_module)


def plain_model_repo(fake_hub, folder, repo_id="syncdiffusion-test/plain-sd"):
    """A plain Stable Diffusion model repo (no pipeline code), like stabilityai/stable-diffusion-2-base."""
    fake_hub.add_repo(repo_id, folder_files(save_tiny_pipeline(folder)))
    return repo_id


@pytest.mark.parametrize("released", [True, False], ids=["release", "main"])
def test_community_name_loads_from_the_mirror(fake_hub, tmp_path, monkeypatch, released):
    """`custom_pipeline="syncdiffusion"` on a plain model: diffusers' community mirror, `v<version>/` or `main/`."""
    import diffusers

    version = diffusers.__version__
    served = {
        f"v{version}/syncdiffusion.py": pipeline_file_bytes() + b'\nSERVED_FROM = "release"\n',
        "main/syncdiffusion.py": pipeline_file_bytes() + b'\nSERVED_FROM = "main"\n',
    }
    fake_hub.add_repo(COMMUNITY_MIRROR, served)
    # diffusers asks PyPI which releases exist, to pick `v<version>/` or `main/`: answered here, offline.
    monkeypatch.setattr(dynamic_modules_utils, "get_diffusers_versions", lambda: [version] if released else [])
    repo_id = plain_model_repo(fake_hub, tmp_path / "plain")

    pipe = DiffusionPipeline.from_pretrained(repo_id, custom_pipeline="syncdiffusion")  # no trust_remote_code

    module = sys.modules[type(pipe).__module__]
    assert (
        type(pipe).__name__ == "SyncDiffusionPipeline"
        and type(pipe) is not pipeline_syncdiffusion.SyncDiffusionPipeline
    )
    assert module.SERVED_FROM == ("release" if released else "main")
    folder = f"v{version}" if released else "main"
    assert fake_hub.requested(
        "GET", f"/datasets/diffusers/community-pipelines-mirror/resolve/main/{folder}/syncdiffusion.py"
    )
    check_tiny_generation(pipe)


# ---------------------------------------------------------------------------------------------------------------
# The command: publish --model, --model CHECKPOINT.safetensors
# ---------------------------------------------------------------------------------------------------------------


def test_publish_command_uploads_a_model_repo(fake_hub, tmp_path, capsys):
    from syncdiffusion_utils.cli import main

    repo_id = "syncdiffusion-test/panorama-plain"
    model = save_tiny_pipeline(tmp_path / "plain")

    assert main(["publish", repo_id, "--model", str(model), "--token", fake_hub.token]) == 0

    files = fake_hub.repos[repo_id]["files"]
    assert files["syncdiffusion.py"] == pipeline_file_bytes()
    assert files["README.md"].decode() == model_repo_card(repo_id, str(model))
    assert (
        files["unet/diffusion_pytorch_model.safetensors"]
        == (model / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    )
    assert f"published {repo_id}: " in capsys.readouterr().out
    assert type(DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)).__name__ == "SyncDiffusionPipeline"

    assert main(["publish", "not-a-repo-id", "--model", str(model)]) == 2  # checked before loading anything
    assert "namespace/name" in capsys.readouterr().err


def test_single_file_checkpoint_in_the_command(fake_hub, tmp_path, capsys):
    """`--model x.safetensors`: diffusers infers the base model (SD 1.5 here) and reads its configs from the Hub."""
    from test_loading import write_single_file

    from syncdiffusion_utils.cli import main
    from syncdiffusion_utils.testing import tiny_pipeline

    pipe = tiny_pipeline(lpips_module=False)
    checkpoint = write_single_file(pipe, tmp_path / "tiny.safetensors")
    configs = {
        name: data
        for name, data in folder_files(save_tiny_pipeline(tmp_path / "plain")).items()
        if not name.endswith(".safetensors")
    }
    fake_hub.add_repo("stable-diffusion-v1-5/stable-diffusion-v1-5", configs)
    output = tmp_path / "single.png"

    args = ["a lake", "--model", str(checkpoint), "--height", "64", "--width", "128", "--steps", "2"]
    assert main(args + ["--sync-weight", "0", "-o", str(output)]) == 0

    assert f"wrote {output}" in capsys.readouterr().out
    served = [path for method, path in fake_hub.requests if method == "GET" and "/resolve/" in path]
    assert any(path.startswith("/stable-diffusion-v1-5/") and path.endswith("/unet/config.json") for path in served)
    assert main(args + ["--model", str(tmp_path / "missing.safetensors"), "-o", str(output)]) == 1
    assert "no such checkpoint file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Every pipeline class: its own file and its own parameters (SDXL, ControlNet)
# ---------------------------------------------------------------------------------------------------------------


def xl_class():
    from pipeline_syncdiffusion_xl import SyncDiffusionXLPipeline

    return SyncDiffusionXLPipeline


def controlnet_class():
    from pipeline_syncdiffusion_controlnet import SyncDiffusionControlNetPipeline

    return SyncDiffusionControlNetPipeline


def flux_class():
    from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline

    return SyncDiffusionFluxPipeline


def klein_class():
    from pipeline_syncdiffusion_flux2 import SyncDiffusionFlux2KleinPipeline

    return SyncDiffusionFlux2KleinPipeline


def z_image_class():
    from pipeline_syncdiffusion_z_image import SyncDiffusionZImagePipeline

    return SyncDiffusionZImagePipeline


def parameter_rows(card):
    return {name: default for name, default, _ in re.findall(r"^\| `(\w+)` \| (.*?) \| (.*) \|$", card, re.M)}


def check_card_is_the_classs(card, pipeline_class):
    """The card's parameter table is `pipeline_class.__call__`'s (names and defaults), and it names that class."""
    signature = inspect.signature(pipeline_class.__call__).parameters
    expected = {name for name in signature if name in ("window_size", "stride") or name.startswith("sync_")}
    rows = parameter_rows(card)
    assert set(rows) == expected
    for name in expected:
        value = signature[name].default
        assert rows[name] == (f'`"{value}"`' if isinstance(value, str) else f"`{value!r}`"), name
    assert f"`{pipeline_class.__name__}`" in card
    assert "`SyncDiffusionPipeline`" not in card  # no SD-only text left in another class's card


@pytest.mark.parametrize(
    "pipeline_class",
    [xl_class, controlnet_class, flux_class, klein_class, z_image_class],
    ids=["sdxl", "controlnet", "flux", "flux2", "z-image"],
)
def test_publish_uploads_the_given_classs_file_and_parameters(pipeline_class):
    pipeline_class = pipeline_class()
    api = RecordingApi()

    publish("someone/sync-other", pipeline_class=pipeline_class, api=api)

    _, _, files, _ = api.calls[1]
    source = Path(inspect.getsourcefile(pipeline_class)).read_bytes()
    assert files["pipeline.py"] == source and source != pipeline_file_bytes()
    card = files["README.md"].decode()
    assert card == model_card("someone/sync-other", pipeline_class)
    check_card_is_the_classs(card, pipeline_class)
    metadata = yaml.safe_load(re.match(r"---\n(.*?)\n---\n", card, re.S).group(1))
    assert 'custom_pipeline="someone/sync-other"' in card and "2306.05178" in card
    if pipeline_class is xl_class():
        assert parameter_rows(card)["stride"] == "`None`"  # SDXL picks an eighth of its window; SD's is 8
        assert '"stabilityai/stable-diffusion-xl-base-1.0"' in card and "height=1024, width=4096" in card
        assert "stable-diffusion-xl" in metadata["tags"] and "StableDiffusionPanoramaPipeline" not in card
    elif pipeline_class is flux_class():
        rows = parameter_rows(card)
        assert rows["window_size"] == rows["stride"] == "`None`"  # FLUX's 1024-pixel window, a quarter of it
        assert '"black-forest-labs/FLUX.1-dev"' in card and "height=1024, width=4096" in card
        assert "torch_dtype=torch.bfloat16" in card and "DDIMScheduler" not in card  # flow matching, its own
        assert "`num_inference_steps=28`, `guidance_scale=3.5`" in card and "`FluxPipeline`" in card
        assert "flux" in metadata["tags"] and "tuned for Stable Diffusion 2, not for FLUX" in card
    elif pipeline_class in (klein_class(), z_image_class()):
        rows = parameter_rows(card)
        assert rows["window_size"] == rows["stride"] == "`None`"  # the 1024-pixel window, a quarter of it
        assert "height=1024" in card and "width=4096" in card and 'view_batch_size="auto"' in card
        assert "torch_dtype=torch.bfloat16" in card and "DDIMScheduler" not in card  # flow matching, its own
        assert max(len(line) for line in card.split("```python")[1].split("```")[0].splitlines()) <= 119
        if pipeline_class is klein_class():
            # FLUX.2-klein-4B is step-distilled: its own 4 steps without guidance in the usage; a base model's
            # 50 steps with guidance 4.0 are the class's defaults.
            assert '"black-forest-labs/FLUX.2-klein-4B"' in card and "`Flux2KleinPipeline`" in card
            assert "num_inference_steps=4,\n" in card and "guidance_scale=1.0,\n" in card
            assert "`num_inference_steps=50`, `guidance_scale=4.0`" in card
            assert "flux2" in metadata["tags"] and "not for FLUX.2" in card
        else:
            # Z-Image-Turbo's 8 steps without guidance in the usage; ZImagePipeline's 50 and 5.0 the defaults.
            assert '"Tongyi-MAI/Z-Image-Turbo"' in card and "`ZImagePipeline`" in card
            assert "num_inference_steps=8,\n" in card and "guidance_scale=0.0,\n" in card
            assert "`num_inference_steps=50`, `guidance_scale=5.0`" in card
            assert "z-image" in metadata["tags"] and "not for Z-Image" in card
    else:
        assert "ControlNetModel.from_pretrained(" in card and "controlnet=controlnet" in card
        assert "image=depth" in card and "height=512" not in card  # the panorama takes the condition's size
        assert "controlnet" in metadata["tags"]


def test_publish_refuses_a_class_that_is_not_a_syncdiffusion_pipeline():
    from diffusers import StableDiffusionPipeline

    api = RecordingApi()
    with pytest.raises(ValueError, match="StableDiffusionPipeline is not a SyncDiffusion pipeline"):
        publish("someone/sync", pipeline_class=StableDiffusionPipeline, api=api)
    assert api.calls == []


def test_a_subclass_publishes_its_own_file_with_its_familys_card(tmp_path, monkeypatch):
    module = tmp_path / "my_pipeline.py"
    module.write_text(
        "from pipeline_syncdiffusion import SyncDiffusionPipeline\n\n\n"
        "class MyPanorama(SyncDiffusionPipeline):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from my_pipeline import MyPanorama

    api = RecordingApi()
    publish("someone/mine", pipeline_class=MyPanorama, api=api)
    files = api.calls[1][2]
    assert files["pipeline.py"] == module.read_bytes()
    assert (
        "`MyPanorama`" in files["README.md"].decode()
        and "StableDiffusionPanoramaPipeline" in files["README.md"].decode()
    )


def saved_source(folder):
    """The pipeline file a saved folder's `model_index.json` names, as bytes."""
    name = json.loads((Path(folder) / "model_index.json").read_text())["_class_name"][0]
    return (Path(folder) / f"{name}.py").read_bytes()


def test_export_of_an_sdxl_pipeline_writes_its_file_and_card(tmp_path):
    from syncdiffusion_utils.hub import export
    from syncdiffusion_utils.testing import tiny_xl_pipeline

    pipe = tiny_xl_pipeline(lpips_module=False)
    folder = tmp_path / "panorama-xl"

    export(pipe, folder, base_model="someone/tiny-sdxl")

    assert saved_source(folder) == Path(inspect.getsourcefile(xl_class())).read_bytes()
    card = (folder / "README.md").read_text()
    assert card == model_repo_card("panorama-xl", "someone/tiny-sdxl", xl_class())
    check_card_is_the_classs(card, xl_class())
    assert "height=1024, width=4096" in card and "base_model: someone/tiny-sdxl" in card


def test_publish_model_of_a_controlnet_pipeline_uploads_its_file_and_card(tmp_path):
    from syncdiffusion_utils.hub import export
    from syncdiffusion_utils.testing import make_tiny_controlnet, tiny_pipeline

    sd = tiny_pipeline(lpips_module=False)
    pipe = controlnet_class()(**sd.components, controlnet=make_tiny_controlnet(sd.unet))

    class FolderApi(RecordingApi):
        def upload_folder(self, repo_id, folder_path, **kwargs):
            self.calls.append(("upload_folder", repo_id, folder_files(folder_path), kwargs))
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}")

    api = FolderApi()
    publish_model(pipe, "someone/panorama-control", base_model="someone/tiny-sd", api=api)

    _, _, files, _ = api.calls[1]
    name = json.loads(files["model_index.json"])["_class_name"][0]
    assert files[f"{name}.py"] == Path(inspect.getsourcefile(controlnet_class())).read_bytes()
    assert "controlnet/config.json" in files
    card = files["README.md"].decode()
    assert card == model_repo_card("someone/panorama-control", "someone/tiny-sd", controlnet_class())
    check_card_is_the_classs(card, controlnet_class())
    assert "from diffusers.utils import load_image" in card and "image=load_image(" in card
    export(pipe, tmp_path / "exported", base_model="someone/tiny-sd", repo_id="someone/panorama-control")
    assert (tmp_path / "exported" / "README.md").read_text() == card


# ---------------------------------------------------------------------------------------------------------------
# FLUX.1: published and loaded through the fake Hub, a model repo, and `--model black-forest-labs/FLUX.1-dev`
# ---------------------------------------------------------------------------------------------------------------

FLUX_SMALL = {"window_size": 64, "height": 64, "width": 128, "num_inference_steps": 2, "max_sequence_length": 16}


def flux_images(pipe, lpips_module, **kwargs):
    pipe.set_perceptual_loss(lpips_module)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe("a photo of a beach", generator=generator, output_type="np", **FLUX_SMALL, **kwargs).images


def test_publish_flux_then_load_it_as_a_custom_pipeline_through_fake_hub(fake_hub, tmp_path, lpips_module):
    from syncdiffusion_utils.testing import save_tiny_flux_pipeline

    repo_id = "syncdiffusion-test/flux"
    publish(repo_id, pipeline_class=flux_class(), token=fake_hub.token)

    source = Path(inspect.getsourcefile(flux_class())).read_bytes()
    assert fake_hub.repos[repo_id]["files"]["pipeline.py"] == source
    folder = save_tiny_flux_pipeline(tmp_path / "flux")
    pipe = load_from_hub(folder, repo_id)
    assert type(pipe).__name__ == "SyncDiffusionFluxPipeline" and type(pipe) is not flux_class()
    assert Path(sys.modules[type(pipe).__module__].__file__).read_bytes() == source
    # The served file makes the installed class's panorama from the same folder, synchronized (same weights, same
    # CPU: bit-identical, measured; an in-memory tiny FLUX differs from its reloaded folder by up to 6e-5).
    expected = flux_images(flux_class().from_pretrained(folder), lpips_module, sync_thres=1)
    np.testing.assert_array_equal(flux_images(pipe, lpips_module, sync_thres=1), expected)


def test_publish_model_of_a_flux_pipeline_then_load_back(fake_hub, tmp_path, lpips_module):
    from syncdiffusion_utils.testing import tiny_flux_pipeline

    repo_id = "syncdiffusion-test/flux-panorama"
    pipe = tiny_flux_pipeline(pipeline_class=flux_class(), lpips_module=False)
    publish_model(pipe, repo_id, base_model="someone/tiny-flux", token=fake_hub.token)

    files = fake_hub.repos[repo_id]["files"]
    assert files["syncdiffusion_flux.py"] == Path(inspect.getsourcefile(flux_class())).read_bytes()
    assert json.loads(files["model_index.json"])["_class_name"] == ["syncdiffusion_flux", "SyncDiffusionFluxPipeline"]
    card = files["README.md"].decode()
    assert card == model_repo_card(repo_id, "someone/tiny-flux", flux_class())
    check_card_is_the_classs(card, flux_class())
    assert f'from_pretrained("{repo_id}", trust_remote_code=True, torch_dtype=torch.bfloat16)' in card
    assert "import torch\n" in card
    remote = DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)
    assert type(remote).__name__ == "SyncDiffusionFluxPipeline" and type(remote) is not flux_class()
    installed = flux_class().from_pretrained(repo_id)
    assert type(installed) is flux_class()
    # The repo's own file and the installed class: the same panorama (bit-identical, measured).
    np.testing.assert_array_equal(flux_images(remote, lpips_module), flux_images(installed, lpips_module))


def test_the_command_picks_the_flux_class_for_a_flux_hub_model(fake_hub, tmp_path, capsys, monkeypatch):
    """`--model black-forest-labs/FLUX.1-dev`: its `model_index.json` names FluxPipeline (a tiny one is served)."""
    from syncdiffusion_utils import loading
    from syncdiffusion_utils.cli import main
    from syncdiffusion_utils.testing import save_tiny_flux_pipeline

    repo_id = "black-forest-labs/FLUX.1-dev"
    fake_hub.add_repo(repo_id, folder_files(save_tiny_flux_pipeline(tmp_path / "flux")))
    classes = []
    original = flux_class().__call__

    @functools.wraps(original)
    def call(self, *args, **kwargs):
        classes.append((type(self), type(self.scheduler).__name__, kwargs["max_sequence_length"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(flux_class(), "__call__", call)
    assert loading.pipeline_class_of(repo_id) is flux_class()
    output = tmp_path / "flux.png"
    # One view of FLUX.1's own 1024-pixel window, one step, few text tokens: the tiny transformer in seconds.
    args = ["a lake", "--model", repo_id, "--height", "1024", "--width", "1024", "--steps", "1", "--sync-weight", "0"]
    assert main(args + ["--max-sequence-length", "16", "-o", str(output)]) == 0
    assert classes == [(flux_class(), "FlowMatchEulerDiscreteScheduler", 16)]
    assert f"wrote {output} (1024x1024 pixels" in capsys.readouterr().out
    assert fake_hub.requested("GET", f"/{repo_id}/resolve/main/model_index.json")


# ---------------------------------------------------------------------------------------------------------------
# FLUX.2 [klein] and Z-Image: published and loaded through the fake Hub, a model repo, their Hub ids
# ---------------------------------------------------------------------------------------------------------------

TRANSFORMER_SMALL = {
    "window_size": 64,
    "height": 64,
    "width": 128,
    "num_inference_steps": 2,
    "max_sequence_length": 16,
}


def transformer_images(pipe, lpips_module, **kwargs):
    pipe.set_perceptual_loss(lpips_module)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe("a photo of a beach", generator=generator, output_type="np", **TRANSFORMER_SMALL, **kwargs).images


def tiny_transformer(name):
    """`(class, save the tiny model as a plain model folder, the tiny pipeline in a class)` of `name`."""
    from syncdiffusion_utils import testing

    if name == "flux2":
        return klein_class(), testing.save_tiny_flux2_klein_pipeline, testing.tiny_flux2_klein_pipeline
    return z_image_class(), testing.save_tiny_z_image_pipeline, testing.tiny_z_image_pipeline


@pytest.mark.parametrize("name", ["flux2", "z-image"])
def test_publish_klein_or_z_image_then_load_it_as_a_custom_pipeline_through_fake_hub(
    name, fake_hub, tmp_path, lpips_module
):
    pipeline_class, save_tiny, _ = tiny_transformer(name)
    repo_id = f"syncdiffusion-test/{name}"
    publish(repo_id, pipeline_class=pipeline_class, token=fake_hub.token)

    source = Path(inspect.getsourcefile(pipeline_class)).read_bytes()
    assert fake_hub.repos[repo_id]["files"]["pipeline.py"] == source
    folder = save_tiny(tmp_path / name)
    pipe = load_from_hub(folder, repo_id)
    assert type(pipe).__name__ == pipeline_class.__name__ and type(pipe) is not pipeline_class
    assert Path(sys.modules[type(pipe).__module__].__file__).read_bytes() == source
    # The served file makes the installed class's panorama from the same folder, synchronized (bit-identical).
    expected = transformer_images(pipeline_class.from_pretrained(folder), lpips_module, sync_thres=1)
    np.testing.assert_array_equal(transformer_images(pipe, lpips_module, sync_thres=1), expected)


@pytest.mark.parametrize(
    "name, source", [("flux2", "syncdiffusion_flux2"), ("z-image", "syncdiffusion_z_image")], ids=["flux2", "z-image"]
)
def test_publish_model_of_a_klein_or_z_image_pipeline_then_load_back(name, source, fake_hub, lpips_module):
    pipeline_class, _, tiny = tiny_transformer(name)
    repo_id = f"syncdiffusion-test/{name}-panorama"
    pipe = tiny(pipeline_class=pipeline_class, lpips_module=False)
    publish_model(pipe, repo_id, base_model=f"someone/tiny-{name}", token=fake_hub.token)

    files = fake_hub.repos[repo_id]["files"]
    assert files[f"{source}.py"] == Path(inspect.getsourcefile(pipeline_class)).read_bytes()
    assert json.loads(files["model_index.json"])["_class_name"] == [source, pipeline_class.__name__]
    card = files["README.md"].decode()
    assert card == model_repo_card(repo_id, f"someone/tiny-{name}", pipeline_class)
    check_card_is_the_classs(card, pipeline_class)
    assert f'from_pretrained("{repo_id}", trust_remote_code=True, torch_dtype=torch.bfloat16)' in card
    remote = DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)
    assert type(remote).__name__ == pipeline_class.__name__ and type(remote) is not pipeline_class
    installed = pipeline_class.from_pretrained(repo_id)
    assert type(installed) is pipeline_class
    # The repo's own file and the installed class: the same panorama (bit-identical, measured).
    np.testing.assert_array_equal(
        transformer_images(remote, lpips_module, sync_thres=1),
        transformer_images(installed, lpips_module, sync_thres=1),
    )


@pytest.mark.parametrize(
    "name, repo_id",
    [("flux2", "black-forest-labs/FLUX.2-klein-4B"), ("z-image", "Tongyi-MAI/Z-Image-Turbo")],
    ids=["flux2", "z-image"],
)
def test_a_klein_or_z_image_hub_id_loads_with_its_class(name, repo_id, fake_hub, tmp_path):
    """`--model black-forest-labs/FLUX.2-klein-4B` or `Tongyi-MAI/Z-Image-Turbo`: their `model_index.json` names
    Flux2KleinPipeline or ZImagePipeline (tiny ones are served); FLUX.2 [dev]'s names Flux2Pipeline, refused."""
    from syncdiffusion_utils import loading

    pipeline_class, save_tiny, _ = tiny_transformer(name)
    fake_hub.add_repo(repo_id, folder_files(save_tiny(tmp_path / name)))
    assert loading.pipeline_class_of(repo_id) is pipeline_class
    pipe = loading.load_pipeline(repo_id, "cpu", progress=False)
    assert type(pipe) is pipeline_class and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert fake_hub.requested("GET", f"/{repo_id}/resolve/main/model_index.json")
    if name == "flux2":
        dev = "black-forest-labs/FLUX.2-dev"
        files = folder_files(tmp_path / name)
        index = json.loads(files["model_index.json"])
        fake_hub.add_repo(
            dev, {**files, "model_index.json": json.dumps({**index, "_class_name": "Flux2Pipeline"}).encode()}
        )
        with pytest.raises(loading.CLIError, match=r"is FLUX.2 \[dev\] \(Flux2Pipeline\)") as caught:
            loading.load_pipeline(dev, "cpu")
        assert caught.value.code == 2
        assert not any(path.endswith(".safetensors") for _, path in fake_hub.requests if f"/{dev}/" in path)
