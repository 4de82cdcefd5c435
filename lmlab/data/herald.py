r"""Herald_proofs (FrenzyMath/Herald_proofs) as prompt/completion examples for finetuning a Lean 4 prover.

Herald_proofs is the proof part of the Herald dataset (Gao et al., "Herald: A Natural Language
Annotated Lean 4 Dataset", ICLR 2025): about 44.6k Mathlib4 theorems with Lean 4 (v4.11.0)
tactic proofs and their natural-language translations, one `train` split, columns

    id (int64), name, formal_theorem, informal_theorem, formal_proof, informal_proof,
    commented_proof, header

This module reads those rows (a local .parquet/.jsonl/.json file with the same columns, or
the hub dataset), cleans them, renames each theorem so it cannot collide with the Mathlib
lemma its header imports, refuses proofs that cite the lemma they prove, and turns the rest
into `HeraldExample`s, prompt/completion records, and a deterministic train/validation split.

    from lmlab.data import herald
    stats = {}
    examples = herald.read_herald("data/herald_proofs.parquet", stats=stats)   # or hf=herald.HF_NAME
    train, valid = herald.split_examples(examples, valid_fraction=0.1)
    herald.write_jsonl_atomic([herald.to_record(e) for e in train], "runs/herald/train.jsonl")
    print(herald.summary(stats))

Rules (each dropped row is counted in `stats` under its reason, with its first locations):
  unanalyzable_header  the header contains "Unable to analyze" (any case): it is the dataset's
                       note that its analysis failed, not Lean source, so the imports and opens
                       the statement needs are unknown and a verifier could not elaborate it
  empty_theorem        formal_theorem is empty or whitespace
  empty_proof          formal_proof is empty or whitespace
  no_theorem_name      no `theorem NAME` / `lemma NAME` declaration in formal_theorem
  self_citation        the proof cites the theorem's own (original) name; see `cites`

Renaming: the declared name's last component gets RENAME_SUFFIX ("_herald"):
`Nat.add_comm` -> `Nat.add_comm_herald`, `two_mul_le_add_sq` -> `two_mul_le_add_sq_herald`,
`Nat.«sum odd»` -> `Nat.«sum odd_herald»`. The namespace is kept, so names the statement and
proof use unqualified resolve as they did in Mathlib. Only the declaration is renamed.

Layout of one example. `HeraldExample.prompt` is the header, a blank line and the informal
statement as a docstring; the renamed statement (ending in ":=") ends the record's prompt; the
completion is one space and the tactic proof. The SFT stage adds bos before the prompt and eos
after the completion, and trains on the completion only. For the row

    {"id": 7, "name": "Nat.succ_le_of_lt", "header": HEADER,
     "formal_theorem": "theorem Nat.succ_le_of_lt {n m : ℕ} (h : n < m) : succ n ≤ m :=",
     "informal_theorem": "If $n < m$ then $n + 1 \le m$.", "formal_proof": "by\n  exact h", ...}

to_record gives

    prompt:     "import Mathlib\nimport Aesop\nset_option maxHeartbeats 400000\n"
                "open BigOperators Real Nat Topology Rat\n\n"
                "/-- If $n < m$ then $n + 1 \le m$. -/\n"
                "theorem Nat.succ_le_of_lt_herald {n m : ℕ} (h : n < m) : succ n ≤ m :="
    completion: " by\n  exact h"

so that prompt + completion is exactly a Lean file a verifier can check:

    import Mathlib
    import Aesop
    set_option maxHeartbeats 400000
    open BigOperators Real Nat Topology Rat

    /-- If $n < m$ then $n + 1 \le m$. -/
    theorem Nat.succ_le_of_lt_herald {n m : ℕ} (h : n < m) : succ n ≤ m := by
      exact h

An empty header or informal statement leaves out its part (and its newlines); "-/" and "/-" in
the informal text become "- /" and "/ -" so the docstring cannot end early. `lean_source(ex,
proof)` is the part after the header (renamed statement + a proof), since a verifier
elaborates the header once and reuses it.

Split: `split_examples` puts a row in validation when sha256("lmlab-herald-split\0" + id) falls
in the first `valid_fraction` of the hash range: the same on every run and machine, for any
row order, and a row never changes side when others are added or removed.

`sample_rows` / `write_sample` make realistic Herald-style rows (Mathlib-like statements, not
checked by Lean) for tests and demos without the hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from lmlab.data.records import Source, iter_records
from lmlab.errors import UserError

HF_NAME = "FrenzyMath/Herald_proofs"
COLUMNS = ("id", "name", "formal_theorem", "informal_theorem", "formal_proof", "informal_proof",
           "commented_proof", "header")
# The columns this reader uses; informal_proof and commented_proof may be absent from a local file.
REQUIRED = ("id", "name", "formal_theorem", "informal_theorem", "formal_proof", "header")
UNANALYZABLE = "unable to analyze"  # compared case-insensitively
RENAME_SUFFIX = "_herald"
REASONS = ("unanalyzable_header", "empty_theorem", "empty_proof", "no_theorem_name", "self_citation")
FIRST_LOCATIONS = 3  # locations kept per drop reason, for the report
SPLIT_SALT = "lmlab-herald-split\0"

# A typical Herald_proofs header: Mathlib, Aesop, a raised heartbeat limit and the usual opens
# (`open Nat` is why statements may write `n !` and `succ n`).
HEADER = "import Mathlib\nimport Aesop\nset_option maxHeartbeats 400000\nopen BigOperators Real Nat Topology Rat"


@dataclass(frozen=True)
class HeraldExample:
    """One cleaned row. `name` is the original declared name (before renaming); `theorem` is the
    renamed statement ending in ":="; `prompt` is everything before it (header, informal statement);
    `proof` is the tactic proof ("by\\n  ..."), stripped."""

    id: str
    name: str
    header: str
    prompt: str
    theorem: str
    proof: str


# ----------------------------------------------------------------------------- Lean lexing

# An identifier component: «anything» or a letter/underscore followed by letters, digits, _ ' ! ?
# (Lean's idRest; Python's \w covers Greek letters, subscripts and letter-like symbols like ℝ).
_SEG = r"«[^»\n]*»|[^\W\d][\w'!?]*"
_NAME = rf"(?:{_SEG})(?:\.(?:{_SEG}))*"
_NAME_RE = re.compile(_NAME)
_SEG_RE = re.compile(_SEG)
_DECL_RE = re.compile(rf"(?<![\w'!?.])(?:theorem|lemma)\s+({_NAME})")


def mask_comments(text: str) -> str:
    """`text` with Lean comments (`-- ...`, nested `/- ... -/`, docstrings) and string literals
    blanked to spaces, newlines kept: same length, so positions still index the original.

    A name inside a comment or a string is not a use of it, and a docstring's words ("this
    theorem ...") are not a declaration.
    """
    out = list(text)
    i, n = 0, len(text)

    def blank(a: int, b: int) -> None:
        for j in range(a, min(b, n)):
            if out[j] != "\n":
                out[j] = " "

    while i < n:
        if text.startswith("--", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            blank(i, end)
            i = end
        elif text.startswith("/-", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/-", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("-/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
        elif text[i] == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            blank(i, j + 1)
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _components(name: str) -> list[str]:
    """The components of a dotted name, guillemets removed (Lean reads «add_comm» as add_comm)."""
    return [m.group(0).strip("«»") for m in _SEG_RE.finditer(name)]


def parse_theorem_name(formal_theorem: str) -> Optional[tuple[str, int, int]]:
    """(name, start, end) of the first `theorem NAME` / `lemma NAME` outside comments, or None."""
    m = _DECL_RE.search(mask_comments(formal_theorem))
    if not m:
        return None
    return formal_theorem[m.start(1):m.end(1)], m.start(1), m.end(1)


def renamed(name: str, suffix: str = RENAME_SUFFIX) -> str:
    """`name` with `suffix` on its last component: Nat.add_comm -> Nat.add_comm_herald,
    Nat.«sum odd» -> Nat.«sum odd_herald» (inside the guillemets, so the name stays one identifier)."""
    last = list(_SEG_RE.finditer(name))[-1]
    seg = last.group(0)
    seg = seg[:-1] + suffix + "»" if seg.startswith("«") else seg + suffix
    return name[:last.start()] + seg + name[last.end():]


def rename_theorem(formal_theorem: str, suffix: str = RENAME_SUFFIX) -> Optional[tuple[str, str]]:
    """(statement with the declared name renamed, original name), or None without a declaration."""
    found = parse_theorem_name(formal_theorem)
    if found is None:
        return None
    name, a, b = found
    return formal_theorem[:a] + renamed(name, suffix) + formal_theorem[b:], name


def cites(proof: str, names: Iterable[str]) -> bool:
    """True when `proof` uses one of `names` (a theorem's own names), outside comments and strings.

    The proof is read as Lean identifier tokens (dotted, «guillemets» allowed, compared without
    them); a token is a use of name N = A.B.c when
      1. it starts with N: `Nat.add_comm`, `Nat.add_comm.symm`, `@Nat.add_comm`;
      2. it starts with a proper suffix of N (B.c or c): inside `theorem A.B.c` Lean opens
         namespaces A and A.B, and the header may `open` more, so `add_comm` may be Nat.add_comm;
      3. it is field notation ending in c on a term: `hp.two_le`, `(foo x).two_le`, `h.1.two_le`,
         `.two_le`, i.e. c right after a dot that follows a term (a lowercase-initial identifier,
         a closing bracket, a projection) or nothing. Lean resolves `x.c` to `T.c` for x's type T,
         which only elaboration knows, so this is conservative: a proof of `Nat.Prime.two_le`
         using `hp.two_le` is refused, and so would be a proof of `Eq.symm` using `h.symm` for
         some `h : a ≠ b` (that one is `Ne.symm`).
    Not uses: longer identifiers (`add_comm'`, `add_comm_left`, `Nat.add_comm_sub`) and a
    different namespace's lemma of the same short name (`Int.add_comm` for `Nat.add_comm`).
    """
    fulls = [c for c in (_components(n) for n in names) if c]
    if not fulls:
        return False
    suffixes = {tuple(f[k:]) for f in fulls for k in range(len(f))}
    lasts = {f[-1] for f in fulls}
    text = mask_comments(proof)
    for m in _NAME_RE.finditer(text):
        comps = _components(m.group(0))
        s = m.start()
        if s > 0 and text[s - 1] == ".":
            # `.c` after a term or on its own (expected-type dot notation): field notation.
            if comps[0] in lasts:
                return True
            continue
        if any(tuple(comps[:len(sfx)]) == sfx for sfx in suffixes):
            return True
        for i, c in enumerate(comps[1:], 1):
            if c in lasts and all(p[:1].islower() for p in comps[:i]):
                return True
    return False


# ----------------------------------------------------------------------------- rows -> examples

def _text(row: dict, key: str, where: str) -> str:
    v = row.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise UserError(f"{where}: column '{key}' must be text, got {type(v).__name__}")
    return v.replace("\r\n", "\n").replace("\r", "\n")


def _row_id(row: dict, where: str) -> str:
    v = row.get("id")
    if v is None or isinstance(v, bool) or not isinstance(v, (int, str)) or str(v).strip() == "":
        raise UserError(f"{where}: column 'id' must be an integer or text, got {v!r}; the split hashes it")
    return str(v).strip()


def _comment_text(informal: str) -> str:
    # "-/" would end the docstring early and "/-" would open a nested comment; spaced out, the
    # prompt stays a well-formed Lean file.
    return informal.strip().replace("-/", "- /").replace("/-", "/ -")


def build_prompt(header: str, informal_theorem: str) -> str:
    """The prompt before the theorem: the header, a blank line, the informal statement as a docstring."""
    head = header.strip()
    parts = [head + "\n\n"] if head else []
    informal = _comment_text(informal_theorem)
    if informal:
        parts.append(f"/-- {informal} -/\n")
    return "".join(parts)


def _statement_and_proof(theorem: str, proof: str) -> tuple[str, str]:
    """The statement ending in ":=" and the proof that follows it."""
    theorem, proof = theorem.rstrip(), proof.strip()
    by_end = re.search(r":=\s*by$", theorem)
    if by_end:
        # A statement that already holds the `by`: keep one `by`, at the start of the proof.
        theorem = theorem[:by_end.start()] + ":="
        if not re.match(r"by\b", proof):
            proof = "by\n  " + proof
    elif not theorem.endswith(":="):
        theorem += " :="
    return theorem, proof


def clean_row(row: dict, where: str = "row") -> tuple[Optional[HeraldExample], Optional[str]]:
    """(example, None) for a usable row, or (None, reason) with one of REASONS.

    `row` must hold the REQUIRED columns (see `check_columns`); a value of the wrong type is a
    UserError naming `where`.
    """
    header = _text(row, "header", where)
    rid = _row_id(row, where)
    if UNANALYZABLE in header.lower():
        return None, "unanalyzable_header"
    formal_theorem, formal_proof = _text(row, "formal_theorem", where), _text(row, "formal_proof", where)
    if not formal_theorem.strip():
        return None, "empty_theorem"
    if not formal_proof.strip():
        return None, "empty_proof"
    theorem, proof = _statement_and_proof(formal_theorem, formal_proof)
    found = rename_theorem(theorem)
    if found is None:
        return None, "no_theorem_name"
    theorem, name = found
    # The name column too: it may be the fully qualified name of a statement declared inside `open`s.
    col = _text(row, "name", where).strip()
    names = [name] + ([col] if col and _NAME_RE.fullmatch(col) else [])
    if cites(proof, names):
        return None, "self_citation"
    prompt = build_prompt(header, _text(row, "informal_theorem", where))
    return HeraldExample(id=rid, name=name, header=header.strip(), prompt=prompt, theorem=theorem, proof=proof), None


def check_columns(row: Any, where: str) -> dict:
    """`row` if it is an object with the REQUIRED columns, else a UserError naming what is missing."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a Herald_proofs row must be an object with the columns {', '.join(COLUMNS)}; "
                        f"got {type(row).__name__}")
    missing = [c for c in REQUIRED if c not in row]
    if missing:
        raise UserError(f"{where}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                        f"(present: {', '.join(sorted(row)) or 'none'}); a Herald_proofs row has the columns "
                        f"{', '.join(COLUMNS)} (informal_proof and commented_proof may be left out)")
    return row


