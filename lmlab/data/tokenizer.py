"""Train (or import) the tokenizer once; everything after it is tied to its sha256.

    lmlab tokenizer corpus=runs/corpus out=runs/tokenizer vocab_size=8192
    lmlab tokenizer type=bpe vocab_size=8192                   # byte-level BPE (HF tokenizers)
    lmlab tokenizer from_file=path/to/tokenizer.model           # import an existing one
    python -c "from lmlab.data import tokenizer as t; t.run(t.Config(corpus='runs/c', out='runs/t', vocab_size=600))"

Two kinds, both with byte fallback so no input is ever unknown:
- `sentencepiece`: a SentencePiece BPE model (`tokenizer.model`) with identity normalisation
  and no dummy prefix, so decode(encode(x)) == x for ordinary text.
- `bpe`: byte-level BPE from HF `tokenizers` (`tokenizer.json`), as in GPT-2.

Special tokens (ids in `tokenizer_meta.json`, see SPECIAL_TOKENS): `<|bos|>`, `<|eos|>`,
`<|pad|>`, the chat markers `<|im_start|>`, `<|im_end|>`, spare `<|reserved_0..5|>`, and the
thinking delimiters `<think>`, `</think>` (the `think` chat template; Qwen3's and SmolLM3's
spelling); each is one id. Special tokens in text follow one rule, the same in `Tokenizer.encode` and in the
exported Hugging Face tokenizer (docs/data.md, "Special tokens in text"):
- a special token's string in text is that token (`encode("<|eos|>") == [eos_id]`), because
  that is how Hugging Face turns a chat template's text into ids and so how every HF tool
  (lm-evaluation-harness included) tokenizes; `<unk>` is not a special token here: it is
  sentencepiece's unknown piece, never produced (byte fallback), and its text (WikiText's
  `<unk>`) is ordinary text;
- TEXT_BREAK (U+FDD0, a Unicode noncharacter) is dropped and splits the text there, so a
  special token's string broken by it after its first character (`escape_specials`) is
  encoded as ordinary text. Chat templates escape every message this way, so a message can
  never produce a control token (a user typing `<|im_end|>` cannot end its turn).
An imported SentencePiece model keeps its own control pieces as bos/eos/pad (Gemma's
`tokenizer.model`: `<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3); it must hold lmlab's chat
markers or Gemma's `<start_of_turn>` / `<end_of_turn>` (user-defined pieces, recorded as special
tokens like the chat markers, which the `gemma` chat template uses).
The tokenizer's fingerprint is the sha256 of its model file. `Tokenizer` is the class every
other stage uses: `Tokenizer.load(dir)`, encode/encode_batch/decode, ids, `export_hf(dir)`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from lmlab import artifacts
from lmlab.config import Strict
from lmlab.data.corpus import iter_corpus_texts
from lmlab.errors import UserError

KIND = "tokenizer"
META = "tokenizer_meta.json"
SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
RESERVED = [f"<|reserved_{i}|>" for i in range(6)]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Tokens that sentencepiece itself matches in text (user-defined symbols); bos/eos/pad are its
# control symbols, which lmlab matches (Tokenizer._split) so that all specials behave alike.
# The thinking delimiters come last, so the ids of the tokens before them are those of
# tokenizers trained before they existed.
TEXT_SPECIALS = [IM_START, IM_END] + RESERVED + [THINK_OPEN, THINK_CLOSE]
SPECIAL_TOKENS = [BOS, EOS, PAD] + TEXT_SPECIALS
# Gemma's turn markers, user-defined pieces of its tokenizer.model (bos/eos/pad are its control
# pieces <bos>, <eos>, <pad>). An imported model that has them records them as special tokens, for
# the gemma chat template; lmlab's own tokenizers never hold them.
GEMMA_TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
# Dropped from text, and the text is split there (docs/data.md, "Special tokens in text"). A
# noncharacter: Unicode keeps U+FDD0..U+FDEF for a program's internal use, so real text never
# carries it (the private-use area, by contrast, shows up in scraped web text as icon glyphs).
TEXT_BREAK = "\ufdd0"


def escape_order(tokens) -> list[str]:
    """The order in which `escape_specials` (and the exported Jinja template) break tokens."""
    return sorted({t for t in tokens if len(t) >= 2 and not t.isspace()}, key=lambda t: (-len(t), t))


def escape_specials(text: str, tokens) -> str:
    """`text` with every occurrence of the special tokens `tokens` broken by TEXT_BREAK after its
    first character, so that it encodes as ordinary text. Longest first, one `str.replace` per
    token: the exported chat template does exactly these replacements (`replace` filters), so
    both sides see the same text. One-character and whitespace tokens cannot be broken and are
    left alone (they are ordinary text in every tokenizer we make)."""
    for t in escape_order(tokens):
        if t in text:
            text = text.replace(t, t[0] + TEXT_BREAK + t[1:])
    return text


class Config(Strict):
    corpus: str = Field("runs/corpus", description="corpus artifact to train on (ignored with from_file)")
    out: str = Field("runs/tokenizer", description="output tokenizer artifact directory")
    type: Literal["sentencepiece", "bpe"] = Field("sentencepiece", description="sentencepiece (BPE model, tokenizer.model) or bpe (byte-level BPE, tokenizer.json)")
    vocab_size: int = Field(32768, ge=300, le=1 << 22, description="vocabulary size including byte and special tokens")
    input_sentence_size: int = Field(2_000_000, ge=1000, description="at most this many training lines (sampled) for sentencepiece; caps memory and time")
    max_sentence_length: int = Field(1 << 16, ge=1024, description="longest training line in bytes for sentencepiece (longer lines are skipped)")
    character_coverage: float = Field(0.9995, gt=0.9, le=1.0, description="share of characters given their own piece (sentencepiece); the rest use byte fallback")
    min_frequency: int = Field(2, ge=1, description="minimum pair frequency for a merge (bpe)")
    threads: int = Field(4, ge=1, description="training threads (fixed default: sentencepiece records it in the model file, so it is part of the sha256)")
    seed: int = Field(0, description="seed for sentencepiece's sampling of training lines")
    from_file: Optional[str] = Field(None, description="import an existing SentencePiece .model or tokenizer.json instead of training")


# ---------------------------------------------------------------------------------------------
# The Tokenizer every stage uses


class Tokenizer:
    """A trained tokenizer artifact: `Tokenizer.load(dir)`; encode adds no special tokens."""

    def __init__(self, path: Path, meta: dict, backend) -> None:
        self.path = Path(path)
        self.meta = meta
        self.type: str = meta["type"]
        self._backend = backend
        self.special_tokens: dict[str, int] = dict(meta["special_tokens"])
        self.vocab_size: int = int(meta["vocab_size"])
        self.bos_id: int = int(meta["bos_id"])
        self.eos_id: int = int(meta["eos_id"])
        self.pad_id: int = int(meta["pad_id"])
        self.sha256: str = meta["sha256"]
        self.model_file = self.path / (SP_FILE if self.type == "sentencepiece" else HF_FILE)
        self._threads = min(8, os.cpu_count() or 1)
        if self.type == "sentencepiece":
            # We match the specials ourselves (sentencepiece would match only its user-defined ones).
            self.control_tokens = tuple(escape_order(self.special_tokens))
            alternatives = [re.escape(t) for t in self.control_tokens] + [re.escape(TEXT_BREAK)]
        else:
            # HF tokenizers match every added token in text themselves; we only split at TEXT_BREAK.
            self.control_tokens = tuple(escape_order(t.content for t in backend.get_added_tokens_decoder().values()))
            alternatives = [re.escape(TEXT_BREAK)]
        self._split_re = re.compile("|".join(alternatives))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        meta_path = path / META
        if not meta_path.is_file():
            raise UserError(f"{path} is not a tokenizer (no {META}); run `lmlab tokenizer` or point at a model run's tokenizer/")
        meta = json.loads(meta_path.read_text())
        model_file = path / (SP_FILE if meta["type"] == "sentencepiece" else HF_FILE)
        if not model_file.is_file():
            raise UserError(f"tokenizer {path} is missing {model_file.name}; re-run `lmlab tokenizer`")
        actual = artifacts.sha256_file(model_file)
        if actual != meta["sha256"]:
            raise UserError(f"tokenizer {path}: {model_file.name} has sha256 {actual[:12]} but {META} says "
                            f"{meta['sha256'][:12]}; the file was changed after training. Re-run `lmlab tokenizer`.")
        if meta["type"] == "sentencepiece":
            import sentencepiece as spm
            backend = spm.SentencePieceProcessor(model_file=str(model_file))
        else:
            from tokenizers import Tokenizer as HFTokenizer
            backend = HFTokenizer.from_file(str(model_file))
        return cls(path, meta, backend)

    def _split(self, text: str) -> list[str | int]:
        """The text as plain pieces (str) and special-token ids (int); TEXT_BREAK dropped."""
        parts: list[str | int] = []
        pos = 0
        for m in self._split_re.finditer(text):
            if m.start() > pos:
                parts.append(text[pos:m.start()])
            if m.group() != TEXT_BREAK:
                parts.append(self.special_tokens[m.group()])
            pos = m.end()
        if pos < len(text):
            parts.append(text[pos:])
        return parts

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        """Encode pieces that contain no special token and no TEXT_BREAK, in one batch."""
        if not texts:
            return []
        if self.type == "sentencepiece":
            if len(texts) == 1:  # starting the thread pool costs ~20x a short text's encoding
                return [self._backend.encode(texts[0], out_type=int)]
            # sentencepiece >= 0.2 encodes a list on its own C++ thread pool.
            return self._backend.encode(list(texts), out_type=int, num_threads=self._threads)
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added); special tokens in text as in the module docstring."""
        if self._split_re.search(text) is None:
            return self._encode_plain([text])[0]
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Most documents hold no special token: they go to the backend in one batch as they are.
        # The others are split, and all their pieces are encoded in one more batch.
        texts = list(texts)
        split = {i: self._split(t) for i, t in enumerate(texts) if self._split_re.search(t)}
        plain = self._encode_plain([t for i, t in enumerate(texts) if i not in split])
        pieces = [p for parts in split.values() for p in parts if isinstance(p, str)]
        encoded = iter(self._encode_plain(pieces))
        out: list[list[int]] = []
        plain_it = iter(plain)
        for i in range(len(texts)):
            if i not in split:
                out.append(next(plain_it))
                continue
            ids: list[int] = []
            for p in split[i]:
                ids.extend([p] if isinstance(p, int) else next(encoded))
            out.append(ids)
        return out

    def count_specials(self, text: str) -> int:
        """How many special-token strings `text` holds (each encodes to its id; see pack's stats)."""
        return sum(text.count(t) for t in self.control_tokens)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.type == "sentencepiece":
            return self._backend.decode(ids)
        # bos/eos/pad are "special" and vanish, like sentencepiece control symbols; chat tokens stay.
        return self._backend.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        if self.type == "sentencepiece":
            return self._backend.id_to_piece(int(i))
        return self._backend.id_to_token(int(i))

    def copy_to(self, dest: str | Path) -> Path:
        """Copy the model file and meta into `dest` (e.g. a model run's tokenizer/)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.model_file, dest / self.model_file.name)
        shutil.copy2(self.path / META, dest / META)
        return dest

    def export_hf(self, dest: str | Path) -> Path:
        """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json for `AutoTokenizer`.

        `AutoTokenizer.encode(text, add_special_tokens=False)` equals `encode(text)` for every
        text, special-token strings and TEXT_BREAK included (tested on WikiText-2): the specials
        are added tokens (matched in text, as here), `<unk>` is not declared (transformers would
        make it an added token, matched in text, where lmlab reads WikiText's `<unk>` as text),
        and a pre-tokenizer drops TEXT_BREAK and splits there, as `_split` does.
        """
        from tokenizers import Tokenizer as HFTokenizer, pre_tokenizers

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        if self.type == "sentencepiece":
            hf = sentencepiece_to_hf(self._backend, self.special_tokens)
        else:
            hf = HFTokenizer.from_file(str(self.model_file))
        brk = pre_tokenizers.Split(TEXT_BREAK, behavior="removed")
        hf.pre_tokenizer = brk if hf.pre_tokenizer is None else pre_tokenizers.Sequence([brk, hf.pre_tokenizer])
        hf.save(str(dest / HF_FILE))
        inverse = {v: k for k, v in self.special_tokens.items()}
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": inverse[self.bos_id], "eos_token": inverse[self.eos_id], "pad_token": inverse[self.pad_id],
            "additional_special_tokens": TEXT_SPECIALS_IN(self.special_tokens),
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        artifacts.write_json_atomic(dest / "tokenizer_config.json", cfg)
        artifacts.write_json_atomic(dest / "special_tokens_map.json", {
            k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "additional_special_tokens", "unk_token") if k in cfg})
        return dest


def TEXT_SPECIALS_IN(special_tokens: dict[str, int]) -> list[str]:
    """The special tokens that are text-like (user-defined pieces: kept when decoding), lmlab's chat
    markers and reserved tokens and Gemma's turn markers, that `special_tokens` holds."""
    return [t for t in TEXT_SPECIALS + GEMMA_TURN_TOKENS if t in special_tokens]


def sentencepiece_to_hf(sp, special_tokens: dict[str, int]):
    """An HF `tokenizers.Tokenizer` equal to a SentencePiece BPE model trained as in `train_sentencepiece`.

    SentencePiece BPE picks merges by piece score; HF BPE by merge rank. Ranking the merges by
    the id of the merged piece (sentencepiece BPE ids are in score order) makes them agree.
    Whitespace is '▁' in both; there is no dummy prefix, so no Prepend/Strip steps. `<unk>` stays
    the model's unknown piece but is not an added token, so its text is ordinary text.
    """
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers

    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    normal = [i for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
              and sp.id_to_piece(i) not in special_tokens]
    merges = []
    for i in normal:
        piece = sp.id_to_piece(i)
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((i, vocab[left], vocab[right], left, right))
    merges.sort()
    model = models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=UNK,
                       byte_fallback=True, fuse_unk=True)
    tok = HFTokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    text_like = TEXT_SPECIALS_IN(special_tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in special_tokens if t not in text_like])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in text_like])
    return tok


