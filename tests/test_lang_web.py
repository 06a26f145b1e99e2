"""Web-page reader and micro-F1 reward, on the real WebArena sample with perturbed predictions."""

import json
import random

import numpy as np
import pytest

from conftest import EXAMPLE_DATA
from rlvrw.lang import web

SAMPLE = EXAMPLE_DATA / "web" / "sample_tao_annotated.json"


@pytest.fixture(scope="module")
def records():
    loaded = web.load(str(SAMPLE))
    assert loaded.skipped == []
    return loaded.records


def render(sections: dict) -> str:
    return "\n\n".join(f"{name}:\n" + ("\n".join(sections[name]) or "None") for name in web.SECTIONS)


def gold_sections(record) -> dict:
    return web.parse_sections(record["next_state_tao"])


def test_sample_reads_and_parses_like_its_own_item_fields(records):
    assert len(records) == 10
    for record in records:
        sections = gold_sections(record)
        for field, name in (("new_items", "New items"), ("deleted_items", "Deleted items"),
                            ("updated_items", "Updated items")):
            expected = [line.strip() for line in record[field].splitlines() if line.strip() not in ("", "None")]
            assert sections[name] == expected


def test_loader_skips_and_counts_bad_records(tmp_path, records):
    bad = dict(records[0], previous_actions="click [1]")
    no_action = {k: v for k, v in records[1].items() if k != "current_action"}
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([records[0], bad, no_action, records[2]]))
    loaded = web.load(str(path))
    assert len(loaded) == 2
    assert "item 1: record.previous_actions must be list" in loaded.skipped[0]
    assert "item 2: record.current_action is missing" in loaded.skipped[1]


def test_prompt_holds_the_inputs(records):
    record = records[1]
    prompt = web.build_prompt(record)
    for key in ("objective", "url", "observation", "current_action"):
        assert record[key] in prompt
    for name in web.SECTIONS:
        assert f"{name}:" in prompt


def test_gold_scores_one(records):
    for record in records:
        s = web.f1_scores(web.gold_response(record), record["next_state_tao"])
        assert (s.precision, s.recall, s.f1, s.parsed) == (1.0, 1.0, 1.0, True)
        assert s.n_matched == s.n_gold == s.n_predicted > 0


def test_dropped_extra_and_duplicate_lines(records):
    for record in records:
        gold = record["next_state_tao"]
        sections = gold_sections(record)
        n = sum(len(items) for items in sections.values())
        dropped = {k: list(v) for k, v in sections.items()}
        dropped["Updated items"].pop(0)
        s = web.f1_scores(render(dropped), gold)
        assert (s.precision, s.recall) == (1.0, pytest.approx((n - 1) / n))
        assert s.f1 == pytest.approx(2 * (n - 1) / (2 * n - 1))

        extra = {k: list(v) for k, v in sections.items()}
        extra["New items"].append("[99999] button 'Not on the page'")
        s = web.f1_scores(render(extra), gold)
        assert (s.precision, s.recall) == (pytest.approx(n / (n + 1)), 1.0)

        duplicated = {k: list(v) for k, v in sections.items()}
        duplicated["Updated items"].append(duplicated["Updated items"][0])  # said twice, true once: counts once
        s = web.f1_scores(render(duplicated), gold)
        assert (s.n_matched, s.n_predicted) == (n, n + 1)
        assert s.f1 == pytest.approx(2 * n / (2 * n + 1))


def test_items_match_within_their_section_in_any_order(records):
    record = records[1]  # has new, deleted and updated items
    sections = gold_sections(record)
    shuffled = {k: random.Random(0).sample(v, len(v)) for k, v in sections.items()}
    assert web.f1_reward(render(shuffled), record["next_state_tao"]) == 1.0
    moved = {k: list(v) for k, v in sections.items()}
    moved["Deleted items"].append(moved["New items"].pop())  # right line, wrong section
    s = web.f1_scores(render(moved), record["next_state_tao"])
    n = s.n_gold
    assert s.n_matched == n - 1 and s.f1 == pytest.approx((n - 1) / n)


def test_reasoning_markdown_and_whitespace_around_the_answer(records):
    record = records[2]
    sections = gold_sections(record)
    answer = render(sections)
    variants = [
        "<think>New items:\n[1] bogus 'draft'</think>\n" + answer,
        "The click opens the menu, so:\n\n" + answer.replace("New items:", "**New items:**"),
        "\n".join("   " + line + "  " for line in answer.splitlines()),
        "New items: None\n" + answer.split("\n\n", 1)[1],
    ]
    for text in variants:
        assert web.f1_reward(text, record["next_state_tao"]) == 1.0, text[:60]


def test_unreadable_and_empty_answers():
    gold = "New items:\nNone\n\nDeleted items:\nNone\n\nUpdated items:\nNone"
    assert web.f1_reward(gold, gold) == 1.0  # nothing changes, and that is predicted
    s = web.f1_scores("The page will reload.", gold)
    assert not s.parsed and s.f1 == 0.0
    assert web.f1_reward("New items:\n[1] link 'a'", gold) == 0.0
    assert web.f1_reward("New items:\nNone", "New items:\n[1] link 'a'") == 0.0
    with pytest.raises(ValueError, match="gold_text"):
        web.f1_reward(gold, "no sections")
    with pytest.raises(ValueError, match="response_text"):
        web.f1_reward(None, gold)


def test_matching_equals_the_optimal_assignment():
    """The multiset intersection is the maximum one-to-one matching of equal lines (checked with scipy)."""
    linear_sum_assignment = pytest.importorskip("scipy.optimize").linear_sum_assignment
    rng = random.Random(1)
    for _ in range(20):
        gold = [f"[{rng.randint(0, 6)}] link" for _ in range(rng.randint(1, 12))]
        pred = [f"[{rng.randint(0, 6)}] link" for _ in range(rng.randint(1, 12))]
        cost = np.array([[0.0 if p == g else 1.0 for g in gold] for p in pred])
        rows, cols = linear_sum_assignment(cost)
        optimal = int(sum(cost[r, c] == 0 for r, c in zip(rows, cols)))
        s = web.f1_scores("Updated items:\n" + "\n".join(pred), "Updated items:\n" + "\n".join(gold))
        assert s.n_matched == optimal


def test_evaluation_summary(records):
    gold = web.evaluate([web.gold_response(r) for r in records], records)
    assert gold == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "count": 10, "unparseable": 0}
    nothing = web.evaluate(["no idea"] * len(records), records)
    assert nothing["f1"] == 0.0 and nothing["unparseable"] == 10
