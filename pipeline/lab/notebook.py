"""Run a notebook top to bottom with parameters, papermill-style, using nbclient.

The cell tagged ``parameters`` holds the defaults; the values given here go into a new
cell right after it. Used by the test suite (smoke mode) and by
``scripts/run_notebook.py`` (full runs, e.g. training the reference model).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def inject_parameters(notebook: Any, parameters: dict[str, Any]) -> None:
    """Insert a cell assigning ``parameters`` after the cell tagged ``parameters``."""
    import nbformat

    source = "# injected parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    index = next(
        (i for i, c in enumerate(notebook.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None
    )
    if index is None:
        raise ValueError("the notebook has no cell tagged 'parameters'")
    notebook.cells.insert(index + 1, cell)


def execute_notebook(
    path: Path | str,
    parameters: dict[str, Any] | None = None,
    *,
    output: Path | str | None = None,
    timeout: int = 600,
    kernel_name: str = "python3",
) -> Any:
    """Execute ``path`` in its own folder; write the executed copy to ``output`` if given.

    Raises
    ------
    nbclient.exceptions.CellExecutionError
        With the failing cell's traceback, when a cell fails.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    if parameters:
        inject_parameters(notebook, parameters)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name=kernel_name, resources={"metadata": {"path": str(path.parent.resolve())}}
    )
    try:
        client.execute()
    finally:
        if output is not None:
            nbformat.write(notebook, Path(output))
    return notebook
