"""Every measured number in the README's and docs/results.md's tables is in a file under results/.

A table belongs to the last `results/<run>/` named before it in the same section; its cells
are checked against that run's files, except for the papers' numbers (a column or row whose
label starts with "paper"). Numbers with two or three decimals are checked (accuracies,
perplexities, errors); C values, bit widths and speed ratios are not.
"""

import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
NUMBER = re.compile(r"(?<![\d.])\d+\.\d{2,3}(?![\d.])")
RUN = re.compile(r"results/([\w.-]+)/")


def _json_numbers(value) -> set[str]:
    if isinstance(value, dict):
        return set().union(*map(_json_numbers, value.values()))
    if isinstance(value, list):
        return set().union(*map(_json_numbers, value))
    if isinstance(value, float):
        return {f"{x:.{d}f}" for x in (value, 100 * value) for d in (2, 3)}
    return set()


def recorded_numbers(run_dir: pathlib.Path) -> set[str]:
    """Every number a run's files hold, as text and (JSON floats) rounded as tables print them."""
    numbers = set()
    for path in run_dir.iterdir():
        if path.suffix in (".md", ".log"):
            numbers |= set(NUMBER.findall(path.read_text()))
        elif path.suffix == ".json":
            numbers |= _json_numbers(json.loads(path.read_text()))
    return numbers


def _is_paper(label: str) -> bool:
    """A column or row of the papers' numbers: its label starts with "paper" (or *paper*)."""
    return label.strip("* ").lower().startswith("paper")


def quoted_tables(page: pathlib.Path) -> list[tuple[str, str, list[str]]]:
    """(run, table header, measured cells) for each table that follows a results/<run>/ mention."""
    tables = []
    for section in re.split(r"\n(?=## )", page.read_text()):
        run, lines = None, section.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if not line.startswith("|"):
                run = [run, *RUN.findall(line)][-1]
                i += 1
                continue
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([cell.strip() for cell in lines[i].strip("|").split("|")])
                i += 1
            if run is None:
                continue
            header, rows = block[0], block[2:]
            keep = [j for j, name in enumerate(header) if not _is_paper(name)]
            cells = [row[j] for row in rows if not _is_paper(row[0]) for j in keep if j < len(row)]
            tables.append((run, " | ".join(header), cells))
    return tables


def missing_numbers(cells: list[str], recorded: set[str]) -> list[str]:
    """The measured numbers in `cells` that are not among `recorded`."""
    return [n for cell in cells for n in NUMBER.findall(cell) if n not in recorded]


PAGES = ("README.md", "docs/results.md")


@pytest.mark.parametrize("page", PAGES)
def test_quoted_numbers_come_from_results_files(page):
    tables = quoted_tables(ROOT / page)
    assert tables, f"{page} quotes no table from results/"
    for run, header, cells in tables:
        assert (RESULTS / run).is_dir(), f"{page} names results/{run}/, which does not exist"
        missing = missing_numbers(cells, recorded_numbers(RESULTS / run))
        assert not missing, f"{page}, table '{header}': {missing} not in results/{run}/"


def test_a_number_missing_from_the_run_is_caught(tmp_path):
    (tmp_path / "results" / "run").mkdir(parents=True)
    (tmp_path / "results" / "run" / "results.json").write_text(json.dumps({"acc": 0.8125}))
    (tmp_path / "page.md").write_text(
        "## A run (`results/run/`)\n\n| method | acc | paper |\n|---|---|---|\n"
        "| ours | 81.25 | 90.00 |\n| ours, as in the paper | 81.26 | |\n| *paper* | 88.00 | |\n"
    )
    [(run, _, cells)] = quoted_tables(tmp_path / "page.md")
    assert missing_numbers(cells, recorded_numbers(tmp_path / "results" / run)) == ["81.26"]
