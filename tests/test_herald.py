"""lmlab.data.herald: reading Herald_proofs rows, cleaning, renaming, refusing self-citing proofs,
the prompt/completion layout, the split, and the sample generator (all on local files)."""

from __future__ import annotations

import json
import random
import sys
import types

import pytest

from lmlab.data import herald
from lmlab.errors import UserError


def row(**kw) -> dict:
    base = {"id": 7, "name": "Nat.succ_le_of_lt",
            "formal_theorem": "theorem Nat.succ_le_of_lt {n m : ℕ} (h : n < m) : succ n ≤ m :=",
            "informal_theorem": "If $n < m$ then $n + 1 \\le m$.", "formal_proof": "by\n  exact h",
            "informal_proof": "By definition.", "commented_proof": "by\n  -- by definition\n  exact h",
            "header": herald.HEADER}
    base.update(kw)
    return base


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- reading

def test_parquet_and_jsonl_give_the_same_examples(tmp_path):
    pq = herald.write_sample(tmp_path / "h.parquet", n=60, seed=3)
    jl = herald.write_sample(tmp_path / "h.jsonl", n=60, seed=3)
    s1, s2, where = {}, {}, []
    a = herald.read_herald(pq, stats=s1, locations=where)
    b = herald.read_herald(jl, stats=s2)
    assert a == b and len(a) == s1["examples"] == len(where)
    assert s1["dropped"] == s2["dropped"] and s1["rows"] == 60
    assert where[0].startswith(f"{pq}:row ")
    import pyarrow.parquet as papq
    assert str(papq.read_schema(pq).field("id").type) == "int64"  # as on the hub


def test_missing_column_names_file_row_and_columns(tmp_path):
    bad = row()
    del bad["header"], bad["formal_proof"]
    p = write_rows(tmp_path / "x.jsonl", [row(), bad])
    with pytest.raises(UserError) as e:
        herald.read_herald(p)
    msg = str(e.value)
    assert f"{p}:2: missing columns formal_proof, header" in msg
    assert "id, name, formal_theorem, informal_theorem, formal_proof, informal_proof, commented_proof, header" in msg


def test_optional_columns_may_be_absent_and_bad_values_are_named(tmp_path):
    r = row()
    del r["informal_proof"], r["commented_proof"]
    assert len(herald.read_herald(write_rows(tmp_path / "a.jsonl", [r]))) == 1
    with pytest.raises(UserError, match=r"b\.jsonl:1: column 'formal_proof' must be text"):
        herald.read_herald(write_rows(tmp_path / "b.jsonl", [row(formal_proof=["by", "simp"])]))
    with pytest.raises(UserError, match=r"c\.jsonl:1: column 'id'"):
        herald.read_herald(write_rows(tmp_path / "c.jsonl", [row(id=None)]))
    (tmp_path / "d.jsonl").write_text(json.dumps(row()) + "\n{not json\n")
    with pytest.raises(UserError, match=r"d\.jsonl:2: not valid JSON"):
        herald.read_herald(tmp_path / "d.jsonl")
    with pytest.raises(UserError, match="exactly one of path"):
        herald.read_herald()


def test_hf_path_reads_through_load_dataset(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None, data_files=None):
        calls.append((name, split))
        return [row(), row(id=8, header="Unable to analyze")]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    stats, where = {}, []
    ex = herald.read_herald(hf=herald.HF_NAME, stats=stats, locations=where)
    assert calls == [("FrenzyMath/Herald_proofs", "train")]
    assert [e.id for e in ex] == ["7"] and where == ["hf:FrenzyMath/Herald_proofs[train]:row 1"]
    assert stats["dropped"] == {"unanalyzable_header": 1}


# ----------------------------------------------------------------------------- cleaning

