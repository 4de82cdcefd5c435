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