# ---------------------------------------------------------------------------------------------
# Training


def _training_lines(corpus: Path):
    """SentencePiece trains on lines; documents are split at newlines (blank lines skipped)."""
    for text in iter_corpus_texts(corpus):
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(cfg: Config, corpus: Path, dest: Path) -> None:
    import io

    import sentencepiece as spm

    # model_writer, not model_prefix: the prefix (a temp path) would be stored in the model
    # file and make the sha256 differ between identical runs.
    model = io.BytesIO()
    spm.set_random_generator_seed(cfg.seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(corpus),
            model_writer=model,
            model_type="bpe",
            vocab_size=cfg.vocab_size,
            byte_fallback=True,
            character_coverage=cfg.character_coverage,
            # identity + no dummy prefix + keep spaces: decode(encode(x)) == x
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_digits=True,
            # Every printable ASCII character gets a piece even when rare in this corpus
            # (e.g. '!' in documentation), so code and punctuation never fall back to bytes.
            required_chars="".join(chr(c) for c in range(33, 127)),
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=cfg.max_sentence_length,
            num_threads=cfg.threads,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            user_defined_symbols=TEXT_SPECIALS,
            minloglevel=2,
        )
    except RuntimeError as e:
        m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(e))
        if m:
            raise UserError(f"vocab_size={cfg.vocab_size} is too large for this corpus ({corpus}): it supports at most "
                            f"~{m.group(2)} tokens; lower vocab_size (e.g. vocab_size={int(m.group(2))}) or add text") from None
        m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if m:
            raise UserError(f"vocab_size={cfg.vocab_size} is too small: this sentencepiece tokenizer needs at least {m.group(2)} "
                            f"ids for its control, special, 256 byte and character pieces; raise vocab_size") from None
        raise UserError(f"sentencepiece training failed: {e}") from None
    (dest / SP_FILE).write_bytes(model.getvalue())