def test_unanalyzable_and_empty_rows_are_dropped_and_counted(tmp_path):
    rows = [row(id=1), row(id=2, header="Unable to analyze"), row(id=3, header="import Mathlib\nunable to analyze x"),
            row(id=4, formal_theorem="  "), row(id=5, formal_proof="\n"), row(id=6, formal_theorem="example : 1 = 1 :="),
            row(id=9, formal_proof=None)]
    p = write_rows(tmp_path / "r.jsonl", rows)
    stats = {}
    ex = herald.read_herald(p, stats=stats)
    assert [e.id for e in ex] == ["1"]
    assert stats["rows"] == 7 and stats["examples"] == 1
    assert stats["dropped"] == {"unanalyzable_header": 2, "empty_theorem": 1, "empty_proof": 2, "no_theorem_name": 1}
    assert stats["dropped_first"]["unanalyzable_header"] == [f"{p}:2 (Nat.succ_le_of_lt)", f"{p}:3 (Nat.succ_le_of_lt)"]
    assert "kept 1 of 7 rows; dropped empty_proof 2" in herald.summary(stats)


def test_a_source_with_nothing_usable_says_why(tmp_path):
    p = write_rows(tmp_path / "u.jsonl", [row(header="Unable to analyze")])
    with pytest.raises(UserError, match="no usable Herald_proofs row.*unanalyzable_header 1"):
        herald.read_herald(p)


# ----------------------------------------------------------------------------- renaming

@pytest.mark.parametrize("stmt, name, new", [
    ("theorem two_mul_le_add_sq (a b : ℝ) : 2 * a * b ≤ a ^ 2 + b ^ 2 :=", "two_mul_le_add_sq",
     "theorem two_mul_le_add_sq_herald (a b : ℝ) : 2 * a * b ≤ a ^ 2 + b ^ 2 :="),
    ("theorem Nat.Prime.two_le {p : ℕ} (hp : p.Prime) : 2 ≤ p :=", "Nat.Prime.two_le",
     "theorem Nat.Prime.two_le_herald {p : ℕ} (hp : p.Prime) : 2 ≤ p :="),
    ("theorem Nat.«sum first odd» (n : ℕ) : n = n :=", "Nat.«sum first odd»",
     "theorem Nat.«sum first odd_herald» (n : ℕ) : n = n :="),
    ("theorem «Nat.weird» : True :=", "«Nat.weird»", "theorem «Nat.weird_herald» : True :="),
    ("/-- This theorem is a lemma. -/\n@[simp] protected lemma Nat.add_sub_cancel' {n m : ℕ} : n + m - m = n :=",
     "Nat.add_sub_cancel'",
     "/-- This theorem is a lemma. -/\n@[simp] protected lemma Nat.add_sub_cancel'_herald {n m : ℕ} : n + m - m = n :="),
])
def test_rename_plain_dotted_guillemets(stmt, name, new):
    assert herald.rename_theorem(stmt) == (new, name)


def test_example_fields_and_statement_normalisation():
    ex, reason = herald.clean_row(row(formal_theorem="theorem Foo.bar : 1 = 1 := by", formal_proof="  rfl\n"))
    assert reason is None and ex.name == "Foo.bar"
    assert (ex.theorem, ex.proof) == ("theorem Foo.bar_herald : 1 = 1 :=", "by\n  rfl")
    ex, _ = herald.clean_row(row(formal_theorem="theorem Foo.baz : 1 = 1", formal_proof="by\r\n  rfl"))
    assert (ex.theorem, ex.proof) == ("theorem Foo.baz_herald : 1 = 1 :=", "by\n  rfl")


# ----------------------------------------------------------------------------- self-citation

