"""notebooks/mokd_colab.ipynb: valid nbformat 4, plain Python in its code cells, and its code
cells run in order, as one script, end to end on the smoke config.

The cells run in a subprocess (fresh JAX state, nothing left in the pytest process) with
the repository root as the working directory and on PYTHONPATH, so that they import this
checkout's `mokd_jax` (as the tests do) and the setup cell installs nothing. Needs neither
jupyter nor nbclient.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "mokd_colab.ipynb")
METHODS = ("ce", "mokd")
"""The student alone and the notebook's own method: programs the other runs compile too."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_notebook() -> dict:
    with open(NOTEBOOK, encoding="utf-8") as f:
        return json.load(f)


def source(cell: dict) -> str:
    """A cell's source: nbformat stores it as one string or as a list of lines."""
    text = cell["source"]
    return text if isinstance(text, str) else "".join(text)


def code_cells() -> list[str]:
    return [source(cell) for cell in load_notebook()["cells"] if cell["cell_type"] == "code"]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The code cells, in order, as one script run on the smoke config: (workdir, process)."""
    tmp = tmp_path_factory.mktemp("notebook")
    script = tmp / "notebook.py"
    script.write_text(
        "\n\n".join(f"# --- code cell {i}\n{text}" for i, text in enumerate(code_cells(), 1))
        + "\n",
        encoding="utf-8",
    )
    workdir = tmp / "run"
    env = {
        **os.environ,  # with conftest's TF_CPP_MIN_LOG_LEVEL and TF_ENABLE_ONEDNN_OPTS
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
        "MOKD_NOTEBOOK_CONFIG_ARG": "smoke",
        "MOKD_NOTEBOOK_WORKDIR": str(workdir),
        "MOKD_NOTEBOOK_METHODS": ",".join(METHODS),
        "MOKD_NOTEBOOK_SEEDS": "0",
        "MPLBACKEND": "Agg",
    }
    process = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return workdir, process


def test_notebook_is_nbformat_4_with_markdown_and_code_cells():
    notebook = load_notebook()
    assert notebook["nbformat"] == 4
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    kinds = [cell["cell_type"] for cell in notebook["cells"]]
    assert kinds[0] == "markdown" and kinds.count("code") >= 5 and kinds.count("markdown") >= 5
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None  # saved clean


def test_code_cells_are_plain_python_without_ipython_magics():
    for index, text in enumerate(code_cells(), 1):
        magics = [line for line in text.splitlines() if line.lstrip().startswith(("!", "%"))]
        assert not magics, f"code cell {index} has IPython magics: {magics}"
        compile(text, f"code cell {index}", "exec")


@pytest.mark.slow
def test_notebook_runs_end_to_end_on_the_smoke_config(executed):
    workdir, process = executed
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-4000:]
    with open(workdir / "summary.json") as f:
        summary = json.load(f)
    for role in ("teacher", "student"):
        accuracy = summary[role]["test_accuracy"]
        assert 0.0 <= accuracy <= 1.0, (role, accuracy)
        assert f"{role} {summary[role]['model']} (" in process.stdout
    assert summary["method"] == "mokd"
    png = workdir / "diagnostics.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    assert f"diagnostics: {png}" in process.stdout


@pytest.mark.slow
def test_notebook_comparison_lists_every_method_and_reuses_the_teacher(executed):
    workdir, process = executed
    assert process.returncode == 0, process.stderr[-4000:]
    compare_dir = workdir / "compare"
    report = (compare_dir / "comparison.md").read_text()
    for method in METHODS:
        row = f"| {method} | 1 | "
        assert row in report and row in process.stdout, method
    assert (compare_dir / "comparison.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not (compare_dir / "teacher").exists()  # the teacher trained above, not a new one
