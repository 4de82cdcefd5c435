"""Raw prompt/completion data: the prompt_completion and herald formats, their exact ids and loss
mask, truncation accounting, and SFT runs on them through the CLI (no chat template, no chat.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_micro_pipeline

from lmlab.cli import main
from lmlab.data import herald
from lmlab.data.formats import (DataSpec, herald_summary, read_completions, read_conversations, read_sft_data,
                                skipped_summary)
from lmlab.errors import UserError
from lmlab.models import load_model
from lmlab.train.sft import completion_ids, conversation_positions


def jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def example(i: int) -> dict:
    return {"prompt": f"Add {i} and {i}:", "completion": f" {2 * i} is the sum."}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    # A 512-token context: Herald prompts (header, docstring, statement) are a few hundred tokens here.
    root = tmp_path_factory.mktemp("sft_raw")
    p = build_micro_pipeline(root, seq_len=513, steps=4)
    model, tok, _ = load_model(p["model"])
    return {**p, "root": root, "model_obj": model, "tok": tok}


# ----------------------------------------------------------------------------- ids and mask

def test_ids_and_mask_of_one_example(pipe):
    tok = pipe["tok"]
    prompt, completion = "theorem t : 1 + 1 = 2 :=", " by\n  norm_num"
    ids, mask = completion_ids(prompt, completion, tok)
    p, c = tok.encode(prompt), tok.encode(completion)
    assert ids == [tok.bos_id] + p + c + [tok.eos_id]
    assert mask == [False] * (1 + len(p)) + [True] * (len(c) + 1)
    x, y = conversation_positions(ids, mask)
    assert list(x) == ids[:-1] and [int(t) for t in y if t != -100] == c + [tok.eos_id]
    assert (y[:len(p)] == -100).all()  # the prompt (predicted from bos on) is never a target


def test_truncation_cuts_the_completion_or_drops_the_example(pipe):
    tok = pipe["tok"]
    prompt, completion = "Add 3 and 3:", " 6 is the sum of three and three."
    ids, _ = completion_ids(prompt, completion, tok)
    n_head = 1 + len(tok.encode(prompt))
    stats: dict = {}
    cut, mask = completion_ids(prompt, completion, tok, max_len=n_head + 2, stats=stats)
    assert cut == ids[:n_head + 2] and mask == [False] * n_head + [True, True] and tok.eos_id not in cut
    assert stats == {"truncated": 1, "cut_tokens": len(ids) - n_head - 2}
    assert completion_ids(prompt, completion, tok, max_len=n_head + 1, stats=stats)[1][-1]  # one completion token
    assert completion_ids(prompt, completion, tok, max_len=n_head, stats=stats) is None  # the prompt fills it
    assert stats["prompt_too_long"] == 1 and stats["truncated"] == 2
    assert completion_ids(prompt, completion, tok, max_len=len(ids), stats={}) == (ids, [False] * n_head +
                                                                                   [True] * (len(ids) - n_head))


# ----------------------------------------------------------------------------- reading

def test_auto_detection_fields_and_kind(tmp_path):
    f = jsonl(tmp_path / "pc.jsonl", [example(1), example(2)])
    assert read_completions(str(f)) == [("Add 1 and 1:", " 2 is the sum."), ("Add 2 and 2:", " 4 is the sum.")]
    assert read_sft_data(str(f))[0] == "raw"
    renamed = jsonl(tmp_path / "r.jsonl", [{"q": "Add 1 and 1:", "a": " 2", "id": 3}])
    spec = DataSpec(path=str(renamed), fields={"prompt": "q", "completion": "a"})
    assert read_completions(spec) == [("Add 1 and 1:", " 2")]
    assert read_completions(DataSpec(path=str(f), format="prompt_completion", max_records=1)) == \
        [("Add 1 and 1:", " 2 is the sum.")]
    with pytest.raises(UserError, match="raw prompt/completion examples rather than conversations"):
        read_conversations(str(f))
    chat = jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "yo"}]}])
    assert read_sft_data(str(chat))[0] == "chat"
    with pytest.raises(UserError, match="is 'messages' data, not prompt/completion examples"):
        read_completions(str(chat))


def test_malformed_records_name_file_and_line(tmp_path):
    f = jsonl(tmp_path / "bad.jsonl", [example(1), {"prompt": "only a prompt"}, {"prompt": "  ", "completion": "x"},
                                       '{"prompt": ', {"prompt": ["a"], "completion": "b"}, example(2)])
    with pytest.raises(UserError, match=rf"{f}:2: missing field 'completion'.*invalid=skip"):
        read_completions(str(f))
    stats, where = {}, []
    got = read_completions(DataSpec(path=str(f), invalid="skip"), stats=stats, locations=where)
    assert got == [("Add 1 and 1:", " 2 is the sum."), ("Add 2 and 2:", " 4 is the sum.")]
    assert where == [f"{f}:1", f"{f}:6"]
    assert stats["invalid_by_reason"] == {"missing_field": 1, "empty_field": 1, "not_json": 1, "wrong_type": 1}
    assert [m.split(": ")[0] for m in stats["invalid_first"]] == [f"{f}:2", f"{f}:3", f"{f}:4"]
    assert f"{f}:3: field 'prompt' is empty" in stats["invalid_first"][1]
    assert skipped_summary(stats, str(f)).startswith(f"skipped 4 malformed records in {f}")
    only_bad = jsonl(tmp_path / "worse.jsonl", [{"prompt": "p", "completion": ""}])
    with pytest.raises(UserError, match="no prompt/completion examples left after skipping 1 malformed record"):
        read_completions(DataSpec(path=str(only_bad), invalid="skip"))


# ----------------------------------------------------------------------------- herald

def test_herald_format_gives_the_split_and_counts_the_drops(tmp_path):
    path = herald.write_sample(tmp_path / "h.parquet", n=120, seed=1)
    ref_stats: dict = {}
    train, valid = herald.split_examples(herald.read_herald(path, stats=ref_stats), 0.1)
    assert train and valid
    stats, where = {}, []
    got = read_completions(DataSpec(path=str(path), format="herald"), stats=stats, locations=where)
    assert got == [(r["prompt"], r["completion"]) for r in map(herald.to_record, train)]
    assert all(w.startswith(f"{path}:row ") for w in where) and len(where) == len(got)
    h = stats["herald"]
    assert (h["rows"], h["examples"], h["in_split"], h["split"]) == (120, ref_stats["examples"], len(train), "train")
    assert h["dropped"] == ref_stats["dropped"] and h["dropped"]["unanalyzable_header"] == 4
    assert h["dropped"]["self_citation"] == 1 and h["dropped_first"] == ref_stats["dropped_first"]
    line = herald_summary(stats, str(path))
    assert line.startswith(f"{path}: kept {ref_stats['examples']} of 120 rows; dropped unanalyzable_header 4")
    assert line.endswith(f"; {len(train)} examples in the train split (herald_valid_fraction 0.1)")
    # the sample repeats its ~30 facts under different ids, so the sides are told apart by row
    val_where, all_where, wide_where = [], [], []
    val = read_completions(DataSpec(path=str(path), format="herald", herald_split="valid"), locations=val_where)
    assert val == [(r["prompt"], r["completion"]) for r in map(herald.to_record, valid)]
    assert not set(val_where) & set(where)
    everything = read_completions(DataSpec(path=str(path), format="herald", herald_split="all"), locations=all_where)
    assert sorted(all_where) == sorted(where + val_where) and len(everything) == len(got) + len(val)
    read_completions(DataSpec(path=str(path), format="herald", herald_valid_fraction=0.5), locations=wide_where)
    assert set(wide_where) < set(where)  # a larger valid side takes rows from train, never adds any
    with pytest.raises(UserError, match="look like Herald_proofs rows.*set format=herald"):
        read_completions(str(herald.write_sample(tmp_path / "h.jsonl", n=10)))


def test_herald_malformed_rows_follow_invalid_and_hf_sources_read_alike(tmp_path):
    rows = herald.sample_rows(20, seed=2)
    del rows[3]["formal_proof"]
    f = jsonl(tmp_path / "h.jsonl", rows[:5] + ["{not json"] + rows[5:])
    with pytest.raises(UserError, match=rf"{f}:4: missing column formal_proof.*invalid=skip"):
        read_completions(DataSpec(path=str(f), format="herald"))
    stats: dict = {}
    got = read_completions(DataSpec(path=str(f), format="herald", herald_split="all", invalid="skip"), stats=stats)
    assert stats["invalid_by_reason"] == {"missing_field": 1, "not_json": 1}
    assert stats["herald"]["rows"] == 19 and len(got) == stats["herald"]["examples"]
    # hf: json with data_files (the offline stand-in for hf: FrenzyMath/Herald_proofs) reads the same rows
    clean = jsonl(tmp_path / "clean.jsonl", rows[:3] + rows[4:])
    hf = read_completions(DataSpec(hf="json", data_files=[str(clean)], format="herald", herald_split="all"))
    assert hf == read_completions(DataSpec(path=str(clean), format="herald", herald_split="all"))


# ----------------------------------------------------------------------------- sft

def _completion_loss(model, tok, examples) -> float:
    """Mean cross entropy over the completion tokens (and eos) of `examples`, one at a time."""
    nats, n = 0.0, 0
    with torch.no_grad():
        for p, c in examples:
            x, y = conversation_positions(*completion_ids(p, c, tok))
            loss = model(torch.tensor(x)[None], torch.tensor(y)[None], return_logits=False)[1]
            k = int((y != -100).sum())
            nats, n = nats + float(loss) * k, n + k
    return nats / n


def test_sft_on_prompt_completion_learns_and_writes_no_chat_json(pipe, capsys):
    root, tok = pipe["root"], pipe["tok"]
    records = [example(i) for i in range(24)]
    long_completion = {"prompt": "Count:", "completion": " " + " ".join(str(i) for i in range(60))}
    long_prompt = {"prompt": "Ignore this: " + "x y z " * 40, "completion": " done"}
    data = jsonl(root / "pc.jsonl", records + [long_completion, long_prompt])
    out = root / "raw"
    # `out` first holds a chat model: retrained on raw data, it must lose its chat.json
    chat = jsonl(root / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "yo"}]}] * 4)
    assert main(["sft", f"init={pipe['model']}", f"data={chat}", f"out={out}", "train.steps=1", "train.device=cpu",
                 "eval.batches=0", "checkpoint.every=0", "val_fraction=0"]) == 0
    assert (out / "chat.json").is_file()
    capsys.readouterr()
    assert main(["sft", f"init={pipe['model']}", f"data={data}", f"out={out}", "seq_len=48", "train.steps=30",
                 "train.batch_size=4", "train.lr=3e-3", "train.device=cpu", "val_fraction=0", "eval.batches=1",
                 "eval.every=15", "log.every=1", "checkpoint.every=0", "template=instruct",
                 "sample_prompts=['Add 5 and 5:']", "sample_max_new_tokens=6", "resume=never"]) == 0
    err = capsys.readouterr().err
    assert "template=instruct is not used: raw prompt/completion data" in err
    assert "25 prompt/completion examples, no chat template; 1 with the completion cut to fit, 1 dropped" in err
    assert not (out / "chat.json").exists()
    st = json.loads((out / "manifest.json").read_text())["stats"]
    assert st["data_kind"] == "raw" and st["template"] is None and st["examples"] == 26
    assert (st["truncated_completions"], st["dropped_long_prompts"], st["train_examples"]) == (1, 1, 25)
    assert st["cut_tokens"] > 0 and st["datasets"][0]["truncated_completions"] == 1
    assert st["datasets"][0]["dropped_long_prompts"] == 1 and "conversations" not in st
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    model, _, man = load_model(out)
    assert "chat" not in man
    before, after = _completion_loss(pipe["model_obj"], tok, [(r["prompt"], r["completion"]) for r in records]), \
        _completion_loss(model, tok, [(r["prompt"], r["completion"]) for r in records])
    assert after < 0.6 * before
    samples = [json.loads(s) for s in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [15, 30] and samples[0]["prompt"] == "Add 5 and 5:"


def test_sft_refuses_a_mix_of_chat_and_raw_data(pipe, capsys):
    root = pipe["root"]
    raw = jsonl(root / "mix_raw.jsonl", [example(i) for i in range(4)])
    conv = jsonl(root / "mix_chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "yo"}]}] * 4)
    out = root / "mix"
    assert main(["sft", f"init={pipe['model']}", f"data=[{raw}, {conv}]", f"out={out}", "train.steps=1",
                 "train.device=cpu", "checkpoint.every=0"]) == 2
    err = capsys.readouterr().err
    assert f"mixes conversations ({conv}) with raw prompt/completion examples ({raw})" in err
    assert "Traceback" not in err and not (out / "manifest.json").exists()


def test_sft_on_herald_reports_the_dropped_rows(pipe, capsys):
    root = pipe["root"]
    path = herald.write_sample(root / "herald.parquet", n=60, seed=0)
    out = root / "herald_sft"
    assert main(["sft", f"init={pipe['model']}", f"data=[{{path: {path}, format: herald}}]", f"out={out}",
                 "train.steps=2", "train.batch_size=2", "train.device=cpu", "val_fraction=0", "eval.batches=0",
                 "checkpoint.every=0"]) == 0
    err = capsys.readouterr().err
    ref: dict = {}
    train, _ = herald.split_examples(herald.read_herald(path, stats=ref), 0.1)
    assert f"sft: {path}: kept {ref['examples']} of 60 rows; dropped unanalyzable_header 2" in err
    st = json.loads((out / "manifest.json").read_text())["stats"]
    assert st["herald_dropped"] == ref["dropped"] and st["examples"] == len(train)
    assert st["datasets"][0]["herald"]["dropped"] == ref["dropped"]
    assert st["datasets"][0]["herald"]["split"] == "train" and not (out / "chat.json").exists()
    lengths = [len(completion_ids(r["prompt"], r["completion"], pipe["tok"])[0]) for r in map(herald.to_record, train)]
    assert st["dropped_long_prompts"] == 0 and st["truncated_completions"] == int(np.sum(np.array(lengths) > 513))