def train_bpe(cfg: Config, corpus: Path, dest: Path) -> None:
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size - len(TEXT_SPECIALS), min_frequency=cfg.min_frequency, show_progress=False,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
    )
    tok.train_from_iterator(iter_corpus_texts(corpus), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_SPECIALS])
    if tok.get_vocab_size() < cfg.vocab_size:
        n = tok.get_vocab_size()
        raise UserError(f"vocab_size={cfg.vocab_size} is too large for this corpus ({corpus}): BPE found merges for "
                        f"at most ~{n} tokens; lower vocab_size (e.g. vocab_size={n}) or add text")
    tok.save(str(dest / HF_FILE))


def _write_meta(dest: Path, type_: str) -> dict:
    model_file = dest / (SP_FILE if type_ == "sentencepiece" else HF_FILE)
    if type_ == "sentencepiece":
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        size = sp.get_piece_size()
        specials = {}
        for name, i in ((BOS, sp.bos_id()), (EOS, sp.eos_id()), (PAD, sp.pad_id())):
            if i >= 0:
                specials[sp.id_to_piece(i)] = i
        for t in TEXT_SPECIALS + GEMMA_TURN_TOKENS:
            i = sp.piece_to_id(t)
            if i != sp.unk_id():
                specials[t] = i
        bos, eos, pad = sp.bos_id(), sp.eos_id(), sp.pad_id()
    else:
        from tokenizers import Tokenizer as HFTokenizer
        tok = HFTokenizer.from_file(str(model_file))
        size = tok.get_vocab_size(with_added_tokens=True)
        specials = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None}
        bos, eos, pad = specials[BOS], specials[EOS], specials[PAD]
    if pad < 0:
        pad = eos  # an imported model without a pad piece: pad positions are masked anyway
    meta = {"type": type_, "vocab_size": size, "bos_id": bos, "eos_id": eos, "pad_id": pad,
            "special_tokens": specials, "sha256": artifacts.sha256_file(model_file)}
    artifacts.write_json_atomic(dest / META, meta)
    return meta


