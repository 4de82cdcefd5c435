"""The tokenizer stage: both types, byte fallback, special tokens, fingerprint, HF export, import."""

import json

import pytest

from lmlab import artifacts
from lmlab.data import corpus, tokenizer
from lmlab.data.tokenizer import IM_END, IM_START, SPECIAL_TOKENS, TEXT_BREAK, Tokenizer, escape_specials
from lmlab.errors import UserError

from conftest import SHARED_DATA

WIKITEXT_TEST = SHARED_DATA / "wikitext-2" / "test.txt"

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\tindented with a tab",
    "  two leading spaces and trailing ones   ",
    "Ünïcödé café naïve — “quotes” and emoji 😀🚀 and CJK 中文字符 and Ελληνικά",
    "numbers 1234567890 and symbols ~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./",
]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "corpus"
    return corpus.run(corpus.Config(out=str(out), sources=[{"kind": "stdlib", "max_docs": 40}]))


@pytest.fixture(scope="module")
def sp_dir(corpus_dir):
    return tokenizer.run(tokenizer.Config(corpus=str(corpus_dir), out=str(corpus_dir.parent / "sp"), vocab_size=800))


@pytest.fixture(scope="module")
def bpe_dir(corpus_dir):
    return tokenizer.run(tokenizer.Config(corpus=str(corpus_dir), out=str(corpus_dir.parent / "bpe"), type="bpe",
                                          vocab_size=800))


@pytest.fixture(params=["sp", "bpe"])
def tok(request, sp_dir, bpe_dir):
    return Tokenizer.load(sp_dir if request.param == "sp" else bpe_dir)


def test_round_trip_and_byte_fallback(tok):
    assert tok.vocab_size == 800
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # emoji and CJK are not in a docs corpus: they must come out of byte fallback, not <unk>
    ids = tok.encode("😀中")
    assert len(ids) >= 2 and tok.decode(ids) == "😀中"
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_special_tokens_are_single_ids(tok):
    assert set(SPECIAL_TOKENS) <= set(tok.special_tokens)
    ids = list(tok.special_tokens.values())
    assert len(set(ids)) == len(ids)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(tok.special_tokens[t] for t in ("<|bos|>", "<|eos|>", "<|pad|>"))
    # chat markers written in text encode to one id each
    ids = tok.encode(f"{IM_START}user\nhi{IM_END}")
    assert ids[0] == tok.special_tokens[IM_START] and ids[-1] == tok.special_tokens[IM_END]
    assert tok.decode(ids) == f"{IM_START}user\nhi{IM_END}"
    # bos/eos/pad decode to nothing, so a decoded packed row reads as plain text
    assert tok.decode([tok.bos_id] + tok.encode("abc") + [tok.eos_id]) == "abc"


def test_sha256_is_the_model_file_and_stable(corpus_dir, sp_dir, bpe_dir, tmp_path, capsys):
    for d, name in ((sp_dir, "tokenizer.model"), (bpe_dir, "tokenizer.json")):
        t = Tokenizer.load(d)
        assert t.sha256 == artifacts.sha256_file(d / name) == artifacts.read_manifest(d)["tokenizer_sha256"]
    # same corpus + config -> the same model file, byte for byte
    again = tokenizer.run(tokenizer.Config(corpus=str(corpus_dir), out=str(tmp_path / "sp2"), vocab_size=800))
    assert Tokenizer.load(again).sha256 == Tokenizer.load(sp_dir).sha256
    capsys.readouterr()
    tokenizer.run(tokenizer.Config(corpus=str(corpus_dir), out=str(tmp_path / "sp2"), vocab_size=800))
    assert "tokenizer: up to date" in capsys.readouterr().out


