"""The pack stage and PackedDataset: layout, EOS separation, by-document split, streaming, refusals."""

import json

import numpy as np
import pytest

from lmlab import artifacts
from lmlab.data import corpus, pack, tokenizer
from lmlab.data.loader import PackedDataset, check_tokenizer
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import UserError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def make_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    docs = make_docs(150)
    f = root / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    c = corpus.run(corpus.Config(out=str(root / "corpus"), sources=[{"kind": "files", "paths": [str(f)]}], min_chars=1))
    t = tokenizer.run(tokenizer.Config(corpus=str(c), out=str(root / "tok"), vocab_size=400))
    return root, c, t, docs


def run_pack(setup, name, **kw):
    root, c, t, _ = setup
    cfg = dict(corpus=str(c), tokenizer=str(t), out=str(root / name), seq_len=32, workers=1) | kw
    return pack.run(pack.Config(**cfg))


def split_docs(out, docs):
    """Recover which documents went where by matching the packed stream against each document."""
    tok = Tokenizer.load(artifacts.read_manifest(out)["inputs"]["tokenizer"]["path"])
    return tok, [[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in docs]


def test_rows_dtype_manifest_and_eos_separation(setup):
    out = run_pack(setup, "p1")
    _, _, _, docs = setup
    m = artifacts.read_manifest(out)
    s = m["stats"]
    tok, encoded = split_docs(out, docs)
    assert s["seq_len"] == 32 and s["dtype"] == "uint16" and m["tokenizer_sha256"] == tok.sha256
    assert m["inputs"]["tokenizer"]["path"] == str(setup[2])
    train, val = PackedDataset(out, "train"), PackedDataset(out, "val")
    assert len(train) == s["train_rows"] > 0 and len(val) == s["val_rows"] > 0
    assert train.rows(range(len(train))).shape == (len(train), 32) and train.rows([0]).dtype == np.int64
    assert s["train_tokens"] == len(train) * 32 and 0 < s["train_bytes"] and 0 < s["val_bytes"]
    assert s["train_documents"] + s["val_documents"] == len(docs) and s["val_documents"] >= 1

    # The packed stream of each split is exactly its documents, in corpus order, as
    # [bos] + tokens + [eos], cut into rows, minus a tail shorter than a row.
    val_stream = val.rows(range(len(val))).reshape(-1).tolist()
    train_stream = train.rows(range(len(train))).reshape(-1).tolist()
    is_val, pos = [], 0
    for e in encoded:  # walk train; a document not found there must be in val
        if train_stream[pos:pos + len(e)] == e[: len(train_stream) - pos] and pos < len(train_stream):
            pos += len(e)
            is_val.append(False)
        else:
            is_val.append(True)
    expected_train = [t for e, v in zip(encoded, is_val) if not v for t in e]
    expected_val = [t for e, v in zip(encoded, is_val) if v for t in e]
    assert train_stream == expected_train[: len(train_stream)]
    assert val_stream == expected_val[: len(val_stream)]
    assert len(expected_train) - len(train_stream) == s["train_dropped_tail_tokens"] < 32
    assert len(expected_val) - len(val_stream) == s["val_dropped_tail_tokens"] < 32
    assert sum(is_val) == s["val_documents"]


def test_no_bos_and_deterministic_split(setup):
    a = run_pack(setup, "nobos", add_bos=False)
    tok = Tokenizer.load(setup[2])
    assert tok.bos_id not in PackedDataset(a, "train").rows(range(len(PackedDataset(a, "train"))))
    b, c = run_pack(setup, "det1"), run_pack(setup, "det2", workers=2, rows_per_shard=3)
    for split in ("train", "val"):
        x, y = PackedDataset(b, split), PackedDataset(c, split)
        assert len(y.shards) > 1  # rows_per_shard=3 forces several shards; reads cross them
        assert np.array_equal(x.rows(range(len(x))), y.rows(range(len(y))))
    assert np.array_equal(pack.val_mask(150, 8, 0), pack.val_mask(150, 8, 0))
    assert pack.val_mask(150, 8, 0).sum() == 8 and not np.array_equal(pack.val_mask(150, 8, 0), pack.val_mask(150, 8, 1))


def test_rerun_is_noop(setup, capsys):
    run_pack(setup, "noop")
    capsys.readouterr()
    run_pack(setup, "noop", workers=2)  # workers do not change the output
    assert "pack: up to date" in capsys.readouterr().out


def test_token_dtype_choice():
    assert pack.token_dtype(32768) == np.uint16
    assert pack.token_dtype(65536) == np.uint16
    assert pack.token_dtype(65537) == np.uint32
    assert pack.token_dtype(151_000) == np.uint32


def test_tokenizer_mismatch_is_refused(setup, tmp_path):
    root, c, t, _ = setup
    out = run_pack(setup, "mm")
    other = Tokenizer.load(tokenizer.run(tokenizer.Config(corpus=str(c), out=str(tmp_path / "other"), vocab_size=450)))
    ds = PackedDataset(out, "train")
    check_tokenizer(ds.manifest, Tokenizer.load(t))  # the right one passes
    with pytest.raises(UserError) as e:
        check_tokenizer(ds.manifest, other)
    msg = str(e.value)
    assert Tokenizer.load(t).sha256 in msg and other.sha256 in msg and str(t) in msg and str(tmp_path / "other") in msg


def test_small_corpus_gets_a_val_row_or_a_clear_error(tmp_path):
    docs = make_docs(20, seed=3)
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    c = corpus.run(corpus.Config(out=str(tmp_path / "c"), sources=[{"kind": "files", "paths": [str(f)]}], min_chars=1))
    t = tokenizer.run(tokenizer.Config(corpus=str(c), out=str(tmp_path / "t"), vocab_size=400))
    out = pack.run(pack.Config(corpus=str(c), tokenizer=str(t), out=str(tmp_path / "p"), seq_len=64, workers=1))
    assert PackedDataset(out, "val").rows([0]).shape == (1, 64)  # 5% of 20 docs is 1 short doc; val still gets a row
    with pytest.raises(UserError, match=r"too small for seq_len=4096: [\d,]+ tokens in 20 documents.*Lower seq_len"):
        pack.run(pack.Config(corpus=str(c), tokenizer=str(t), out=str(tmp_path / "p2"), seq_len=4096, workers=1))
    assert not (tmp_path / "p2").exists()


def test_shard_writer_holds_only_a_few_rows(tmp_path):
    w = pack.ShardWriter(tmp_path, "train", seq_len=8, dtype=np.dtype(np.uint16), rows_per_shard=10)
    for i in range(1000):
        w.add(np.arange(i % 7 + 1, dtype=np.uint32))
        assert w.n_pending < 8 * 16 + 8  # flushed as soon as 16 rows are buffered
    dropped = w.close()
    total = sum(i % 7 + 1 for i in range(1000))
    assert w.rows == total // 8 and dropped == total % 8 and w.shards == -(-w.rows // 10)
    assert sum((tmp_path / f"train_{k:05d}.bin").stat().st_size for k in range(w.shards)) == w.rows * 8 * 2


def test_vocab_too_small_is_explained(setup, tmp_path):
    with pytest.raises(UserError, match=r"vocab_size=300 is too small: .* needs at least \d+ ids"):
        tokenizer.run(tokenizer.Config(corpus=str(setup[1]), out=str(tmp_path / "t"), vocab_size=300))


def test_wrong_input_kind_is_refused(setup, tmp_path):
    root, c, t, _ = setup
    with pytest.raises(UserError, match="is a 'corpus' artifact, expected 'tokenizer'"):
        pack.run(pack.Config(corpus=str(c), tokenizer=str(c), out=str(tmp_path / "x")))


def test_documents_spelling_special_tokens_are_counted(tmp_path, capsys):
    """A document that spells `<|eos|>` gets the eos id there (as the exported tokenizer reads
    it); pack counts such documents and says so. `<unk>` is text, not counted."""
    docs = make_docs(40, seed=5)
    docs[3] += " then <|eos|> and <|im_end|> twice <|eos|>"
    docs[7] += " a <unk> word"
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    c = corpus.run(corpus.Config(out=str(tmp_path / "c"), sources=[{"kind": "files", "paths": [str(f)]}], min_chars=1))
    t = tokenizer.run(tokenizer.Config(corpus=str(c), out=str(tmp_path / "t"), vocab_size=400))
    capsys.readouterr()
    out = pack.run(pack.Config(corpus=str(c), tokenizer=str(t), out=str(tmp_path / "p"), seq_len=32, workers=1))
    s = artifacts.read_manifest(out)["stats"]
    assert s["special_token_strings"] == 3 and s["documents_with_special_token_strings"] == 1
    assert "1 document(s) spell special tokens (3 times" in capsys.readouterr().out
    tok = Tokenizer.load(t)
    stream = np.concatenate([PackedDataset(out, sp).rows(range(len(PackedDataset(out, sp)))).ravel()
                             for sp in ("train", "val")])
    # the spelled <|im_end|> is its id (unless it fell in the dropped tail); <unk> never is
    assert (stream == tok.special_tokens["<|im_end|>"]).sum() <= 1 and (stream == 0).sum() == 0
    assert tok.encode(docs[3]).count(tok.eos_id) == 2 and tok.encode(docs[7]).count(0) == 0