def import_file(path: Path, dest: Path) -> str:
    """Copy an existing .model / tokenizer.json into `dest`; returns the type."""
    if not path.is_file():
        raise UserError(f"from_file not found: {path}")
    if path.suffix == ".model":
        import sentencepiece as spm
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise UserError(f"{path} is not a SentencePiece model: {e}") from None
        # Chat markers: lmlab's (a model lmlab trained) or Gemma's (Gemma's tokenizer.model, for the
        # gemma template); the control pieces bos/eos keep the model's own names (<bos>, <eos>, ...).
        gemma = all(sp.piece_to_id(t) != sp.unk_id() for t in GEMMA_TURN_TOKENS)
        missing = [] if gemma else [t for t in TEXT_SPECIALS[:2] if sp.piece_to_id(t) == sp.unk_id()]
        if sp.bos_id() < 0 or sp.eos_id() < 0:
            missing = [n for n, i in (("bos", sp.bos_id()), ("eos", sp.eos_id())) if i < 0] + missing
        if missing:
            raise UserError(f"SentencePiece model {path} lacks special tokens {', '.join(missing)}; lmlab needs bos/eos and "
                            f"either {IM_START}/{IM_END} (lmlab's chat markers) or {'/'.join(GEMMA_TURN_TOKENS)} "
                            f"(Gemma's) as user-defined symbols. Retrain with `lmlab tokenizer` or use a tokenizer.json "
                            f"(special tokens are added to those automatically)")
        shutil.copy2(path, dest / SP_FILE)
        return "sentencepiece"
    if path.suffix == ".json":
        from tokenizers import AddedToken, Tokenizer as HFTokenizer
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise UserError(f"{path} is not a Hugging Face tokenizer.json: {e}") from None
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, PAD)
                                if tok.token_to_id(t) is None])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_SPECIALS if tok.token_to_id(t) is None])
        tok.save(str(dest / HF_FILE))
        return "bpe"
    raise UserError(f"from_file must be a SentencePiece .model or a tokenizer.json, got {path}")