@pytest.mark.parametrize("proof", [
    "by\n  exact Nat.add_comm a b",          # the full name
    "by\n  rw [add_comm]",                   # the last component, unqualified (namespace Nat is open)
    "by\n  exact (Nat.add_comm a b).symm",   # the full name, then a field
    "by\n  simp only [← Nat.add_comm.symm]",
    "by\n  exact @Nat.add_comm a b",
    "by\n  exact h.add_comm",                # field notation on a local: may be Nat.add_comm
    "by\n  exact (f a).add_comm",
    "by\n  exact «add_comm» a b",           # guillemets are only quoting
    "Nat.add_comm a b",                      # a term proof
])
def test_self_citing_proofs_are_refused(proof):
    assert herald.cites(proof, ["Nat.add_comm"])
    ex, reason = herald.clean_row(row(name="Nat.add_comm", formal_proof=proof,
                                      formal_theorem="theorem Nat.add_comm (a b : ℕ) : a + b = b + a :="))
    assert ex is None and reason == "self_citation"


@pytest.mark.parametrize("proof", [
    "by\n  exact add_comm' a b",              # a longer identifier
    "by\n  simp [Nat.add_comm_sub, add_comm_left]",
    "by\n  rw [Nat.add_comm']",
    "by\n  exact Int.add_comm a b",          # another namespace's lemma of the same short name
    "by\n  -- like Nat.add_comm\n  omega",   # only in a comment
    "by\n  /- add_comm /- nested -/ add_comm -/\n  omega",
    "by\n  trace \"add_comm\"\n  omega",      # only in a string
    "by\n  exact Nat.add_comm_herald a b",
])
def test_longer_identifiers_comments_and_other_namespaces_are_not_citations(proof):
    assert not herald.cites(proof, ["Nat.add_comm"])
    ex, reason = herald.clean_row(row(name="Nat.add_comm", formal_proof=proof,
                                      formal_theorem="theorem Nat.add_comm (a b : ℕ) : a + b = b + a :="))
    assert reason is None and ex.theorem.startswith("theorem Nat.add_comm_herald (a b")


def test_self_citation_of_dotted_and_guillemet_names_and_the_name_column():
    assert herald.cites("by\n  exact hp.two_le", ["Nat.Prime.two_le"])
    assert herald.cites("by\n  exact Prime.two_le hp", ["Nat.Prime.two_le"])
    assert herald.cites("by\n  exact hp.1.two_le", ["Nat.Prime.two_le"])
    assert not herald.cites("by\n  exact Int.two_le", ["Nat.Prime.two_le"])
    assert herald.cites("by\n  exact Nat.«sum odd» n", ["Nat.«sum odd»"])
    assert herald.cites("by\n  exact sum_odd n", ["Nat.«sum_odd»"])
    # The statement declares `add_comm` (inside `open Nat`), the name column is qualified.
    ex, reason = herald.clean_row(row(name="Nat.add_comm", formal_theorem="theorem add_comm' (a b : ℕ) : a + b = b + a :=",
                                      formal_proof="by\n  exact Nat.add_comm a b"))
    assert reason == "self_citation"


# ----------------------------------------------------------------------------- layout

def test_prompt_completion_layout_exactly():
    ex, _ = herald.clean_row(row())
    rec = herald.to_record(ex)
    assert rec == {
        "prompt": "import Mathlib\nimport Aesop\nset_option maxHeartbeats 400000\n"
                  "open BigOperators Real Nat Topology Rat\n\n"
                  "/-- If $n < m$ then $n + 1 \\le m$. -/\n"
                  "theorem Nat.succ_le_of_lt_herald {n m : ℕ} (h : n < m) : succ n ≤ m :=",
        "completion": " by\n  exact h",
    }
    assert ex.prompt + ex.theorem == rec["prompt"] and ex.header == herald.HEADER
    assert (ex.id, ex.name) == ("7", "Nat.succ_le_of_lt")
    assert herald.lean_source(ex, " by\n  exact h\n") == \
        "theorem Nat.succ_le_of_lt_herald {n m : ℕ} (h : n < m) : succ n ≤ m := by\n  exact h\n"
    assert rec["prompt"] + rec["completion"] == ex.header + "\n\n/-- If $n < m$ then $n + 1 \\le m$. -/\n" + \
        herald.lean_source(ex, ex.proof).rstrip("\n")


