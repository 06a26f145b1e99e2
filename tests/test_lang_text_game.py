"""Text-game reader, answer parsing and rewards, against hand-made answers built from the real ByteSized32 sample."""

import copy
import json

import pytest

from conftest import EXAMPLE_DATA
from rlvrw.lang import parsing, text_game

SAMPLE = EXAMPLE_DATA / "text_game" / "bytesized32_train_sample.jsonl"


@pytest.fixture(scope="module")
def records():
    loaded = text_game.load(str(SAMPLE))
    assert loaded.skipped == []
    return loaded.records


def _first(records, predicate):
    return next(r for r in records if predicate(r))


@pytest.fixture(scope="module")
def modified_record(records):
    """A transition where an existing object's properties change."""

    def changes_property(r):
        current = {o["uuid"]: o for o in r["current_state"]["objects"]}
        return any(o["uuid"] in current and o["properties"] != current[o["uuid"]]["properties"]
                   for o in text_game.gold_answer(r)["modified"])

    return _first(records, changes_property)


@pytest.fixture(scope="module")
def removal_record(records):
    return _first(records, lambda r: text_game.gold_answer(r)["removed"])


@pytest.fixture(scope="module")
def unchanged_record(records):
    return _first(records, lambda r: not text_game.is_changed(r))


def answer_text(answer) -> str:
    return f"{parsing.FINAL_ANSWER_MARKER} {json.dumps(answer)}"


def scores(answer, record):
    text = answer if isinstance(answer, str) else answer_text(answer)
    return text_game.score_response(text, record)


# ------------------------------------------------------------------------------------------------------- the data
def test_sample_reads_and_has_both_kinds_of_transition(records):
    assert len(records) == 64
    changed = [text_game.is_changed(r) for r in records]
    assert sum(changed) == 23 and len(changed) - sum(changed) == 41
    assert text_game.action_of(records[0]) == "take yourself"


def test_loader_skips_and_counts_bad_records(tmp_path, records):
    path = tmp_path / "mixed.jsonl"
    broken = copy.deepcopy(records[0])
    del broken["tick_state"]
    bad_uuid = copy.deepcopy(records[1])
    bad_uuid["current_state"]["objects"][0]["uuid"] = "one"
    lines = [json.dumps(records[0]), "{not json", json.dumps(broken), "", json.dumps(bad_uuid), json.dumps([1]),
             json.dumps(records[1])]
    path.write_text("\n".join(lines))
    loaded = text_game.load(str(path))
    assert [r["state_id"] for r in loaded.records] == [records[0]["state_id"], records[1]["state_id"]]
    assert len(loaded.skipped) == 4
    assert "line 2" in loaded.skipped[0] and "not JSON" in loaded.skipped[0]
    assert "tick_state is missing" in loaded.skipped[1]
    assert "current_state.objects[0].uuid must be int" in loaded.skipped[2]
    assert "JSON object" in loaded.skipped[3]
    assert len(text_game.load(str(path), limit=1)) == 1


def test_loader_rejects_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="path"):
        text_game.load(str(tmp_path / "nope.jsonl"))


# ------------------------------------------------------------------------------------------ gold answer and prompt
def test_gold_answer_of_a_removal_and_an_appearance(records):
    record = _first(records, lambda r: r["game"] == "clean-energy" and text_game.gold_answer(r)["removed"])
    gold = text_game.gold_answer(record)
    assert gold["removed"] == [6]
    current_uuids = {o["uuid"] for o in record["current_state"]["objects"]}
    appeared = [o for o in gold["modified"] if o["uuid"] not in current_uuids]
    assert [o["uuid"] for o in appeared] == [record["current_state"]["max_UUID"]]
    assert set(appeared[0]) == {"uuid", "name", "properties", "contains"}
    assert gold["score"] == record["next_score_state"]


def test_gold_answer_of_an_unchanged_transition_is_empty(unchanged_record):
    gold = text_game.gold_answer(unchanged_record)
    assert gold == {"modified": [], "removed": [], "score": unchanged_record["next_score_state"]}


def test_prompt_holds_state_action_and_format(records):
    record = records[0]
    prompt = text_game.build_prompt(record)
    assert text_game.action_of(record) in prompt
    assert record["current_state"]["taskDesc"] in prompt
    assert parsing.FINAL_ANSWER_MARKER in prompt
    for key in ('"modified"', '"removed"', '"score"'):
        assert key in prompt
    state = json.loads(prompt.split("Current state: ", 1)[1].split("\n", 1)[0])
    assert [o["uuid"] for o in state["objects"]] == [o["uuid"] for o in record["current_state"]["objects"]]
    assert state["score"] == record["current_score_state"]
    assert f"from {record['current_state']['max_UUID']}" in prompt