def import_tokenizer(path: str | Path, dest: Optional[str | Path] = None) -> "Tokenizer":
    """An existing tokenizer file (SentencePiece .model, or tokenizer.json) as a loaded lmlab
    Tokenizer in `dest` (a new temporary directory by default), without a stage's manifest:
    what `lmlab import` and an HF init of `lmlab sft` use."""
    import tempfile

    dest = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="lmlab-tok-"))
    dest.mkdir(parents=True, exist_ok=True)
    _write_meta(dest, import_file(Path(path), dest))
    return Tokenizer.load(dest)


def run(cfg: Config) -> Path:
    out = Path(cfg.out)
    artifacts.check_out(out, KIND, "tokenizer", inputs={"corpus": None if cfg.from_file else cfg.corpus})
    config = cfg.model_dump(mode="json")
    if cfg.from_file:
        src = Path(cfg.from_file)
        if not src.is_file():
            raise UserError(f"from_file not found: {src} (give a SentencePiece .model or a tokenizer.json)")
        inputs = {"from_file": {"path": str(src), "fingerprint": artifacts.sha256_file(src)}}
    else:
        m = artifacts.require_artifact(cfg.corpus, "corpus", what="corpus")
        inputs = {"corpus": {"path": str(cfg.corpus), "fingerprint": m["fingerprint"]}}
    fp = artifacts.stage_fingerprint(KIND, config, {k: v["fingerprint"] for k, v in inputs.items()})
    if artifacts.is_up_to_date(out, fp):
        print(f"tokenizer: up to date ({out}), nothing to do")
        return out
    timer = artifacts.Timer()
    try:
        with artifacts.atomic_dir(out) as tmp:
            with timer("train"):
                if cfg.from_file:
                    type_ = import_file(Path(cfg.from_file), tmp)
                else:
                    print(f"tokenizer: training {cfg.type} vocab_size={cfg.vocab_size} on {cfg.corpus} ...")
                    (train_sentencepiece if cfg.type == "sentencepiece" else train_bpe)(cfg, Path(cfg.corpus), tmp)
                    type_ = cfg.type
            meta = _write_meta(tmp, type_)
            artifacts.write_manifest(tmp, KIND, config, fp, inputs=inputs, verb="tokenizer", tokenizer_sha256=meta["sha256"],
                                     timings=timer.total(),
                                     stats={"type": type_, "vocab_size": meta["vocab_size"], "special_tokens": meta["special_tokens"]})
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    print(f"tokenizer: {type_} vocab {meta['vocab_size']} sha256 {meta['sha256'][:12]} -> {out} "
          f"({timer.timings['train']:.1f}s)")
    return out
