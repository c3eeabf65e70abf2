"""examples/quickstart.ipynb: committed without outputs; executed end to end on CPU, it shows what it says it shows."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from kvcomm_jax.kvcomm.plans import PATHS

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"
CELL_TIMEOUT_S = 600


def _cell(notebook, tag: str):
    """The code cell tagged ``tag``."""
    cells = [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _text(cell, mime: str = "text/plain") -> str:
    """What ``cell`` printed (stdout) and displayed as ``mime``, joined."""
    parts = [output.text for output in cell.outputs if output.output_type == "stream" and output.name == "stdout"]
    parts += [output.data[mime] for output in cell.outputs if mime in output.get("data", {})]
    return "\n".join(parts)


def _table_rows(markdown: str) -> list[list[str]]:
    """The body rows of a markdown table, as lists of stripped cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _user_environment() -> dict:
    """This process's environment on one CPU device, without the simulated devices of the test session
    and with matplotlib's backend left to the kernel (inline)."""
    env = {name: value for name, value in os.environ.items() if name not in ("XLA_FLAGS", "MPLBACKEND")}
    return {**env, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook after running every cell in a fresh kernel, in an empty working directory."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path_factory.mktemp("notebook")
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    client.execute(env=_user_environment())  # raises CellExecutionError if a cell fails
    return notebook


def test_committed_notebook_is_valid_and_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


@pytest.mark.slow
@pytest.mark.real_model
def test_install_cell_installs_nothing_where_the_package_is_installed(executed):
    assert _text(_cell(executed, "install")).strip() == (
        "ready: kvcomm_jax, the default model and the GSM8K data are installed"
    )


@pytest.mark.slow
@pytest.mark.real_model
def test_devices_cell_shows_the_cpu(executed):
    text = _text(_cell(executed, "devices"))
    assert "default backend: cpu" in text and "CpuDevice(id=0)" in text


@pytest.mark.slow
@pytest.mark.real_model
def test_records_table_has_every_call_with_its_path_reuse_and_ttft(executed):
    rows = _table_rows(_text(_cell(executed, "records"), "text/markdown"))
    assert len(rows) == 2 * 3 * 2  # modes x questions x agents
    for mode, question, agent, path, reason, tokens, ttft_ms, compile_ms in rows:
        reused, prompt = (int(n) for n in tokens.split(" / "))
        assert path in PATHS and question.startswith("gsm8k/") and agent in ("1", "2")
        assert float(ttft_ms) > 0 and float(compile_ms) >= 0 and 0 <= reused < prompt
        assert (reason == "-") == (path == "reuse")
        if mode == "dense":
            assert (path, reused) == ("dense", 0)
    kvcomm_paths = [row[3] for row in rows if row[0] == "kvcomm"]
    # as the notebook explains: the first two questions' contents become anchors, then the pool serves
    assert kvcomm_paths[:4] == ["partial"] * 4 and "reuse" in kvcomm_paths[4:]


@pytest.mark.slow
@pytest.mark.real_model
def test_plot_cell_shows_a_figure(executed):
    images = [output for output in _cell(executed, "plot").outputs if "image/png" in output.get("data", {})]
    assert len(images) == 1 and len(images[0].data["image/png"]) > 1000
