"""evaluation/results_section.py: docs/results.md's records are rebuilt from eval.py records, nothing else."""

import json

import pytest

from evaluation import results_section as RS


def record(name, markdown, command="python eval.py x", commit="abcdef1234567"):
    return {"experiment": name, "title": f"title of {name}", "command": command, "git_commit": commit,
            "results": {"value": 1}, "markdown": markdown}


def write(folder, name, rec, png=True):
    (folder / f"{name}.json").write_text(json.dumps(rec))
    if png:
        (folder / f"{name}.png").write_bytes(b"\x89PNG fake")


def test_sections_in_paper_order_with_commands_figures_and_markers(tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs" / "results"
    results.mkdir()
    write(results, "marginal-trap", record("marginal-trap", "| trap |\n|---|\n| 0.99 |"))
    write(results, "fig4", record("fig4", "fig4 table 3.91"), png=False)
    (results / "notes.json").write_text(json.dumps({"not": "a record"}))
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text(f"# intro\n\n{RS.BEGIN}\nold numbers 0.59\n{RS.END}\n\n## after\n")
    argv = ["--results", str(results), "--docs", str(docs), "--page", str(page), "--header", "Wall time 5 min."]
    RS.main(argv)
    text = page.read_text()
    assert "old numbers" not in text and text.startswith("# intro") and text.rstrip().endswith("## after")
    body = text[text.index(RS.BEGIN):text.index(RS.END)]
    assert body.index("Wall time") < body.index("fig4 table 3.91") < body.index("| 0.99 |")  # header, then order
    assert "python eval.py x" in body and "](results/marginal-trap.png)" in body  # relative to the page
    assert (page.parent / "results" / "marginal-trap.png").is_file()  # the link resolves
    assert "fig4.png" not in body  # no figure, no link
    assert (docs / "marginal-trap.png").read_bytes() == b"\x89PNG fake"
    assert (results / "RESULTS.md").read_text() in text
    # running again gives the same page (the section is regenerated exactly)
    RS.main(argv)
    assert page.read_text() == text


def test_old_readme_flag_and_links_relative_to_a_page_elsewhere(tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs" / "results"
    results.mkdir()
    write(results, "fig6", record("fig6", "fig6 table"))
    readme = tmp_path / "README.md"
    readme.write_text(f"{RS.BEGIN}\n{RS.END}\n")
    RS.main(["--results", str(results), "--docs", str(docs), "--readme", str(readme)])
    assert "](docs/results/fig6.png)" in readme.read_text()


def test_errors_name_the_problem(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    with pytest.raises(ValueError, match="no eval.py records"):
        RS.build(results, None, "")
    write(results, "fig6", record("fig6", ""))
    with pytest.raises(ValueError, match="rerun that eval.py subcommand"):
        RS.build(results, None, "")
    write(results, "fig6", record("fig6", "ok"))
    page = tmp_path / "results.md"
    page.write_text("no markers here\n")
    with pytest.raises(ValueError, match="marker lines"):
        RS.main(["--results", str(results), "--page", str(page)])
    assert page.read_text() == "no markers here\n"  # untouched