# --------------------------------------------------------------------------------------------------------- rewards
def test_gold_answers_score_the_top_of_both_rewards(records):
    for record in records:
        text = text_game.gold_response(record)
        assert text_game.binary_reward(text, record) == 1.0
        changed_objects = bool(text_game.gold_answer(record)["modified"] or text_game.gold_answer(record)["removed"])
        assert text_game.task_reward(text, record) == pytest.approx(1.3 if changed_objects else 0.3)


def test_wrong_property_value(modified_record):
    gold = text_game.gold_answer(modified_record)
    current = {o["uuid"]: o for o in modified_record["current_state"]["objects"]}
    wrong = copy.deepcopy(gold)
    obj = next(o for o in wrong["modified"]
               if o["uuid"] in current and o["properties"] != current[o["uuid"]]["properties"])
    name = next(k for k, v in obj["properties"].items() if v != current[obj["uuid"]]["properties"].get(k))
    obj["properties"][name] = current[obj["uuid"]]["properties"][name]  # the old value: the change is missed
    s = scores(wrong, modified_record)
    assert s.parsed and not s.correct and s.binary == 0.0
    assert s.acc_score == 1.0 and 0 < s.acc_objects < 1 and 0 <= s.acc_changed < 1
    assert s.task == pytest.approx(0.09 * s.acc_objects + 0.01 + s.acc_changed)
    assert s.task < 1.3


def test_missing_removal(removal_record):
    wrong = copy.deepcopy(text_game.gold_answer(removal_record))
    wrong["removed"] = []
    s = scores(wrong, removal_record)
    assert s.binary == 0.0 and s.acc_objects < 1 and s.acc_changed < 1


def test_wrong_score(records):
    record = records[0]
    wrong = copy.deepcopy(text_game.gold_answer(record))
    wrong["score"]["score"] += 1
    s = scores(wrong, record)
    assert s.binary == 0.0
    assert s.acc_objects == 1.0 and s.acc_score == pytest.approx(2 / 3)
    assert s.task == pytest.approx(0.09 + 0.01 * 2 / 3)


def test_extra_top_level_keys_are_ignored_but_extra_properties_are_wrong(modified_record):
    gold = text_game.gold_answer(modified_record)
    assert scores({**gold, "explanation": "the tap runs"}, modified_record).binary == 1.0
    extra = copy.deepcopy(gold)
    extra["modified"][0]["properties"]["isMagic"] = True
    s = scores(extra, modified_record)
    assert s.binary == 0.0 and s.acc_changed == 1.0 and s.acc_objects < 1
    extra_score = copy.deepcopy(gold)
    extra_score["score"]["bonus"] = 0
    assert scores(extra_score, modified_record).acc_score == pytest.approx(3 / 4)


def test_contains_order_does_not_matter(records):
    record = _first(records, lambda r: any(len(o["contains"]) > 1 for o in text_game.gold_answer(r)["modified"]))
    gold = text_game.gold_answer(record)
    for obj in gold["modified"]:
        obj["contains"] = obj["contains"][::-1]
    assert scores(gold, record).binary == 1.0
    # restating an unchanged object, with its contents reordered, is still right
    unchanged = _first(records, lambda r: not text_game.is_changed(r)
                       and any(len(o["contains"]) > 1 for o in r["current_state"]["objects"]))
    obj = copy.deepcopy(next(o for o in unchanged["current_state"]["objects"] if len(o["contains"]) > 1))
    obj["contains"].reverse()
    restated = {**text_game.gold_answer(unchanged), "modified": [obj]}
    assert scores(restated, unchanged).binary == 1.0


def test_values_compare_as_json(records):
    """true is not 1 (though Python has True == 1); 20 is 20.0."""

    def restates(obj):
        return any(isinstance(v, float) and v.is_integer() for v in obj["properties"].values()) and any(
            isinstance(v, bool) for v in obj["properties"].values())

    record = _first(records, lambda r: not text_game.is_changed(r)
                    and any(map(restates, r["current_state"]["objects"])))
    obj = next(o for o in record["current_state"]["objects"] if restates(o))
    as_int = copy.deepcopy(obj)
    name = next(k for k, v in obj["properties"].items() if isinstance(v, float) and v.is_integer())
    as_int["properties"][name] = int(obj["properties"][name])
    assert scores({"modified": [as_int], "removed": []}, record).binary == 1.0
    bool_as_int = copy.deepcopy(obj)
    name = next(k for k, v in obj["properties"].items() if isinstance(v, bool))
    bool_as_int["properties"][name] = int(obj["properties"][name])
    assert scores({"modified": [bool_as_int], "removed": []}, record).binary == 0.0


def test_malformed_json_is_repaired_or_scored_zero(modified_record):
    gold_json = json.dumps(text_game.gold_answer(modified_record))
    trailing_comma = gold_json[:-1] + ', }'
    assert scores(f"The final answer is: {trailing_comma}", modified_record).binary == 1.0
    cut_off = gold_json[:-2]  # ran out of tokens before the closing braces
    assert scores(f"The final answer is: {cut_off}", modified_record).binary == 1.0
    for garbage in ["The final answer is: I am not sure.", "", "{]", "The final answer is: [1, 2, 3]",
                    'The final answer is: {"modified": "the tap", "removed": []}']:
        s = scores(garbage, modified_record)
        assert not s.parsed and s.binary == 0.0 and s.task == 0.0


