"""Strips outputs and execution counts from the notebooks in colab/ (the repository's policy)."""

import pathlib

import nbformat

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"


def main():
    for path in sorted(COLAB.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(notebook, path)
        print(f"stripped {path}")


if __name__ == "__main__":
    main()
