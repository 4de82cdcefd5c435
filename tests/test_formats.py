"""Conversation and preference readers on small files: every format, auto detection, file:line errors."""

import json

import pytest

from lmlab.data.formats import DataSpec, as_spec, read_conversations, read_preferences
from lmlab.errors import UserError


def jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def test_messages_jsonl_and_validation_errors(tmp_path):
    good = {"messages": [{"role": "system", "content": "Be kind."}, U("hi"), A("hello"), U("bye"), A("ciao")]}
    f = jsonl(tmp_path / "m.jsonl", [good, {"messages": [U("a"), A("b")]}])
    convs = read_conversations(f)
    assert convs[0] == good["messages"] and convs[1] == [U("a"), A("b")]
    assert read_conversations(DataSpec(path=f, max_records=1)) == convs[:1]
    cases = {
        "unknown role 'bot'": {"messages": [U("a"), {"role": "bot", "content": "b"}]},
        "empty or missing content": {"messages": [U("a"), A("  ")]},
        "no assistant turn": {"messages": [U("a")]},
        "may only come first": {"messages": [U("a"), {"role": "system", "content": "s"}, A("b")]},
        "missing field 'messages'": {"messages_": [], "other": 1},
        "not valid JSON": '{"messages": [',
    }
    for msg, bad in cases.items():
        f = jsonl(tmp_path / "bad.jsonl", [good, bad])
        with pytest.raises(UserError, match=rf"bad\.jsonl:2: .*{msg}"):
            read_conversations(DataSpec(path=f, format="messages"))


def test_alpaca_json_and_field_overrides(tmp_path):
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps([{"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
                             {"instruction": "Say hi.", "input": "", "output": "hi"}]))
    convs = read_conversations(str(f))
    assert convs == [[{"role": "user", "content": "Add the numbers.", "input": "2 3"}, A("5")], [U("Say hi."), A("hi")]]
    from lmlab.data.chat import render_text
    text = render_text("alpaca", convs[0])
    assert "paired with an input" in text and "### Input:\n2 3\n\n### Response:\n5<|eos|>" in text
    f.write_text(json.dumps([{"instruction": "x", "input": ""}]))
    with pytest.raises(UserError, match=r"alpaca\.json:record 1: missing field 'output'"):
        read_conversations(DataSpec(path=str(f), format="alpaca"))
    g = jsonl(tmp_path / "g.jsonl", [{"problem": "1+1?", "solution": "2\n#### 2"}])
    assert read_conversations(DataSpec(path=g, format="gsm8k", fields={"question": "problem", "answer": "solution"})) \
        == [[U("1+1?"), A("2\n#### 2")]]


def test_gsm8k_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"question": ["What is 2+3?"], "answer": ["2+3=5\n#### 5"]}), tmp_path / "g.parquet")
    assert read_conversations(str(tmp_path / "g.parquet")) == [[U("What is 2+3?"), A("2+3=5\n#### 5")]]


def test_oasst1_trees_flattened(tmp_path):
    def msg(mid, parent, role, text, rank=None, lang="en"):
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, "lang": lang}
    rows = [msg("a", None, "prompter", "Q1"), msg("b", "a", "assistant", "worse", 1), msg("c", "a", "assistant", "better", 0),
            msg("d", "c", "prompter", "follow-up"), msg("e", "d", "assistant", "answer"),
            msg("f", "b", "prompter", "unanswered"),
            msg("g", None, "prompter", "Q2 auf deutsch", lang="de"), msg("h", "g", "assistant", "Antwort", 0, lang="de")]
    f = jsonl(tmp_path / "oasst.jsonl", rows)
    leaves = read_conversations(f)  # auto: oasst1, one conversation per leaf
    assert sorted(map(str, leaves)) == sorted(map(str, [
        [U("Q1"), A("worse")],                                  # leaf f (prompter) is dropped from the end
        [U("Q1"), A("better"), U("follow-up"), A("answer")],
        [U("Q2 auf deutsch"), A("Antwort")]]))
    best = read_conversations(DataSpec(path=f, oasst1_threads="best", lang="en"))
    assert best == [[U("Q1"), A("better"), U("follow-up"), A("answer")]]
    f = jsonl(tmp_path / "bad.jsonl", rows[:2] + [msg("x", "a", "moderator", "?")])
    with pytest.raises(UserError, match=r"bad\.jsonl:3: unknown oasst1 role 'moderator'"):
        read_conversations(f)