def test_python_literals(unchanged_record):
    gold = text_game.gold_answer(unchanged_record)
    python_repr = f"The final answer is: {gold!r}"  # {'modified': [], ..., 'gameOver': False, ...}
    assert "False" in python_repr
    assert scores(python_repr, unchanged_record).binary == 1.0


def test_answers_wrapped_in_reasoning(modified_record):
    gold_json = json.dumps(text_game.gold_answer(modified_record))
    draft = json.dumps({"modified": [], "removed": [], "score": {}})
    wrapped = [
        f"<think>Maybe nothing changes: The final answer is: {draft}</think>\nThe final answer is: {gold_json}",
        f"Let me think. A draft: {draft}. Hmm, no.\n\nThe final answer is:\n```json\n{gold_json}\n```\nDone.",
        f"Reasoning first.\n```json\n{draft}\n```\nOn second thought:\n```json\n{gold_json}\n```",
        f"the final answer is: {gold_json}",
    ]
    for text in wrapped:
        assert scores(text, modified_record).binary == 1.0, text[:80]
    assert scores(f"The final answer is: {gold_json}\nThe final answer is: {draft}", modified_record).binary == 0.0


def test_lenient_forms_of_a_right_answer(removal_record, unchanged_record):
    gold = text_game.gold_answer(removal_record)
    as_strings = copy.deepcopy(gold)
    for obj in as_strings["modified"]:
        obj["uuid"] = str(obj["uuid"])
    as_strings["removed"] = [str(u) for u in as_strings["removed"]]
    assert scores(as_strings, removal_record).binary == 1.0
    single = {**gold, "removed": gold["removed"][0]}  # one uuid, not in a list
    assert len(gold["removed"]) == 1 and scores(single, removal_record).binary == 1.0
    # a score left out or empty keeps the current score, as ByteSized32's answer format allows
    no_score = {"modified": [], "removed": []}
    assert scores(no_score, unchanged_record).binary == 1.0
    assert scores({**no_score, "score": {}}, unchanged_record).binary == 1.0


def test_answer_must_have_modified_and_removed(unchanged_record):
    s = scores({"modified": []}, unchanged_record)
    assert not s.parsed and s.binary == 0.0


def test_reward_rejects_non_text(records):
    with pytest.raises(ValueError, match="response"):
        text_game.binary_reward(None, records[0])


# ------------------------------------------------------------------------------------------------------ evaluation
def test_evaluation_columns(records):
    gold = text_game.evaluate([text_game.gold_response(r) for r in records], records)
    assert gold["accuracy"] == {"unchanged": 1.0, "changed": 1.0, "all": 1.0}
    assert gold["count"] == {"unchanged": 41, "changed": 23, "all": 64}
    assert gold["unparseable"] == 0
    nothing = answer_text({"modified": [], "removed": [], "score": {}})
    lazy = text_game.evaluate([nothing] * len(records), records)
    assert lazy["accuracy"] == {"unchanged": 1.0, "changed": 0.0, "all": 41 / 64}
    junk = text_game.evaluate(["no idea"] * len(records), records)
    assert junk["accuracy"]["all"] == 0.0 and junk["unparseable"] == 64 and junk["task_reward"] == 0.0
    with pytest.raises(ValueError, match="responses"):
        text_game.evaluate(["x"], records)


# --------------------------------------------------------------------------------------------------------- parsing
def test_answer_region_rules():
    assert parsing.answer_region("a The final answer is: x The final answer is: y") == " y"
    assert parsing.answer_region('so ```json\n{"a": 1}\n``` and ```\n{"b": 2}\n```').strip() == '{"b": 2}'
    assert parsing.answer_region("just text") == "just text"
    assert parsing.answer_region("<think>The final answer is: no</think>plain") == "plain"


def test_python_literals_outside_strings_only():
    text = '{"a": True, "b": None, "c": "required: True", "d": [False]}'
    assert json.loads(parsing.python_literals_to_json(text)) == {
        "a": True, "b": None, "c": "required: True", "d": [False]
    }
    python_quotes = "{'a': True, 'b': 'is True', 'c': \"it's None\"}"
    assert parsing.parse_json(python_quotes) == {"a": True, "b": "is True", "c": "it's None"}


def test_parse_json_gives_no_answer_rather_than_raising():
    for text in ["", "   ", "no json here"]:
        assert parsing.parse_json(text) is parsing.NO_ANSWER
    assert parsing.parse_json("null") is None
    assert parsing.parse_json("{'a': 1,}") == {"a": 1}
