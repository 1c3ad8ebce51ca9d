"""The front page is a lesson a student reads top to bottom: short, the idea before the numbers,
every variant's figures, no lab vocabulary, and generated sentences that stay true of the files."""

import re

import pytest

from conftest import ROOT
from lab import front_page
from test_tools import fake_run
from variants import REGISTRY, course_variants

README = (ROOT / "README.md").read_text()


def prose(text):
    """The page's words a reader reads: code blocks, markers and link targets left out."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return text


def test_the_front_page_has_at_most_1500_words():
    words = re.findall(r"[A-Za-z0-9][\w.,%'’-]*", prose(README))
    assert len(words) <= 1500, len(words)


@pytest.mark.parametrize("jargon", [r"recipe v\d", r"\blevers?\b", r"\barithmetic\b", r"\bISA\b",
                                    r"\bAVX", r"\bissue \d", r"#\d+\b"])
def test_the_front_page_keeps_the_labs_vocabulary_off(jargon):
    assert not re.search(jargon, prose(README), flags=re.I), jargon


def test_the_idea_comes_before_any_table_and_the_results_table_is_small():
    assert README.index("images/norm_axes.png") < README.index("\n|")
    start, end = README.index("<!-- front-results:start -->"), README.index("<!-- front-results:end -->")
    header = README[start:end].splitlines()[1]
    assert header.count("|") - 1 <= 6, header


def test_the_front_page_shows_every_variants_curves_and_misclassified_images():
    for variant in course_variants():
        assert f"images/{variant}_seed0_curves.png" in README
        assert f"images/{variant}_seed0_misclassified.png" in README
    assert "images/batch_size_study.png" in README
    assert "docs/contributing.md" in README


def runs_of(accs_by_variant, **changes):
    return {v: [fake_run(v, seed, acc, **changes) for seed, acc in enumerate(accs)]
            for v, accs in accs_by_variant.items()}


def test_what_to_notice_says_who_leads_only_when_every_run_is_ahead():
    ahead = runs_of({"batch": [0.86, 0.85], "layer": [0.84, 0.83], "group": [0.845, 0.835]})
    text = front_page.notice(ahead)
    assert "Every one of its 2 runs scores above every LayerNorm and GroupNorm run" in text
    assert "mean is 1.50 to 2.00 points higher" in text
    overlap = runs_of({"batch": [0.86, 0.83], "layer": [0.84, 0.835], "group": [0.84, 0.83]})
    assert "not every run is above every" in front_page.notice(overlap)


def test_what_to_notice_explains_the_train_loss_only_where_the_files_show_it():
    runs = runs_of({"batch": [0.86, 0.85], "layer": [0.84, 0.83], "group": [0.845, 0.835]})
    assert "Train loss ends above test loss in every run" in front_page.notice(runs)
    assert "keeps 90% of its probability" in front_page.notice(runs)
    runs["batch"][0]["history"]["train_loss"][-1] = 0.5  # below its test loss of 1.0
    assert "Train loss ends above test loss" not in front_page.notice(runs)


def test_the_results_table_and_run_time_come_from_the_files():
    runs = runs_of({"batch": [0.86, 0.85, 0.84]})
    for run, minutes in zip(runs["batch"], (30, 45, 50)):
        run["wall_time_s"] = 60 * minutes
        run["hardware"]["device"] = "cpu"
    table = front_page.results_table(runs)
    assert f"| {REGISTRY['batch'].title} | 85.00 ± 1.00 | 84.00 – 86.00 | 3 | 46,538 | 3 |" in table
    assert "took 30 to 50 minutes (3 runs, 2026-11-20 to 2026-11-22)" in \
        front_page.run_time(runs, [])
    assert front_page.results_table({}).startswith("No results yet")