def iter_rows(path: str | Path | None = None, *, hf: Optional[str] = None,
              split: str = "train") -> Iterator[tuple[str, dict]]:
    """(location, row) for each row of a local file or a hub dataset, columns checked.

    Exactly one of `path` (.parquet, .jsonl or .json) or `hf` (e.g. HF_NAME). Locations name the
    row: `file.jsonl:17`, `file.parquet:row 17`, `hf:FrenzyMath/Herald_proofs[train]:row 17`.
    """
    if (path is None) == (hf is None):
        raise UserError("give exactly one of path (a local .parquet/.jsonl file) or hf (e.g. "
                        f"hf={HF_NAME!r}, which needs the Hugging Face hub)")
    spec = Source(path=str(path)) if path is not None else Source(hf=hf, split=split)
    # iter_records reads .jsonl (errors name file:line), .json, .parquet and load_dataset(hf, split=split),
    # and turns a missing file or an unreachable hub into a UserError.
    for where, row in iter_records(spec):
        yield where, check_columns(row, where)


def read_herald(path: str | Path | None = None, *, hf: Optional[str] = None, split: str = "train",
                stats: Optional[dict] = None, locations: Optional[list] = None,
                max_rows: Optional[int] = None) -> list[HeraldExample]:
    """The cleaned, renamed examples of a Herald_proofs source (see iter_rows for path/hf).

    `stats`, when given, is updated with `rows` (read), `examples` (kept), `dropped` ({reason:
    count}) and `dropped_first` ({reason: [first FIRST_LOCATIONS locations, each with the name]});
    counts add up over calls with the same dict. `locations`, when given, is extended with the
    location of each example. `max_rows` stops after reading that many rows.
    A source with no usable row is a UserError saying why.
    """
    st = stats if stats is not None else {}
    st.setdefault("rows", 0)
    st.setdefault("examples", 0)
    dropped, first = st.setdefault("dropped", {}), st.setdefault("dropped_first", {})
    out: list[HeraldExample] = []
    rows = 0
    for where, row in iter_rows(path, hf=hf, split=split):
        if max_rows is not None and rows >= max_rows:
            break
        rows += 1
        ex, reason = clean_row(row, where)
        if ex is None:
            dropped[reason] = dropped.get(reason, 0) + 1
            locs = first.setdefault(reason, [])
            if len(locs) < FIRST_LOCATIONS:
                name = str(row.get("name") or "").strip()
                locs.append(f"{where} ({name})" if name else where)
            continue
        out.append(ex)
        if locations is not None:
            locations.append(where)
    st["rows"] += rows
    st["examples"] += len(out)
    if not out:
        source = str(path) if path is not None else f"hf:{hf}[{split}]"
        raise UserError(f"{source}: no usable Herald_proofs row " +
                        (f"({summary({'rows': rows, 'examples': 0, 'dropped': dropped, 'dropped_first': first})})"
                         if rows else "(it holds no rows)"))
    return out