def test_prompt_without_informal_and_with_comment_markers():
    ex, _ = herald.clean_row(row(informal_theorem="  "))
    assert ex.prompt == herald.HEADER + "\n\n"
    ex, _ = herald.clean_row(row(informal_theorem="a -/ b /- c", header=""))
    assert ex.prompt == "/-- a - / b / - c -/\n"


# ----------------------------------------------------------------------------- split

def test_split_is_deterministic_disjoint_and_order_independent():
    exs = [herald.clean_row(row(id=i))[0] for i in range(200)]
    train, valid = herald.split_examples(exs, valid_fraction=0.1)
    # Pinned: sha256 of the id, so the same on every machine and Python (no hash randomisation).
    assert [int(e.id) for e in valid] == [0, 11, 13, 36, 41, 55, 62, 72, 110, 113, 114, 115, 117, 129, 134,
                                          151, 154, 161, 175, 183]
    assert len(train) == 180 and not {e.id for e in train} & {e.id for e in valid}
    shuffled = exs[:]
    random.Random(1).shuffle(shuffled)
    t2, v2 = herald.split_examples(shuffled)
    assert {e.id for e in v2} == {e.id for e in valid} and {e.id for e in t2} == {e.id for e in train}
    # A row keeps its side when other rows are removed.
    _, v3 = herald.split_examples(exs[100:])
    assert {e.id for e in v3} == {e.id for e in valid if int(e.id) >= 100}
    assert herald.split_examples(exs, valid_fraction=0.0) == (exs, [])
    with pytest.raises(UserError):
        herald.split_examples(exs, valid_fraction=1.0)


def test_split_of_sample_is_about_ninety_ten(tmp_path):
    exs = herald.read_herald(herald.write_sample(tmp_path / "s.jsonl", n=200, seed=0))
    train, valid = herald.split_examples(exs)
    assert len(train) + len(valid) == len(exs)
    assert 0.05 <= len(valid) / len(exs) <= 0.16


# ----------------------------------------------------------------------------- sample and writing

def test_sample_rows_have_all_columns_and_the_planted_cases():
    rows = herald.sample_rows(100, seed=5)
    assert rows == herald.sample_rows(100, seed=5) and rows != herald.sample_rows(100, seed=6)
    assert len(rows) == 100 and all(tuple(r) == herald.COLUMNS for r in rows)
    assert len({r["id"] for r in rows}) == 100 and all(isinstance(r["id"], int) for r in rows)
    assert all(isinstance(r[c], str) and r[c] for r in rows for c in herald.COLUMNS[1:])
    assert sum(r["header"] == "Unable to analyze" for r in rows) == 4
    assert sum(herald.clean_row(r)[1] == "self_citation" for r in rows) == 1
    assert any("«" in r["name"] for r in rows) and all(r["formal_theorem"].endswith(":=") for r in rows)
    assert sum("." in r["name"] for r in rows) > 50
    assert herald.sample_rows(0) == [] and len(herald.sample_rows(3)) == 3


def test_write_jsonl_atomic(tmp_path):
    recs = [{"prompt": "theorem x : ℕ :=", "completion": " by\n  exact 0\u2028"}, {"prompt": "b", "completion": "c"}]
    p = tmp_path / "sub" / "r.jsonl"
    assert herald.write_jsonl_atomic(recs, p) == 2
    assert [json.loads(line) for line in p.read_text(encoding="utf-8").split("\n") if line] == recs
    assert "ℕ" in p.read_text(encoding="utf-8")
    assert list(p.parent.iterdir()) == [p]  # no temporary file left
    with pytest.raises(TypeError):
        herald.write_jsonl_atomic([{"x": object()}], p)
    assert [json.loads(line) for line in p.read_text(encoding="utf-8").split("\n") if line] == recs
    assert list(p.parent.iterdir()) == [p]
    with pytest.raises(UserError, match="parquet or .jsonl"):
        herald.write_sample(tmp_path / "x.csv")
