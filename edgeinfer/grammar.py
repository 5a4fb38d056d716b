"""Structured output: what an answer must be (any JSON object, a JSON Schema, a GBNF grammar), checked as it
is written by llama.cpp's grammar engine and, for JSON, validated with `jsonschema` when it ends."""

# A `Constraint` is the user's request, checked before any model loads: GBNF text (a schema is turned into
# GBNF by llama-cpp-python's converter) parsed by llama.cpp itself. `Grammar` is that constraint on a loaded
# model's vocabulary; `GrammarState` is one answer's progress through it, owned by that answer's Sampler, so
# each sequence of a batch and each drafter keeps its own. The Sampler samples first and asks the state about
# the chosen token alone (~30 us); only when the grammar refuses it are the best logits asked about, then if
# need be the whole vocabulary (60 ms for Qwen's 151,936 tokens on a Zen 4 core). docs/structured.md explains.

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import sys
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeinfer.bindings import c_api  # (llama.cpp's C API, loaded on first use)
from edgeinfer.errors import GenerationError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from edgeinfer.engine import GenerationResult, Model

# The longest run of whitespace an answer may hold: a grammar that allows whitespace anywhere (`ws ::= [ \t\n]*`)
# would let a model that has lost its way write spaces until --max-tokens. Past this, whitespace is refused;
# a grammar that needs more is a dead end, reported as one.
WHITESPACE_RUN = 48
# Where the sampled token is refused, the tokens of highest logit asked about before the whole vocabulary.
SHORTLIST = 128
GRAMMAR_LIMIT = 1 << 20  # bytes of a --grammar or --json-schema file: more is a mistake


@dataclass(frozen=True)
class Constraint:
    """What an answer must be: GBNF text for llama.cpp, and for JSON the schema it is validated against."""

    gbnf: str
    kind: str  # "json" (any JSON object), "schema" (a JSON Schema), "grammar" (GBNF as given)
    schema: str | None = None  # the JSON Schema as JSON text (kind "schema")
    where: str = ""  # what the user gave it as (`--grammar calc.gbnf`), for messages

    @property
    def is_json(self) -> bool:
        return self.kind in ("json", "schema")

    def describe(self) -> str:
        """A short name for /show and --json: json, schema (NAME) or grammar (FILE)."""
        return self.kind if not self.where or self.kind == "json" else f"{self.kind} ({self.where})"

    @functools.cached_property
    def _validator(self) -> Any:
        """The schema's jsonschema validator, built once for every answer checked against it."""
        from jsonschema import Draft202012Validator, validators

        schema = json.loads(self.schema)
        return validators.validator_for(schema, default=Draft202012Validator)(schema)

    def validate(self, text: str) -> str | None:
        """Why a finished answer fails the constraint (it does not parse, or the schema refuses it), or None
        when it passes. A grammar's answers are what the grammar allowed: nothing more to check."""
        if not self.is_json:
            return None
        try:
            value = json.loads(text)
        except ValueError as exc:
            return f"the answer is not JSON ({exc})"
        if self.kind == "json":
            return None if isinstance(value, dict) else "the answer is JSON but not an object"
        error = next(iter(sorted(self._validator.iter_errors(value), key=lambda e: e.path)), None)
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path)
        return f"the answer does not match the schema{f' at {where}' if where else ''}: {_short(error.message)}"

    def compile(self, model: Model) -> Grammar:
        """This constraint on a loaded model's vocabulary."""
        return Grammar(self, model)


def judged(result: GenerationResult, constraint: Constraint | None) -> GenerationResult:
    """A finished answer with its verdict (schema_valid, schema_error) under a JSON constraint."""
    if constraint is None or not constraint.is_json:
        return result
    why = constraint.validate(result.text)
    return replace(result, schema_valid=why is None, schema_error=why)


# --- making constraints --------------------------------------------------------------------


