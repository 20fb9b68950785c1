"""Every measured number in the tables of the README, docs/results.md and docs/lm.md is in its
own cell of a table of the run it quotes, under results/.

A table belongs to the last `results/<run>/` named before it in the same section. Each of its
cells is found by its row and its column: the row's labels (the cells of its label columns,
those with no measured number in any row) and the column's header must name a cell of a table in
the run's Markdown files (results.md and the others the run wrote), and every measured number of
the quoted cell must be among that cell's numbers. A number that merely appears somewhere else in
the run does not count. The papers' numbers (a column or row whose label starts with "paper")
are not checked. Numbers with one to three decimals are checked (accuracies, perplexities,
errors, λ); integers (C values, bit widths) are not.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
NUMBER = re.compile(r"(?<![\d.])\d+\.\d{1,3}(?![\d.])")
RUN = re.compile(r"results/([\w.-]+)/")


def _label(text: str) -> str:
    """A row or column label as compared: without emphasis, spaces and case."""
    return " ".join(text.replace("*", "").split()).lower()


def _is_paper(label: str) -> bool:
    """A column or row of the papers' numbers: its label starts with "paper" (or *paper*)."""
    return _label(label).startswith("paper")


def _tables(lines: list[str]):
    """(the last results/<run>/ named before it, header, rows) for each Markdown table."""
    run, i = None, 0
    while i < len(lines):
        if not lines[i].startswith("|"):
            run = [run, *RUN.findall(lines[i])][-1]
            i += 1
            continue
        block = []
        while i < len(lines) and lines[i].startswith("|"):
            block.append([cell.strip() for cell in lines[i].strip().strip("|").split("|")])
            i += 1
        yield run, block[0], block[2:]


def _cells(header: list[str], rows: list[list[str]]):
    """((row labels, column label), cell text) for each cell outside the label columns: the
    first column, and any other with no measured number outside the papers' rows."""
    width = len(header)
    rows = [row + [""] * (width - len(row)) for row in rows]
    ours = [row for row in rows if not _is_paper(row[0])]
    labels = [0] + [j for j in range(1, width) if not any(NUMBER.search(r[j]) for r in ours)]
    for row in rows:
        key = tuple(_label(row[j]) for j in labels)
        for j in range(width):
            if j not in labels:
                yield (key, _label(header[j])), row[j]


def quoted_tables(page: pathlib.Path) -> list[tuple[str, str, list[tuple[tuple, str]]]]:
    """(run, table header, [((row labels, column label), cell)]) of the measured cells of each
    table that follows a results/<run>/ mention."""
    tables = []
    for section in re.split(r"\n(?=## )", page.read_text()):
        for run, header, rows in _tables(section.splitlines()):
            if run is None:
                continue
            cells = [
                (key, cell)
                for key, cell in _cells(header, rows)
                if not _is_paper(key[1]) and not any(map(_is_paper, key[0]))
            ]
            tables.append((run, " | ".join(header), cells))
    return tables


def recorded_cells(run_dir: pathlib.Path) -> dict[tuple, list[str]]:
    """Every table cell of a run's Markdown files, by (row labels, column label)."""
    recorded = {}
    for path in sorted(run_dir.glob("*.md")):
        for _, header, rows in _tables(path.read_text().splitlines()):
            for key, cell in _cells(header, rows):
                recorded.setdefault(key, []).append(cell)
    return recorded


def missing_numbers(cells: list[tuple[tuple, str]], recorded: dict[tuple, list[str]]) -> list:
    """The quoted cells some of whose numbers are not in the run's cell of the same row and
    column, as (row labels, column label, numbers)."""
    missing = []
    for key, cell in cells:
        numbers = NUMBER.findall(cell)
        if numbers and not any(
            all(n in NUMBER.findall(found) for n in numbers) for found in recorded.get(key, [])
        ):
            missing.append((*key, numbers))
    return missing


PAGES = ("README.md", "docs/results.md", "docs/lm.md")


@pytest.mark.parametrize("page", PAGES)
def test_quoted_numbers_come_from_their_cells_in_results_files(page):
    tables = quoted_tables(ROOT / page)
    assert tables, f"{page} quotes no table from results/"
    for run, header, cells in tables:
        assert (RESULTS / run).is_dir(), f"{page} names results/{run}/, which does not exist"
        missing = missing_numbers(cells, recorded_cells(RESULTS / run))
        assert not missing, (
            f"{page}, table '{header}': these cells are not in the same row and column of a "
            f"table in results/{run}/*.md: {missing}"
        )


def test_a_number_from_another_cell_of_the_run_is_caught(tmp_path):
    (tmp_path / "results" / "run").mkdir(parents=True)
    (tmp_path / "results" / "run" / "results.md").write_text(
        "| method | acc | loss |\n|---|---|---|\n"
        "| ours | 81.25 | 0.52 |\n| theirs | 80.00 | 0.61 |\n"
    )
    (tmp_path / "page.md").write_text(
        "## A run (`results/run/`)\n\n| method | acc | paper |\n|---|---|---|\n"
        "| ours | 81.25 | 90.00 |\n| theirs | 81.25 | |\n| ours | 0.52 | |\n"
        "| *paper* | 88.00 | |\n"
    )
    [(run, _, cells)] = quoted_tables(tmp_path / "page.md")
    recorded = recorded_cells(tmp_path / "results" / run)
    # 81.25 is in the run, but not in row "theirs"; 0.52 is, but in column "loss".
    assert missing_numbers(cells, recorded) == [
        (("theirs",), "acc", ["81.25"]),
        (("ours",), "acc", ["0.52"]),
    ]
