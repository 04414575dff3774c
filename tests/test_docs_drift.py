"""Numbers that cannot drift: every tagged figure in README.md and docs/**/*.md equals its record under
docs/results/ (experiments/results.py has the convention), and every record carries its conditions."""

import json

import pytest

from experiments import results


def test_every_tagged_figure_equals_its_record():
    problems = results.check()
    assert not problems, "quoted figures disagree with their records:\n" + "\n".join(map(str, problems))


def test_every_record_has_its_conditions():
    problems = results.record_problems()
    assert not problems, "\n".join(problems)


@pytest.fixture
def record_dir(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({
        "conditions": {"machine": "m", "load": [0.1], "jax": "0", "date": "d", "command": "c"},
        "final": {"bits_per_byte": 1.88314, "steps": 12345, "exact_match": 0.872}, "rows": [{"ms": 3.25}]}))
    return tmp_path


def test_checker_passes_agreeing_quotes(record_dir):
    text = ("bits per byte 1.883<!-- run.json:final.bits_per_byte|.3f --> after 12,345<!-- run.json:final.steps|, -->"
            " steps, 87.2%<!-- run.json:final.exact_match|.1% --> exact, 3.25<!-- run.json:rows.0.ms --> ms\n")
    assert results.check_text("doc.md", text, record_dir) == []


def test_checker_fails_on_a_disagreeing_quote_naming_file_line_text_and_value(record_dir):
    text = "intro\nthe LM reaches 1.884<!-- run.json:final.bits_per_byte|.3f --> bits per byte\n"
    [p] = results.check_text("docs/x.md", text, record_dir)
    assert (p.doc, p.line) == ("docs/x.md", 2)
    assert p.text == "1.884<!-- run.json:final.bits_per_byte|.3f -->"
    assert p.message == "quotes '1.884' but run.json:final.bits_per_byte is 1.88314, formatted '1.883'"
    assert str(p).startswith("docs/x.md:2: '1.884<!--")


@pytest.mark.parametrize("tag, message", [
    ("12345<!-- run.json:final.steps|, -->", "quotes '12345' but run.json:final.steps is 12345, formatted '12,345'"),
    ("1<!-- gone.json:final.steps -->", "record {dir}/gone.json cannot be read"),
    ("1<!-- run.json:final.nope -->", "run.json has no final.nope: no 'nope' under final"),
    ("1<!-- run.json:rows.3.ms -->", "run.json has no rows.3.ms: no '3' under rows (there: a list of 1)"),
    ("about <!-- run.json:final.steps -->", "no number right before the tag (record value '12345')"),
    ("5<!-- run.json final.steps -->", "malformed tag"),
])
def test_checker_fails_on_missing_records_paths_and_numbers(record_dir, tag, message):
    [p] = results.check_text("README.md", f"x {tag} y", record_dir)
    assert p.message.startswith(message.format(dir=record_dir)), p.message


def test_a_record_without_conditions_is_reported(tmp_path):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "bare.json").write_text(json.dumps({"x": 1}))
    (tmp_path / "docs" / "results" / "partial.json").write_text(json.dumps({"conditions": {"machine": "m"}}))
    assert results.record_problems(tmp_path) == [
        "docs/results/bare.json: no 'conditions' object (write it with experiments.results.write)",
        "docs/results/partial.json: conditions lack ['load', 'jax', 'date', 'command']"]
    with pytest.raises(ValueError, match="needs a 'conditions' object"):
        results.write(tmp_path / "y.json", {"x": 1})


def test_untagged_lists_numbers_outside_tags_code_and_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "tagged 1.883<!-- run.json:final.bits_per_byte|.3f --> and untagged 2.178 bits\n"
        "`code 12345` and [link 2048](docs/x.md) only\n```\n99.9 in a block\n```\nlast 87.2% and 7\n")
    assert results.untagged(tmp_path) == ["README.md:1: 2.178", "README.md:6: 87.2%"]


def test_rewrite_requotes_stale_figures_from_their_records_and_leaves_the_rest(tmp_path, record_dir):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "run.json").write_text((record_dir / "run.json").read_text())
    (tmp_path / "README.md").write_text(
        "stale 1.901<!-- run.json:final.bits_per_byte|.3f --> and good 12,345<!-- run.json:final.steps|, -->\n"
        "broken 7<!-- run.json:final.nope --> stays\n")
    assert results.rewrite(tmp_path) == ["README.md"]
    assert (tmp_path / "README.md").read_text() == (
        "stale 1.883<!-- run.json:final.bits_per_byte|.3f --> and good 12,345<!-- run.json:final.steps|, -->\n"
        "broken 7<!-- run.json:final.nope --> stays\n")
    assert [p.message.split(":")[0] for p in results.check(tmp_path)] == ["run.json has no final.nope"]