@functools.cache
def json_object() -> Constraint:
    """Any JSON object (`--format json`, OpenAI's json_object, Ollama's "json"): llama.cpp's JSON grammar."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return checked(Constraint(JSON_GBNF, "json", where="--format json"))


def from_schema(schema: str | dict | bool, where: str = "--json-schema") -> Constraint:
    """A JSON Schema (JSON text or its parsed value) as a constraint; a UsageError naming where it is wrong
    for a schema that is not JSON, not a valid schema, refers outside itself, or cannot be converted."""
    if isinstance(schema, str):
        schema = _parse_json(schema, where)
    if not isinstance(schema, (dict, bool)):
        raise UsageError(f"{where}: a JSON Schema is an object, not {type(schema).__name__}")
    from jsonschema import Draft202012Validator, SchemaError, validators

    try:
        validators.validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        at = "/".join(str(p) for p in exc.absolute_path)
        raise UsageError(f"{where}: not a valid JSON Schema{f' at {at}' if at else ''}: {_short(exc.message)}") from None
    if isinstance(schema, bool) or not schema:  # (true and {}: anything; false: nothing, refused below)
        if schema is False:
            raise UsageError(f"{where}: the schema `false` allows no answer at all")
        schema = {}
    _refuse_outside_refs(schema, where)
    return checked(Constraint(_schema_gbnf(schema, where), "schema", json.dumps(schema), where))


def from_grammar(text: str, where: str = "--grammar") -> Constraint:
    """GBNF text (llama.cpp's grammar language, start symbol `root`) as a constraint."""
    if not text.strip():
        raise UsageError(f"{where}: the grammar is empty")
    return checked(Constraint(text, "grammar", where=where))


def from_options(format: str | None = None, json_schema: str | None = None,
                 grammar: Path | None = None) -> Constraint | None:
    """The constraint of --format, --json-schema (a file or inline JSON) and --grammar FILE, at most one."""
    given = [name for name, value in (("--format", format), ("--json-schema", json_schema), ("--grammar", grammar))
             if value is not None]
    if len(given) > 1:
        raise UsageError(f"give one of --format, --json-schema and --grammar, not {' and '.join(given)}")
    if format is not None:
        return from_format(format, "--format")
    if json_schema is not None:
        return schema_argument(json_schema, "--json-schema")
    if grammar is not None:
        return from_grammar(read_text(grammar, "--grammar"), f"--grammar {grammar}")
    return None


def from_format(value: str, where: str = "format") -> Constraint | None:
    """`json` (any JSON object) or `off`/`none` (no constraint)."""
    if value.lower() == "json":
        return json_object()
    if value.lower() in ("off", "none", "text"):
        return None
    raise UsageError(f"{where} takes json (any JSON object) or off, not {value!r}")


def schema_argument(value: str, where: str) -> Constraint:
    """--json-schema's value: inline JSON when it looks like JSON, else a file holding it."""
    text = value if value.lstrip().startswith(("{", "[", "true", "false")) else None
    if text is None:
        path = Path(value).expanduser()
        return from_schema(read_text(path, where), f"{where} {value}")
    return from_schema(text, where)


def from_response_format(response_format: Any) -> Constraint | None:
    """OpenAI's `response_format`: {"type": "text"} (none), {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}} (what `client.chat.completions.parse()` sends). For the server:
    a UsageError says what is wrong with a request's field."""
    where = "response_format"
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise UsageError(f"{where} must be an object with a type (text, json_object or json_schema)")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind != "json_schema":
        raise UsageError(f"{where}.type must be text, json_object or json_schema, not {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise UsageError(f"{where}.json_schema must be an object with a schema")
    name = spec.get("name")
    return from_schema(spec["schema"], f"{where}.json_schema" + (f" ({name})" if isinstance(name, str) else ""))


def from_ollama_format(value: Any) -> Constraint | None:
    """Ollama's `format`: "json" (any JSON object), a JSON Schema object, or "" / null (none)."""
    if value is None or value == "":
        return None
    if value == "json":
        return json_object()
    if isinstance(value, dict):
        return from_schema(value, "format")
    raise UsageError(f'format must be "json" or a JSON Schema object, not {json.dumps(value)[:40]}')


def read_text(path: Path, what: str) -> str:
    """A grammar's or schema's file as text: one line saying why where it cannot be read."""
    try:
        with path.open("rb") as handle:
            data = handle.read(GRAMMAR_LIMIT + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > GRAMMAR_LIMIT:
        raise UsageError(f"{what} {path} is larger than {GRAMMAR_LIMIT >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise UsageError(f"{where}: nested too deeply") from None


def _refuse_outside_refs(schema: Any, where: str, path: str = "") -> None:
    """Every `$ref` must point inside the schema (#/...): a remote one is never fetched, and a relative one
    names a file that is not ours to read."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
            raise UsageError(f"{where}: $ref {json.dumps(ref)[:60]} at {path or '/'} points outside the schema; "
                             "edgeinfer never fetches one (copy it under $defs and refer to #/$defs/...)")
        for key, value in schema.items():
            _refuse_outside_refs(value, where, f"{path}/{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            _refuse_outside_refs(value, where, f"{path}/{i}")


# The converter lets a string hold any character but `"` and `\`; JSON wants control characters escaped,
# so a raw newline in a string would make an answer no JSON parser reads. llama.cpp's own JSON grammar
# excludes them; so does this rule.
_CHAR_RULE = re.compile(r'^char ::= \[\^"\\\\\] \|', re.MULTILINE)
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


def _schema_gbnf(schema: dict, where: str) -> str:
    """llama-cpp-python's JSON Schema converter (llama.cpp's, in Python), with strings kept to valid JSON."""
    from llama_cpp.llama_grammar import SchemaConverter

    class Converter(SchemaConverter):
        # 0.3.36 escapes quotes and line ends in a literal but not backslashes, so an enum or const holding
        # one (`"say \"hi\""` as JSON) became a grammar llama.cpp cannot parse; llama.cpp's converter escapes them.
        def _format_literal(self, literal: str) -> str:
            return super()._format_literal(literal.replace("\\", "\\\\"))

    try:
        converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        converter.visit(converter.resolve_refs(json.loads(json.dumps(schema)), "stdin"), "")
        gbnf = converter.format_grammar()
    except RecursionError:
        raise UsageError(f"{where}: the schema refers to itself too deeply to turn into a grammar") from None
    except (AssertionError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{where}: cannot turn this schema into a grammar: {_short(str(exc)) or type(exc).__name__}") from None
    return _CHAR_RULE.sub(lambda _m: _JSON_CHAR, gbnf)


def _short(text: str, most: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= most else text[: most - 3] + "..."


# --- checking GBNF with llama.cpp, before a model loads ----------------------------------------


def checked(constraint: Constraint) -> Constraint:
    """The constraint, once llama.cpp's parser accepts its GBNF (no model needed: parsing needs no vocabulary,
    save for token references like <|im_end|>, which are checked when the model loads)."""
    sampler, why = _init_grammar(None, constraint.gbnf)
    if sampler:
        c_api().llama_sampler_free(sampler)
    elif constraint.kind == "schema":  # (the user wrote no GBNF: a line and column in it would mean nothing)
        raise UsageError(f"{constraint.where}: llama.cpp cannot parse the grammar made of this schema ({why}); "
                         "the converter does not handle every regular expression of a `pattern`")
    elif "no vocab to parse token" not in why:
        raise UsageError(f"{constraint.where or 'grammar'}: {why}")
    return constraint


def _init_grammar(vocab, gbnf: str) -> tuple[Any, str]:
    """llama_sampler_init_grammar, and when it fails why: the parser writes its error to stderr (with the whole
    grammar after it), so stderr is caught around the call and the error made one line, with its line number."""
    ll = c_api()
    from edgeinfer import engine

    engine._backend["errors"] = []
    with _captured_stderr() as caught:
        sampler = ll.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
    if sampler:
        return sampler, ""
    return None, _parse_error(caught.text(), engine._backend["errors"], gbnf)


def _parse_error(printed: str, logged: list[str], gbnf: str) -> str:
    """The parser's message made one line: `expecting ::= at line 3, column 7`; else what llama.cpp logged."""
    match = re.search(r"error parsing grammar: (.*)", printed)
    if match:
        message = match.group(1)
        at = re.match(r"(.*?) at (.*)$", message, re.DOTALL)
        if at and at.group(2):  # the message ends with the rest of the grammar: find where that starts
            rest = printed[printed.index(at.group(2).splitlines()[0], match.start(1)):]
            offset = _offset_of(gbnf, rest)
            if offset is not None:
                line = gbnf.count("\n", 0, offset) + 1
                column = offset - (gbnf.rfind("\n", 0, offset) + 1) + 1
                return f"{at.group(1)} at line {line}, column {column}"
        return _short(message.splitlines()[0])
    lines = [line.strip() for line in [*logged, *printed.splitlines()] if line.strip()]
    useful = [line for line in lines if "failed to parse grammar" not in line]
    return _short((useful or lines or ["llama.cpp could not parse the grammar"])[0])


def _offset_of(gbnf: str, rest: str) -> int | None:
    """Where the unparsed rest of the grammar begins (the parser prints the rest, then the whole grammar)."""
    tail = rest.split("\n\n" + gbnf, 1)[0] if gbnf in rest else rest
    tail = tail.rstrip("\n")
    if not tail:
        return len(gbnf.rstrip("\n"))
    index = gbnf.rfind(tail)
    return index if index >= 0 else None


class _captured_stderr:
    """File descriptor 2 sent to a temporary file for the duration (C code's fprintf included)."""

    def __enter__(self) -> "_captured_stderr":
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)

    def text(self) -> str:
        self._file.seek(0)
        data = self._file.read()
        self._file.close()
        return data.decode("utf-8", errors="replace")


# --- a constraint on a model's vocabulary ----------------------------------------------------


class Grammar:
    """A constraint compiled for one model: what every answer's state starts from, shared by the sequences
    that use it; the vocabulary-wide arrays a mask needs belong to the model (`_Vocabulary`)."""

    def __init__(self, constraint: Constraint, model: Model) -> None:
        self.constraint, self.model = constraint, model
        self._vocab = model._vocab  # (llama.cpp's vocabulary of the loaded model: the grammar reads tokens' text)
        first, why = _init_grammar(self._vocab, constraint.gbnf)
        if not first:
            raise UsageError(f"{constraint.where or 'grammar'}: {why}")
        self._first = _owned(first)
        self.end_token = model.eos_token if model.is_eog(model.eos_token) else _first_eog(model)
        self._tables = _Vocabulary.of(model)

    def start(self) -> GrammarState:
        """A new answer's state."""
        return GrammarState(self, _owned(c_api().llama_sampler_clone(self._first.ptr)))

    def refused(self, sampler, ids: np.ndarray | None = None) -> np.ndarray:
        """Which tokens the grammar refuses in a state: one llama.cpp pass over the whole vocabulary, or over
        the tokens `ids`."""
        import numpy as np

        ll = c_api()
        if ids is None:
            cands = self._tables.candidates
        else:
            cands = np.zeros(len(ids), dtype=_token_data())
            cands["id"] = ids
        cands["logit"] = 0.0
        array = ll.llama_token_data_array(data=cands.ctypes.data_as(ll.llama_token_data_p), size=len(cands),
                                          selected=-1, sorted=False)
        ll.llama_sampler_apply(sampler, ctypes.byref(array))
        return np.isneginf(cands["logit"])

    def whitespace(self) -> np.ndarray:
        """Each token's length where its text is all whitespace, else 0 (read once per model, when a run first
        nears the cap)."""
        import numpy as np

        tables = self._tables
        if tables.whitespace is None:
            piece = self.model.piece
            tables.whitespace = np.array([len(p) if p and p.isspace() else 0 for p in map(piece, range(self.model.n_vocab))],
                                         dtype=np.int32)
        return tables.whitespace


class _Vocabulary:
    """A loaded model's vocabulary-wide arrays, made once per model and shared by every Grammar compiled on it
    (the server compiles one per request: rebuilding them cost ~50 ms a request on Qwen's vocabulary). One
    candidates array serves them all: llama.cpp's grammar writes only its logits, which `refused` resets before
    each pass, and llama.cpp is called from one thread (the server's engine thread)."""

    _of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # (a model's tables go when the model does)

    def __init__(self, n_vocab: int) -> None:
        import numpy as np

        self.candidates = np.zeros(n_vocab, dtype=_token_data())
        self.candidates["id"] = np.arange(n_vocab)
        self.whitespace: np.ndarray | None = None  # each token's length if it is all whitespace, else 0

    @classmethod
    def of(cls, model: Model) -> _Vocabulary:
        tables = cls._of.get(model)
        if tables is None:
            tables = cls._of[model] = cls(model.n_vocab)
        return tables


def _first_eog(model: Model) -> int:
    return next(t for t in range(model.n_vocab) if model.is_eog(t))


class _owned:
    """A llama_sampler pointer freed when its owner is collected."""

    def __init__(self, ptr) -> None:
        self.ptr = ptr
        self._free = weakref.finalize(self, c_api().llama_sampler_free, ptr)


@functools.cache
def _token_data() -> np.dtype:
    """llama_token_data as a numpy record, so a whole vocabulary of candidates is one array llama.cpp reads."""
    import numpy as np

    return np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class GrammarState:
    """One answer's progress through a grammar. It follows the history it is shown: tokens the history holds
    past those accepted are accepted (checked first: llama.cpp aborts on a token its grammar refuses), so a
    sampler's callers never have to tell it what they kept."""

    def __init__(self, grammar: Grammar, sampler: _owned) -> None:
        import numpy as np

        self.grammar, self._sampler = grammar, sampler
        self.start: int | None = None  # where the answer begins in the history
        self.accepted: list[int] = []
        self.run = 0  # whitespace characters ending the answer so far
        self._last = b""  # the answer's last character that is not whitespace
        self._allowed: int | None = None  # the last token `allows` took, in the state as it is now
        self._one = np.zeros(1, dtype=_token_data())
        ll = c_api()
        self._one_array = ll.llama_token_data_array(data=self._one.ctypes.data_as(ll.llama_token_data_p), size=1,
                                                    selected=-1, sorted=False)

    def follow(self, history: Sequence[int]) -> None:
        """Accept what the history holds past the tokens accepted; start over where it went another way."""
        if self.start is None:
            self.start = len(history)
        n = len(self.accepted)
        if len(history) - self.start < n or (n and history[self.start + n - 1] != self.accepted[-1]):
            self._restart()
            n = 0
        for token in history[self.start + n:]:
            self.accept(token)

    def _restart(self) -> None:
        # (a caller went back: the state is rebuilt from the answer's start, which Sampler.fork spares drafters)
        self._sampler = _owned(c_api().llama_sampler_clone(self.grammar._first.ptr))
        self.accepted, self.run, self._last, self._allowed = [], 0, b"", None

    def accept(self, token: int) -> None:
        model = self.grammar.model
        if model.is_eog(token):
            return  # (the answer ends: nothing follows to constrain)
        if token != self._allowed and not self.allows(token):  # (the token just sampled was asked about already)
            raise GenerationError(f"token {token} ({model.piece(token)!r}) breaks the {self.grammar.constraint.kind}")
        c_api().llama_sampler_accept(self._sampler.ptr, token)
        self._allowed = None
        self.accepted.append(token)
        piece = model.piece(token)
        stripped = piece.rstrip()
        self.run = self.run + len(piece) if not stripped else len(piece) - len(stripped)
        self._last = stripped[-1:] or self._last

    def allows(self, token: int) -> bool:
        """Does the grammar take this token next (the fast path: one candidate, about 30 us)?"""
        if self.run and self._too_much_space(token):
            return False
        self._one["id"], self._one["logit"] = token, 0.0
        c_api().llama_sampler_apply(self._sampler.ptr, ctypes.byref(self._one_array))
        if self._one["logit"][0] == float("-inf"):
            return False
        self._allowed = token
        return True

    def _too_much_space(self, token: int) -> bool:
        piece = self.grammar.model.piece(token)
        return bool(piece) and piece.isspace() and self.run + len(piece) > WHITESPACE_RUN

    @property
    def complete(self) -> bool:
        """A JSON answer whose value is whole (the grammar would take its end): it ends here, rather than
        leaving a model to choose between the end and trailing spaces. Numbers may yet grow: those the model ends."""
        if not self.grammar.constraint.is_json or self._last not in (b"}", b"]", b'"', b"e", b"l"):
            return False
        return self.allows(self.grammar.end_token)

    def mask(self, logits: np.ndarray, best: int = 0) -> np.ndarray:
        """The logits with every token the grammar (or the whitespace cap) refuses at -inf; a GenerationError
        when it refuses them all: the answer cannot go on.

        With `best` = n, only the n allowed tokens of highest logit matter (greedy: 1; top-k sampling: k), and
        those are looked for first among the SHORTLIST highest logits, in one grammar call on that many
        candidates (~0.3 ms against 60 ms for Qwen's vocabulary). Exact: a token outside the shortlist has a
        lower logit than all n found, which is checked; where they are not found, the whole vocabulary is masked."""
        import numpy as np

        if best:
            found = self._shortlisted(np.asarray(logits, dtype=np.float32), best)
            if found is not None:
                return found
        refused = self.grammar.refused(self._sampler.ptr)
        if self.run:
            refused |= self.grammar.whitespace() > WHITESPACE_RUN - self.run
        if refused.all():
            text = self.grammar.model.detokenize(self.accepted[-8:])
            space = f" (whitespace is capped at {WHITESPACE_RUN} characters in a row)" if self.run else ""
            n = len(self.accepted)
            raise GenerationError(f"the {self.grammar.constraint.describe()} allows no token after "
                                  f"{n} token{'s' * (n != 1)}, ending {text!r}{space}: the answer cannot go on")
        return np.where(refused, np.float32(-np.inf), np.asarray(logits, dtype=np.float32))

    def _shortlisted(self, x: np.ndarray, best: int) -> np.ndarray | None:
        """The logits masked to the allowed tokens among the highest, if `best` of them beat every logit
        outside the shortlist; else None."""
        import numpy as np

        size = max(SHORTLIST, 4 * best)
        if size >= len(x):
            return None
        order = np.argpartition(-x, size)
        top, boundary = order[:size], x[order[size]]  # (every token outside `top` has a logit <= boundary)
        refused = self.grammar.refused(self._sampler.ptr, top)
        if self.run:
            refused |= np.fromiter((self._too_much_space(int(t)) for t in top), dtype=bool, count=size)
        allowed = top[~refused]
        if len(allowed) < best or np.sort(x[allowed])[-best] <= boundary:
            return None
        out = np.full(len(x), -np.inf, dtype=np.float32)
        out[allowed] = x[allowed]
        return out

    def fork(self) -> GrammarState:
        """A copy at the same place, to go ahead without moving this one (a drafter's proposals)."""
        other = GrammarState(self.grammar, _owned(c_api().llama_sampler_clone(self._sampler.ptr)))
        other.start, other.accepted, other.run, other._last = self.start, list(self.accepted), self.run, self._last
        return other