def test_preferences_text_hh_and_message_lists(tmp_path):
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    assert read_preferences(f) == [{"prompt": [U("2+2?")], "chosen": "4", "rejected": "5"}]
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: It is 4.",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: Go away."}
    f = jsonl(tmp_path / "hh.jsonl", [hh])
    assert read_preferences(f) == [{"prompt": [U("Hi"), A("Hello!"), U("2+2?")], "chosen": "It is 4.",
                                    "rejected": "Go away."}]
    # read_conversations on preference data gives prompt + chosen (e.g. SFT on the chosen replies)
    assert read_conversations(f) == [[U("Hi"), A("Hello!"), U("2+2?"), A("It is 4.")]]
    uf = {"prompt": "2+2?", "chosen": [U("2+2?"), A("4")], "rejected": [U("2+2?"), A("22")], "score_chosen": 9.0}
    f = jsonl(tmp_path / "uf.jsonl", [uf])
    assert read_preferences(f) == [{"prompt": [U("2+2?")], "chosen": "4", "rejected": "22"}]
    f = jsonl(tmp_path / "uf_bad.jsonl", [uf, {**uf, "rejected": [U("3+3?"), A("6")]}])
    with pytest.raises(UserError, match=r"uf_bad\.jsonl:2: .*different conversations"):
        read_preferences(f)
    f = jsonl(tmp_path / "hh_bad.jsonl", [{**hh, "rejected": "\n\nHuman: Other\n\nAssistant: x"}])
    with pytest.raises(UserError, match=r"hh_bad\.jsonl:1: .*do not share the prompt"):
        read_preferences(f)
    with pytest.raises(UserError, match="not preference pairs"):
        read_preferences(jsonl(tmp_path / "m.jsonl", [{"messages": [U("a"), A("b")]}]))


def test_identical_pairs_error_or_skip(tmp_path):
    rows = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "same", "rejected": "same "}]
    f = jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(UserError, match=r"p\.jsonl:2: chosen and rejected are identical.*identical_pairs=skip"):
        read_preferences(f)
    stats = {}
    assert len(read_preferences(DataSpec(path=f, identical_pairs="skip"), stats=stats)) == 1
    assert stats == {"identical_skipped": 1}