def summary(stats: dict) -> str:
    """One line about a read: "kept 180 of 200 rows; dropped unanalyzable_header 8 (first: f:3 (X), ...), ..."."""
    parts = [f"kept {stats.get('examples', 0)} of {stats.get('rows', 0)} rows"]
    dropped = stats.get("dropped", {})
    if dropped:
        items = []
        for reason, n in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])):
            locs = stats.get("dropped_first", {}).get(reason, [])
            items.append(f"{reason} {n}" + (f" (first: {', '.join(locs)})" if locs else ""))
        parts.append("dropped " + "; ".join(items))
    return "; ".join(parts)


# ----------------------------------------------------------------------------- records and Lean source

def to_record(ex: HeraldExample) -> dict:
    """The prompt/completion SFT record: the prompt ends with the renamed statement's ":=", the
    completion is " " + the proof (one space, so prompt + completion is the Lean text itself).
    The trainer adds bos before the prompt and eos after the completion, and masks the prompt."""
    return {"prompt": ex.prompt + ex.theorem, "completion": " " + ex.proof}


def lean_source(ex: HeraldExample, proof: str) -> str:
    """The text to elaborate after `ex.header`: the renamed statement and `proof` (e.g. a model's
    completion; surrounding whitespace is dropped, the proof's own indentation kept)."""
    return f"{ex.theorem} {proof.strip()}\n"


