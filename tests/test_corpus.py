"""The corpus stage: every source kind, cleaning, dedup, bad input and the no-op re-run."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmlab import artifacts
from lmlab.data import corpus
from lmlab.data.sources import module_docstrings
from lmlab.errors import UserError

LONG = "The quick brown fox jumps over the lazy dog. "


def read_docs(out):
    return [json.loads(line) for shard in corpus.corpus_shards(out) for line in open(shard, encoding="utf-8")]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def run_corpus(tmp_path, sources, **kw):
    return corpus.run(corpus.Config(out=str(tmp_path / "corpus"), sources=sources, **kw))


def test_files_of_each_type_and_stats(tmp_path):
    (tmp_path / "a.txt").write_text("first text file. " * 4, encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"body": f"json doc {i}: " + LONG} for i in range(3)])
    pq.write_table(pa.table({"content": [f"parquet row {i}: " + LONG for i in range(2)], "n": [1, 2]}),
                   tmp_path / "c.parquet")
    out = run_corpus(tmp_path, [
        {"kind": "files", "paths": [str(tmp_path / "a.txt")]},
        {"kind": "files", "paths": [str(tmp_path / "b.jsonl")], "text_field": "body"},
        {"kind": "files", "paths": [str(tmp_path / "*.parquet")], "text_field": "content"},
    ], docs_per_shard=2)
    docs = read_docs(out)
    assert [d["text"][:11] for d in docs] == ["first text ", "json doc 0:", "json doc 1:", "json doc 2:",
                                             "parquet row", "parquet row"]
    assert len(corpus.corpus_shards(out)) == 3  # 6 docs, 2 per shard
    m = artifacts.read_manifest(out)
    assert m["kind"] == "corpus" and m["stats"]["documents"] == 6
    per = m["stats"]["per_source"]
    assert [p["documents"] for p in per] == [1, 3, 2]
    assert per[1]["characters"] == sum(len(d["text"]) for d in docs[1:4])
    assert per[1]["estimated_tokens"] == per[1]["characters"] // 4


def test_directory_input_and_limits(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(5):
        (d / f"{i}.txt").write_text(f"document number {i} " + LONG, encoding="utf-8")
    out = run_corpus(tmp_path, [{"kind": "files", "paths": [str(d)], "max_docs": 3}])
    assert len(read_docs(out)) == 3
    out = run_corpus(tmp_path, [{"kind": "files", "paths": [str(d)], "max_chars": 10}])
    assert len(read_docs(out)) == 1


def test_normalisation_near_empty_and_dedup(tmp_path):
    texts = ["e\u0301t\u00e9 \ufb01le " + LONG, "   ", "tiny", LONG + "dup", LONG + "dup", "line\r\nbreak " + LONG]
    f = write_jsonl(tmp_path / "x.jsonl", [{"text": t} for t in texts])
    src = [{"kind": "files", "paths": [str(f)]}]
    out = run_corpus(tmp_path, src, normalize="NFC", min_chars=10)
    docs = [d["text"] for d in read_docs(out)]
    assert docs[0].startswith("\u00e9t\u00e9 \ufb01le")  # composed é, ligature kept
    assert docs[-1].startswith("line\nbreak")
    per = artifacts.read_manifest(out)["stats"]["per_source"][0]
    assert (per["documents"], per["dropped_empty"], per["dropped_duplicates"]) == (3, 2, 1)
    docs = [d["text"] for d in read_docs(run_corpus(tmp_path, src, normalize="NFKC", min_chars=10))]
    assert docs[0].startswith("\u00e9t\u00e9 file")
    docs = [d["text"] for d in read_docs(run_corpus(tmp_path, src, normalize="none", min_chars=10, dedup=False))]
    assert docs[0].startswith("e\u0301t\u00e9") and len(docs) == 4


def test_stdlib_source_with_limit(tmp_path):
    out = run_corpus(tmp_path, [{"kind": "stdlib", "max_docs": 5}])
    docs = read_docs(out)
    assert len(docs) == 5 and all(d["source"] == "stdlib" for d in docs)
    out = run_corpus(tmp_path, [{"kind": "stdlib", "include_topics": False, "max_docs": 3}])
    assert any(d["text"].startswith("Module ") for d in read_docs(out))


def test_module_docstrings_parses_without_importing():
    src = '"""Mod doc."""\nimport nonexistent_module_xyz\nclass A:\n    """A doc."""\n    def m(self, x=1):\n        """M doc."""\n' \
          'def _private():\n    """hidden"""\ndef f(a, *b):\n    """F doc."""\n'
    text = module_docstrings(src, "pkg.mod")
    assert text == ("Module pkg.mod\n\nMod doc.\n\nclass pkg.mod.A\n\nA doc.\n\ndef pkg.mod.A.m(self, x=1)\n\nM doc.\n\n"
                    "def pkg.mod.f(a, *b)\n\nF doc.")


def test_hf_source_reads_local_json_and_parquet(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": f"hf json {i} " + LONG} for i in range(4)])
    pq.write_table(pa.table({"text": [f"hf parquet {i} " + LONG for i in range(3)]}), tmp_path / "d.parquet")
    out = run_corpus(tmp_path, [
        {"kind": "hf", "name": "json", "data_files": [str(f)], "max_docs": 3},
        {"kind": "hf", "name": "parquet", "data_files": [str(tmp_path / "d.parquet")]},
    ])
    docs = read_docs(out)
    assert [d["text"][:9] for d in docs] == ["hf json 0", "hf json 1", "hf json 2"] + ["hf parque"] * 3
    assert docs[0]["source"] == "hf:json"


def test_analyze_only_writes_nothing(tmp_path, capsys):
    f = write_jsonl(tmp_path / "x.jsonl", [{"text": LONG * 2}, {"text": "other " + LONG}])
    run_corpus(tmp_path, [{"kind": "files", "paths": [str(f)]}], analyze_only=True)
    assert not (tmp_path / "corpus").exists()
    table = capsys.readouterr().out
    assert "documents" in table and "estimated_tokens" in table and "total" in table
    chars = len((LONG * 2).strip()) + len(("other " + LONG).strip())
    assert f"{chars:,}" in table and f"{chars // 4:,}" in table


def test_bad_jsonl_lines_skip_and_stop(tmp_path, capsys):
    f = write_jsonl(tmp_path / "x.jsonl", [{"text": LONG}, "{not json", {"other": 1}, {"text": "fine " + LONG}])
    src = [{"kind": "files", "paths": [str(f)]}]
    out = run_corpus(tmp_path, src, on_bad_record="skip")
    assert len(read_docs(out)) == 2
    warn = capsys.readouterr().out
    assert "skipped 2 bad record(s)" in warn and f"{f}:2: not valid JSON" in warn and f"{f}:3: record has no 'text'" in warn
    with pytest.raises(UserError, match=f"{f}:2: not valid JSON"):
        run_corpus(tmp_path / "stop", src, on_bad_record="stop")


def test_non_utf8_and_binary_files(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(LONG, encoding="utf-8")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 ".encode("latin-1") * 20)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    src = [{"kind": "files", "paths": [str(good), str(latin), str(binary)]}]
    with pytest.raises(UserError, match=f"{latin}: not valid UTF-8"):
        run_corpus(tmp_path, src, on_bad_record="stop")
    out = run_corpus(tmp_path, src, on_bad_record="skip")
    assert len(read_docs(out)) == 1
    assert artifacts.read_manifest(out)["stats"]["bad_records"] == 2


def test_empty_corpus_and_missing_path(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"text": "short"}, {"text": ""}])
    with pytest.raises(UserError, match=r"empty after cleaning.*files:.*0 kept, 2 shorter than min_chars=32"):
        run_corpus(tmp_path, [{"kind": "files", "paths": [str(f)]}])
    assert not (tmp_path / "corpus").exists()
    with pytest.raises(UserError, match="input path not found: /nonexistent/file.txt"):
        run_corpus(tmp_path, [{"kind": "files", "paths": ["/nonexistent/file.txt"]}])


def test_rerun_is_noop_until_inputs_change(tmp_path, capsys):
    f = write_jsonl(tmp_path / "x.jsonl", [{"text": LONG}])
    src = [{"kind": "files", "paths": [str(f)]}]
    out = run_corpus(tmp_path, src)
    created = artifacts.read_manifest(out)["created"]
    capsys.readouterr()
    run_corpus(tmp_path, src)
    assert "corpus: up to date" in capsys.readouterr().out
    write_jsonl(f, [{"text": LONG}, {"text": "new " + LONG}])
    os.utime(f, ns=(1, 1))
    run_corpus(tmp_path, src)
    assert "up to date" not in capsys.readouterr().out
    assert len(read_docs(out)) == 2 and artifacts.read_manifest(out)["created"] >= created


def test_cli_missing_path_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmlab", "corpus", "sources=[{kind: files, paths: [/nonexistent]}]",
                        f"out={tmp_path / 'c'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: input path not found: /nonexistent (fix sources[].paths in the corpus config)"
    assert "Traceback" not in r.stderr