def test_hf_datasets_path_and_spec_errors(tmp_path):
    f = jsonl(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?"}])
    spec = DataSpec(hf="json", data_files=[f], max_records=1)
    assert read_conversations(spec) == [[U("1+1?"), A("#### 2")]]
    with pytest.raises(UserError, match=r"hf:json\[train\]:row 2: missing field 'answer'"):
        read_conversations(DataSpec(hf="json", data_files=[f], format="gsm8k"))
    with pytest.raises(UserError, match="exactly one of path"):
        as_spec({"path": f, "hf": "json"})
    with pytest.raises(UserError, match="cannot tell the data format"):
        read_conversations(jsonl(tmp_path / "x.jsonl", [{"text": "hello"}]))
    with pytest.raises(UserError, match="data file not found"):
        read_conversations(str(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------- invalid: error | skip

HH_GOOD = {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"}


def test_malformed_preferences_error_by_default_or_are_skipped_and_counted(tmp_path):
    from lmlab.data.formats import skipped_summary

    rows = [HH_GOOD,
            {"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},  # 2
            {"chosen": "\n\nHuman: Hi there", "rejected": "\n\nHuman: Hi there"},                            # 3
            {"chosen": "\n\nHuman: Hi\n\nAssistant: yo"},                                                     # 4
            '{"chosen": "\\n\\nHuman: cut',                                                                  # 5
            {**HH_GOOD, "chosen": HH_GOOD["chosen"] + "!"},                                                   # 6
            {"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": "\n\nHuman: Hi\n\nAssistant: no"}]         # 7
    f = jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(UserError, match=r"hh\.jsonl:2: the chosen reply is empty; or set invalid=skip"):
        read_preferences(f)  # the first malformed record, though line 5 is not even JSON
    with pytest.raises(UserError, match=r"hh_json\.jsonl:2: not valid JSON .*; or set invalid=skip"):
        read_preferences(jsonl(tmp_path / "hh_json.jsonl", rows[:1] + rows[4:]))
    stats, where = {}, []
    pairs = read_preferences(DataSpec(path=f, invalid="skip"), stats=stats, locations=where)
    # the valid records come through exactly as they would alone, each with its file:line
    good = jsonl(tmp_path / "good.jsonl", [rows[0], rows[5]])
    assert pairs == read_preferences(good)
    assert where == [f"{f}:1", f"{f}:6"]
    assert stats["invalid_skipped"] == 5 and stats["identical_skipped"] == 0
    assert stats["invalid_by_reason"] == {"empty_reply": 2, "no_assistant_turn": 1, "missing_field": 1, "not_json": 1}
    assert len(stats["invalid_first"]) == 3
    assert stats["invalid_first"][0].startswith(f"{f}:2: the chosen reply is empty")
    assert stats["invalid_first"][1].startswith(f"{f}:3: the chosen transcript has no")
    assert stats["invalid_first"][2].startswith(f"{f}:4: missing field 'rejected'")
    line = skipped_summary(stats, f)
    assert line.startswith(f"skipped 5 malformed records in {f} (empty_reply 2, ") and f"first: {f}:2: " in line
    assert "\n" not in line and skipped_summary({"invalid_skipped": 0}, f) is None
    # stats add up over calls; max_records counts the pairs kept (reading stops there), not the records skipped
    assert len(read_preferences(DataSpec(path=f, invalid="skip", max_records=2), stats=stats)) == 2
    assert stats["invalid_skipped"] == 5 + 4 and len(stats["invalid_first"]) == 3
    # identical_pairs keeps its own policy: an identical pair is not malformed
    f2 = jsonl(tmp_path / "same.jsonl", [HH_GOOD, {**HH_GOOD, "rejected": HH_GOOD["chosen"]}, rows[1]])
    with pytest.raises(UserError, match=r"same\.jsonl:2: chosen and rejected are identical"):
        read_preferences(DataSpec(path=f2, invalid="skip"))
    stats, where = {}, []
    assert len(read_preferences(DataSpec(path=f2, invalid="skip", identical_pairs="skip"), stats, where)) == 1
    assert stats["identical_skipped"] == 1 and stats["invalid_skipped"] == 1 and where == [f"{f2}:1"]


def test_malformed_conversations_skipped_with_locations(tmp_path):
    good = {"messages": [U("a"), A("b")]}
    rows = [{"messages": [U("x"), {"role": "bot", "content": "y"}]}, good, {"messages": [U("x"), A("  ")]},
            {"other": 1}, "[1, 2]", {"messages": [U("c"), A("d")]}, {"messages": [U("e")]}]
    f = jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(UserError, match=r"m\.jsonl:1: .*unknown role 'bot'.*invalid=skip"):
        read_conversations(f)
    stats, where = {}, []
    convs = read_conversations(DataSpec(path=f, invalid="skip"), stats=stats, locations=where)
    assert convs == [[U("a"), A("b")], [U("c"), A("d")]] and where == [f"{f}:2", f"{f}:6"]
    assert stats["invalid_by_reason"] == {"unknown_role": 1, "empty_turn": 1, "missing_field": 1,
                                          "not_an_object": 1, "no_assistant_turn": 1}
    assert stats["invalid_skipped"] == 5 and stats["invalid_first"][0].startswith(f"{f}:1: message 1 has unknown")
    # max_records and locations stay aligned
    where = []
    assert read_conversations(DataSpec(path=f, invalid="skip", max_records=1), locations=where) == convs[:1]
    assert where == [f"{f}:2"]
    # format auto under skip: detected from the first record that tells (the first one is not an object)
    g = jsonl(tmp_path / "g.jsonl", ["[]", {"question": "1+1?", "answer": "2"}, {"question": "2+2?"}])
    stats = {}
    assert read_conversations(DataSpec(path=g, invalid="skip"), stats=stats) == [[U("1+1?"), A("2")]]
    assert stats["invalid_by_reason"] == {"not_an_object": 1, "missing_field": 1}
    # invalid=error (the default) adds nothing about malformed records to stats
    stats = {}
    read_conversations(jsonl(tmp_path / "ok.jsonl", [good]), stats=stats)
    assert stats == {}
    # nothing valid at all: still an error, with the counts and the first locations
    bad = jsonl(tmp_path / "bad.jsonl", rows[:1] + rows[2:3])
    with pytest.raises(UserError, match=r"bad\.jsonl: no conversations left after skipping 2 malformed records "
                                        r"\(empty_turn 1, unknown_role 1; first: .*bad\.jsonl:1: "):
        read_conversations(DataSpec(path=bad, invalid="skip"))
    with pytest.raises(UserError, match=r"no preference pairs left after skipping 1 malformed record \("):
        read_preferences(DataSpec(path=jsonl(tmp_path / "p.jsonl", [rows_hh_empty()]), invalid="skip"))


def rows_hh_empty():
    return {"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": "\n\nHuman: Hi\n\nAssistant: no"}


def test_malformed_oasst1_rows_and_hf_rows_skipped(tmp_path):
    def msg(mid, parent, role, text, rank=None):
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, "lang": "en"}
    rows = [msg("a", None, "prompter", "Q1"), msg("b", "a", "assistant", "A1", 0),
            msg("c", "a", "moderator", "?"), msg("d", "c", "assistant", "under the bad row"),
            msg("e", None, "prompter", "Q2"), msg("f", "e", "assistant", " ")]
    f = jsonl(tmp_path / "oasst.jsonl", rows)
    with pytest.raises(UserError, match=r"oasst\.jsonl:3: unknown oasst1 role"):
        read_conversations(f)
    stats, where = {}, []
    assert read_conversations(DataSpec(path=f, invalid="skip"), stats=stats, locations=where) == [[U("Q1"), A("A1")]]
    assert where == [f"{f}:2"] and stats["invalid_by_reason"] == {"unknown_role": 1, "empty_turn": 1}
    # hf datasets: locations name the row
    g = jsonl(tmp_path / "g.jsonl", [{"question": "1+1?"}, {"question": "2+2?", "answer": "4"}])
    stats, where = {}, []
    assert read_conversations(DataSpec(hf="json", data_files=[g], format="gsm8k", invalid="skip"), stats=stats,
                              locations=where) == [[U("2+2?"), A("4")]]
    assert where == ["hf:json[train]:row 2"] and stats["invalid_first"][0].startswith("hf:json[train]:row 1: missing")