# ----------------------------------------------------------------------------- split

def valid_score(row_id: Any) -> float:
    """A number in [0, 1) fixed by the row id alone (sha256, not Python's per-process hash)."""
    digest = hashlib.sha256((SPLIT_SALT + str(row_id).strip()).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_examples(examples: Sequence[HeraldExample],
                   valid_fraction: float = 0.1) -> tuple[list[HeraldExample], list[HeraldExample]]:
    """(train, valid): an example is in valid when valid_score(id) < valid_fraction; each keeps the
    input order. Rows sharing an id land on the same side, so the two never share an id."""
    if not 0.0 <= valid_fraction < 1.0:
        raise UserError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    train, valid = [], []
    for ex in examples:
        (valid if valid_score(ex.id) < valid_fraction else train).append(ex)
    return train, valid


# ----------------------------------------------------------------------------- writing

def write_jsonl_atomic(records: Iterable[dict], path: str | Path) -> int:
    """Write `records` as UTF-8 jsonl (one object a line); -> how many.

    Like lmlab.artifacts.write_json_atomic: a temporary sibling, fsync, then os.replace, so a
    crash or a full disk never leaves a half-written file where a good one was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for rec in records:
                # ensure_ascii=False keeps Lean's ℕ, ∑, → readable; json escapes \n and \r, so a
                # record is always one line.
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


# ----------------------------------------------------------------------------- sample rows

# (name, statement, informal statement, proof, informal proof): Mathlib-style facts in Herald's
# shape. They read like Mathlib but are not checked by Lean.
_SAMPLES: tuple[tuple[str, str, str, str, str], ...] = (
    ("Nat.succ_le_of_lt", "theorem Nat.succ_le_of_lt {n m : ℕ} (h : n < m) : succ n ≤ m :=",
     "For natural numbers $n$ and $m$, if $n < m$ then $n + 1 \\le m$.", "by\n  exact h",
     "On the natural numbers $n < m$ is defined as $n + 1 \\le m$, so the hypothesis is the claim."),
    ("Nat.add_sub_cancel", "theorem Nat.add_sub_cancel {n m : ℕ} : n + m - m = n :=",
     "For natural numbers $n$ and $m$, $(n + m) - m = n$.", "by\n  omega",
     "Truncated subtraction of $m$ undoes adding $m$; this is linear arithmetic."),
    ("Nat.zero_add", "theorem Nat.zero_add (n : ℕ) : 0 + n = n :=",
     "Adding zero on the left of a natural number $n$ gives $n$.",
     "by\n  induction n with\n  | zero => rfl\n  | succ n ih => rw [Nat.add_succ, ih]",
     "By induction on $n$: $0 + 0 = 0$, and $0 + (n + 1) = (0 + n) + 1 = n + 1$ by the hypothesis."),
    ("Nat.pos_of_ne_zero", "theorem Nat.pos_of_ne_zero {n : ℕ} (h : n ≠ 0) : 0 < n :=",
     "A natural number $n$ that is not zero is positive.", "by\n  omega",
     "A natural number is either zero or at least one."),
    ("Nat.le_of_lt_succ", "theorem Nat.le_of_lt_succ {m n : ℕ} (h : m < n + 1) : m ≤ n :=",
     "If $m < n + 1$ for natural numbers $m$ and $n$, then $m \\le n$.", "by\n  omega",
     "There is no natural number strictly between $n$ and $n + 1$."),
    ("Nat.succ_ne_zero", "theorem Nat.succ_ne_zero (n : ℕ) : n + 1 ≠ 0 :=",
     "The successor $n + 1$ of a natural number is never zero.", "by\n  omega",
     "$n + 1 \\ge 1 > 0$."),
    ("Nat.factorial_pos", "theorem Nat.factorial_pos (n : ℕ) : 0 < n ! :=",
     "The factorial $n!$ of every natural number $n$ is positive.",
     "by\n  induction n with\n  | zero => simp\n  | succ n ih =>\n    rw [Nat.factorial_succ]\n    positivity",
     "By induction: $0! = 1 > 0$, and $(n + 1)! = (n + 1) \\cdot n!$ is a product of positive numbers."),
    ("Nat.gcd_comm", "theorem Nat.gcd_comm (m n : ℕ) : Nat.gcd m n = Nat.gcd n m :=",
     "The greatest common divisor of $m$ and $n$ equals that of $n$ and $m$.",
     "by\n  apply Nat.dvd_antisymm <;>\n  exact Nat.dvd_gcd (Nat.gcd_dvd_right _ _) (Nat.gcd_dvd_left _ _)",
     "Each of the two gcds divides both numbers, hence divides the other gcd; by antisymmetry they are equal."),
    ("Nat.sq_sub_sq'", "theorem Nat.sq_sub_sq' (a b : ℕ) : a ^ 2 - b ^ 2 = (a + b) * (a - b) :=",
     "For natural numbers $a$ and $b$, $a^2 - b^2 = (a + b)(a - b)$ with truncated subtraction.",
     "by\n  rw [Nat.sq_sub_sq]", "This is the difference of squares identity."),
    ("Nat.two_mul_ne_two_mul_add_one", "theorem Nat.two_mul_ne_two_mul_add_one {n m : ℕ} : 2 * n ≠ 2 * m + 1 :=",
     "An even natural number $2n$ is never equal to an odd number $2m + 1$.", "by\n  omega",
     "The two sides have different remainders modulo 2."),
    ("Nat.even_add_one", "theorem Nat.even_add_one {n : ℕ} : Even (n + 1) ↔ ¬Even n :=",
     "The number $n + 1$ is even if and only if $n$ is not even.", "by\n  simp [Nat.even_add, parity_simps]",
     "Adding one changes the parity."),
    ("Nat.Prime.two_le", "theorem Nat.Prime.two_le {p : ℕ} (hp : p.Prime) : 2 ≤ p :=",
     "Every prime number $p$ is at least 2.", "by\n  by_contra h\n  push_neg at h\n  interval_cases p <;> simp_all",
     "The only natural numbers below 2 are 0 and 1, and neither is prime."),
    ("Int.emod_two_eq_zero_or_one", "theorem Int.emod_two_eq_zero_or_one (n : ℤ) : n % 2 = 0 ∨ n % 2 = 1 :=",
     "The remainder of an integer $n$ modulo 2 is either 0 or 1.", "by\n  omega",
     "The remainder modulo 2 lies in $\\{0, 1\\}$."),
    ("Int.add_mul_emod_self", "theorem Int.add_mul_emod_self {a b c : ℤ} : (a + b * c) % c = a % c :=",
     "For integers $a$, $b$, $c$, $(a + bc) \\bmod c = a \\bmod c$.",
     "by\n  rw [Int.mul_comm, Int.add_mul_emod_self_left]",
     "Adding a multiple of $c$ does not change the remainder modulo $c$."),
    ("Int.natAbs_neg", "theorem Int.natAbs_neg (a : ℤ) : (-a).natAbs = a.natAbs :=",
     "The absolute value of $-a$ equals the absolute value of $a$ for every integer $a$.", "by\n  simp",
     "Negation does not change the absolute value."),
    ("Int.sq_nonneg'", "theorem Int.sq_nonneg' (a : ℤ) : 0 ≤ a ^ 2 :=",
     "The square of an integer is nonnegative.", "by\n  positivity", "A square is a product of two numbers of the same sign."),
    ("two_mul_le_add_sq", "theorem two_mul_le_add_sq (a b : ℝ) : 2 * a * b ≤ a ^ 2 + b ^ 2 :=",
     "For real numbers $a$ and $b$, $2ab \\le a^2 + b^2$.", "by\n  nlinarith [sq_nonneg (a - b)]",
     "$a^2 + b^2 - 2ab = (a - b)^2 \\ge 0$."),
    ("add_pow_two", "theorem add_pow_two (a b : ℝ) : (a + b) ^ 2 = a ^ 2 + 2 * a * b + b ^ 2 :=",
     "For real numbers $a$ and $b$, $(a + b)^2 = a^2 + 2ab + b^2$.", "by\n  ring", "Expand the square."),
    ("Real.sin_sq_add_cos_sq", "theorem Real.sin_sq_add_cos_sq (x : ℝ) : sin x ^ 2 + cos x ^ 2 = 1 :=",
     "For every real $x$, $\\sin^2 x + \\cos^2 x = 1$.", "by\n  rw [add_comm]\n  exact Real.cos_sq_add_sin_sq x",
     "This is the Pythagorean identity, with the two terms swapped."),
    ("Real.exp_ne_zero", "theorem Real.exp_ne_zero (x : ℝ) : exp x ≠ 0 :=",
     "The real exponential function never takes the value zero.", "by\n  exact (Real.exp_pos x).ne'",
     "The exponential is positive everywhere."),
    ("Real.log_one", "theorem Real.log_one : Real.log 1 = 0 :=", "The natural logarithm of 1 is 0.", "by\n  simp",
     "$e^0 = 1$."),
    ("Real.sqrt_sq", "theorem Real.sqrt_sq {x : ℝ} (h : 0 ≤ x) : √(x ^ 2) = x :=",
     "For a nonnegative real number $x$, $\\sqrt{x^2} = x$.", "by\n  rw [sq, Real.sqrt_mul_self h]",
     "The square root of $x \\cdot x$ is $x$ when $x \\ge 0$."),
    ("Real.add_sq_le_sq_add_sq", "theorem Real.add_sq_le_sq_add_sq (a b : ℝ) : (a + b) ^ 2 ≤ 2 * (a ^ 2 + b ^ 2) :=",
     "For real numbers $a$ and $b$, $(a + b)^2 \\le 2(a^2 + b^2)$.", "by\n  nlinarith [sq_nonneg (a - b)]",
     "The difference is $(a - b)^2 \\ge 0$."),
    ("Finset.card_range", "theorem Finset.card_range (n : ℕ) : (Finset.range n).card = n :=",
     "The set $\\{0, \\dots, n - 1\\}$ has $n$ elements.", "by\n  simp",
     "The range of $n$ lists exactly the numbers below $n$."),
    ("Finset.sum_range_one", "theorem Finset.sum_range_one (f : ℕ → ℕ) : ∑ k in Finset.range 1, f k = f 0 :=",
     "A sum over the range $\\{0\\}$ is the value at 0.", "by\n  simp", "The range of 1 is $\\{0\\}$."),
    ("Finset.mem_range_succ_iff", "theorem Finset.mem_range_succ_iff {a b : ℕ} : a ∈ Finset.range (b + 1) ↔ a ≤ b :=",
     "A natural number $a$ is in $\\{0, \\dots, b\\}$ if and only if $a \\le b$.",
     "by\n  simp [Nat.lt_succ_iff]", "Membership in the range means $a < b + 1$, that is $a \\le b$."),
    ("Finset.sum_range_id_mul_two",
     "theorem Finset.sum_range_id_mul_two (n : ℕ) : (∑ i in Finset.range n, i) * 2 = n * (n - 1) :=",
     "Twice the sum $0 + 1 + \\dots + (n - 1)$ equals $n(n - 1)$.",
     "by\n  induction n with\n  | zero => simp\n  | succ n ih =>\n    rw [Finset.sum_range_succ, add_mul, ih]\n"
     "    cases n with\n    | zero => simp\n    | succ n => simp [Nat.succ_sub_one]; ring",
     "By induction on $n$, adding $2n$ to $n(n - 1)$ gives $(n + 1)n$."),
    ("Set.inter_subset_left", "theorem Set.inter_subset_left {α : Type*} (s t : Set α) : s ∩ t ⊆ s :=",
     "The intersection of two sets $s$ and $t$ is contained in $s$.", "by\n  intro x hx\n  exact hx.1",
     "An element of $s \\cap t$ is in particular an element of $s$."),
    ("Set.subset_union_left", "theorem Set.subset_union_left {α : Type*} (s t : Set α) : s ⊆ s ∪ t :=",
     "A set $s$ is contained in the union $s \\cup t$.", "by\n  intro x hx\n  exact Or.inl hx",
     "An element of $s$ is an element of $s$ or of $t$."),
    ("abs_sub_comm", "theorem abs_sub_comm (a b : ℝ) : |a - b| = |b - a| :=",
     "For real numbers $a$ and $b$, $|a - b| = |b - a|$.", "by\n  rw [← abs_neg, neg_sub]",
     "$b - a = -(a - b)$ and the absolute value ignores the sign."),
)

# A proof that cites the lemma it proves (circular against Mathlib's copy): refused by the reader.
_SELF_CITING = ("abs_sub_comm", "theorem abs_sub_comm (a b : ℝ) : |a - b| = |b - a| :=",
                "For real numbers $a$ and $b$, $|a - b| = |b - a|$.", "by\n  exact abs_sub_comm a b",
                "This is the symmetry of the distance $|a - b|$.")
# A name in guillemets (a component Lean could not read bare).
_GUILLEMETS = ("Nat.«sum_first_n_odd»",
               "theorem Nat.«sum_first_n_odd» (n : ℕ) : ∑ i in Finset.range n, (2 * i + 1) = n ^ 2 :=",
               "The sum of the first $n$ odd numbers is $n^2$.",
               "by\n  induction n with\n  | zero => simp\n  | succ n ih =>\n    rw [Finset.sum_range_succ, ih]\n    ring",
               "By induction: $n^2 + (2n + 1) = (n + 1)^2$.")


def _row(rid: int, sample: tuple[str, str, str, str, str], header: str = HEADER) -> dict:
    name, stmt, informal, proof, informal_proof = sample
    first, _, rest = proof.partition("\n")
    commented = f"{first}\n  -- {informal_proof}\n{rest}" if rest else proof
    return {"id": rid, "name": name, "formal_theorem": stmt, "informal_theorem": informal, "formal_proof": proof,
            "informal_proof": informal_proof, "commented_proof": commented, "header": header}


def sample_rows(n: int = 200, seed: int = 0) -> list[dict]:
    """`n` Herald-style rows with all eight COLUMNS, the same for the same (n, seed).

    From n >= 4 on they include, on purpose, one proof that cites its own name (self_citation),
    one name in «guillemets», and max(1, n // 25) rows whose header is "Unable to analyze"; the
    rest cycle through ~30 Nat/Int/Real/Finset/Set facts (most with dotted names). Ids are
    distinct random integers, as Herald's are not 0..n-1.
    """
    if n < 0:
        raise UserError(f"sample_rows: n must be >= 0, got {n}")
    rng = random.Random(seed)
    ids = rng.sample(range(1_000_000), n)
    picks: list[tuple[tuple, str]] = []
    if n >= 4:
        picks += [(_SELF_CITING, HEADER), (_GUILLEMETS, HEADER)]
        picks += [(_SAMPLES[rng.randrange(len(_SAMPLES))], "Unable to analyze") for _ in range(max(1, n // 25))]
    order = list(_SAMPLES)
    rng.shuffle(order)
    picks += [(order[i % len(order)], HEADER) for i in range(n - len(picks))]
    rng.shuffle(picks)
    return [_row(rid, s, h) for rid, (s, h) in zip(ids, picks)]


def write_sample(path: str | Path, n: int = 200, seed: int = 0) -> Path:
    """Write sample_rows(n, seed) to `path`: .parquet (pyarrow, id int64 like the hub's) or .jsonl."""
    path = Path(path)
    rows = sample_rows(n, seed)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        write_jsonl_atomic(rows, path)
    elif suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{path}: writing parquet needs pyarrow (pip install pyarrow); or write .jsonl") from None
        schema = pa.schema([("id", pa.int64())] + [(c, pa.string()) for c in COLUMNS[1:]])
        table = pa.Table.from_pylist(rows, schema=schema)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    else:
        raise UserError(f"{path}: write_sample writes .parquet or .jsonl, not '{suffix or path.name}'")
    return path