def test_changed_model_file_is_refused(sp_dir, tmp_path):
    copy = Tokenizer.load(sp_dir).copy_to(tmp_path / "copy")
    assert Tokenizer.load(copy).encode("hello") == Tokenizer.load(sp_dir).encode("hello")
    with open(copy / "tokenizer.model", "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match="changed after training"):
        Tokenizer.load(copy)


@pytest.mark.parametrize("type_", ["sentencepiece", "bpe"])
def test_vocab_too_large_is_explained(tmp_path, type_):
    f = tmp_path / "x.txt"
    f.write_text("a small corpus with only a few words in it, repeated. " * 20, encoding="utf-8")
    c = corpus.run(corpus.Config(out=str(tmp_path / "c"), sources=[{"kind": "files", "paths": [str(f)]}]))
    with pytest.raises(UserError, match=r"vocab_size=5000 is too large for this corpus .* at most ~\d+.*lower vocab_size"):
        tokenizer.run(tokenizer.Config(corpus=str(c), out=str(tmp_path / "t"), type=type_, vocab_size=5000))
    assert not (tmp_path / "t").exists()


def _special_strings() -> list[str]:
    """Every special token's string alone, all of them run together, and inside text."""
    every = SPECIAL_TOKENS + ["<unk>"]
    out = list(every) + ["".join(every), " ".join(every), "\n".join(every)]
    out += [f"Robert {t} is" for t in every] + [f"a{t}b" for t in every] + [f"{t} x {t}" for t in every]
    out += ["hi <|im_end|>\n<|im_start|>assistant\nsure", "<|bos|><|bos|>", "<<|eos|>>", "<|<|pad|>|>",
            "<|im_end", "|im_end|>", f"x{TEXT_BREAK}y", TEXT_BREAK, f"<{TEXT_BREAK}|eos|>"]
    return out


def test_special_token_text(tok):
    """One rule for both kinds: a special's string is its id, <unk> and TEXT_BREAK are not,
    an escaped special is ordinary text, and encode_batch agrees with encode."""
    for t in SPECIAL_TOKENS:
        i = tok.special_tokens[t]
        assert tok.encode(t) == [i] and tok.encode(f"a{t}b") == tok.encode("a") + [i] + tok.encode("b")
        escaped = tok.encode(escape_specials(f"a{t}b", tok.control_tokens))
        assert i not in escaped and escaped == tok.encode(f"a{t[0]}") + tok.encode(t[1:] + "b")
        assert tok.decode(escaped) == f"a{t}b"
    assert tok.encode(f"ab{TEXT_BREAK}cd") == tok.encode("ab") + tok.encode("cd")
    if tok.type == "sentencepiece":  # sentencepiece's <unk> piece (id 0) is never produced from text
        assert 0 not in tok.encode("Robert <unk> is") and tok.decode(tok.encode("<unk>")) == "<unk>"
    texts = _special_strings() + TEXTS
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_export_hf_matches_autotokenizer(tok, tmp_path, corpus_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok.export_hf(tmp_path / "hf")))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    texts = TEXTS + [t[:2000] for t in corpus.iter_corpus_texts(corpus_dir)][:20]
    for text in texts:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text[:60]
        assert hf.decode(tok.encode(text)) == text
    for text in _special_strings():
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), repr(text)
        escaped = escape_specials(text, tok.control_tokens)
        assert hf.encode(escaped, add_special_tokens=False) == tok.encode(escaped), repr(escaped)
    assert hf.convert_tokens_to_ids(IM_START) == tok.special_tokens[IM_START]


@pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason=f"{WIKITEXT_TEST} not present (../shared/data)")
def test_export_hf_matches_on_wikitext_test(tok, tmp_path):
    """WikiText-2 test spells `<unk>` 15k times: lm-eval on the export must see lmlab's tokens."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok.export_hf(tmp_path / "hf")))
    text = WIKITEXT_TEST.read_text(encoding="utf-8")
    assert text.count("<unk>") > 10_000
    ours = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ours
    assert tok.decode(ours) == text
    if tok.type == "sentencepiece":
        assert 0 not in ours  # the unknown piece: never produced, so never seen in training


def test_import_from_existing_files(sp_dir, bpe_dir, tmp_path):
    # an lmlab-trained .model imports as is, keeping its sha256
    t = Tokenizer.load(tokenizer.run(tokenizer.Config(from_file=str(sp_dir / "tokenizer.model"), out=str(tmp_path / "a"))))
    assert t.sha256 == Tokenizer.load(sp_dir).sha256 and t.encode(TEXTS[0]) == Tokenizer.load(sp_dir).encode(TEXTS[0])

    # a tokenizer.json without our special tokens gets them added
    from tokenizers import Tokenizer as HFTokenizer
    raw = HFTokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    data = json.loads(raw.to_str())
    data["added_tokens"] = []
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(data))
    t = Tokenizer.load(tokenizer.run(tokenizer.Config(from_file=str(plain), out=str(tmp_path / "b"))))
    assert set(SPECIAL_TOKENS) <= set(t.special_tokens)
    assert t.encode(IM_START) == [t.special_tokens[IM_START]]
    assert t.decode(t.encode(TEXTS[3])) == TEXTS[3]


def test_import_model_without_specials_is_refused(tmp_path):
    import sentencepiece as spm

    lines = ["plain sentencepiece model trained without chat tokens"] * 50 + [f"word{i} other{i}" for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "m"), vocab_size=300,
                                   model_type="bpe", minloglevel=2)
    with pytest.raises(UserError, match=f"lacks special tokens {IM_START}, {IM_END}"):
        tokenizer.run(tokenizer.Config(from_file=str(tmp_path / "m.model"), out=str(tmp_path / "t")))
    with pytest.raises(UserError, match="from_file not found"):
        tokenizer.run(tokenizer.Config(from_file=str(tmp_path / "nope.model"), out=str(tmp_path / "t")))
