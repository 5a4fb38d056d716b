"""Structured output on real llama.cpp with tiny generated models: JSON, JSON Schemas and GBNF grammars.

A random tiny model has no idea what JSON is: nearly every token it would pick is refused, so these answers
go through the grammar's mask at almost every step, the hardest case for the constraint and the cheapest
to run.
"""

from __future__ import annotations

import ast
import json
import re
from types import SimpleNamespace

import jsonschema
import pytest

from edgeinfer import grammar
from edgeinfer.batch import Job, generate_batch
from edgeinfer.engine import LoadOptions, generate, load
from edgeinfer.errors import GenerationError, UsageError
from edgeinfer.sampling import SamplingParams
from edgeinfer.speculative import DraftOptions, stepper_factory
from edgeinfer.speculative.drafters import ModelDrafter, NgramDrafter
from test_speculative import quantized_target

GREEDY = SamplingParams(temperature=0)

# Five schemas a random model must still satisfy: every string has a maxLength and every array a maxItems,
# so that each answer is bounded and ends well within the token limit.
SCHEMAS = {
    "nested objects": {
        "type": "object",
        "properties": {"user": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 12},
            "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                         "floor": {"type": "integer"}}, "required": ["city"]}},
            "required": ["name", "address"]}},
        "required": ["user"],
    },
    "arrays with min and max items": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
                       "pairs": {"type": "array", "items": {"type": "array", "items": {"type": "integer"},
                                                            "minItems": 2, "maxItems": 2}, "maxItems": 2}},
        "required": ["tags", "pairs"],
    },
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3, None]},
                       "ok": {"type": "boolean"}},
        "required": ["color", "size", "ok"],
    },
    "integers and numbers": {
        "type": "object",
        "properties": {"count": {"type": "integer"}, "ratio": {"type": "number"},
                       "values": {"type": "array", "items": {"type": "number"}, "maxItems": 3}},
        "required": ["count", "ratio", "values"],
    },
    "required and optional keys, strings with escapes": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "title": {"type": "string", "maxLength": 24},
                       "note": {"type": "string", "maxLength": 24}, "draft": {"type": "boolean"},
                       "quote": {"enum": ['say "hi"', "back\\slash", "tab\tand\nnewline", "ünï/€"]}},
        "required": ["id", "title", "quote"],
    },
}

ARITHMETIC = r"""
root ::= expr "="
expr ::= term (("+" | "-" | "*") term)*
term ::= num | "(" expr ")"
num  ::= [1-9] [0-9]{0,2}
"""


@pytest.fixture(scope="module")
def tiny(tiny_model):
    # (one thread: on a machine shared with other work, two threads wait on each other at every step)
    with load(tiny_model, LoadOptions(n_ctx=256, n_threads=1, n_seq=16)) as model:
        yield model


@pytest.fixture(scope="module")
def pair(tiny_family, tmp_path_factory):
    """The tiny target in Q8_0 and its own Q4_K_M as a draft (as test_speculative.py pairs them)."""
    q8, q4 = quantized_target(tiny_family, tmp_path_factory.mktemp("structured"))
    options = LoadOptions(n_ctx=512, n_threads=1, cache_type="q8_0")
    with load(q8, options) as target, load(q4, options) as close:
        yield SimpleNamespace(target=target, close=close, q8=q8)


def sampled(model, constraint: grammar.Constraint, seeds: range, max_tokens: int = 200) -> list:
    """One answer for each seed, sampled at temperature 1, sixteen sequences at once (each its own grammar state)."""
    compiled = constraint.compile(model)
    prompt = tuple(model.tokenize("Answer in JSON:"))
    jobs = [Job(seed, prompt, SamplingParams(temperature=1.0, seed=seed),
                max_tokens=max_tokens, grammar=compiled) for seed in seeds]
    return sorted(generate_batch(model, jobs), key=lambda answer: answer.key)


# --- JSON Schemas ------------------------------------------------------------------------------


def test_200_seeded_answers_under_five_schemas_all_parse_and_validate(tiny):
    escapes = 0
    for name, schema in SCHEMAS.items():
        constraint = grammar.from_schema(json.dumps(schema))
        for answer in sampled(tiny, constraint, range(40)):
            result = grammar.judged(answer.result, constraint)
            assert result.finish_reason == "stop", (name, answer.key, result.text)
            jsonschema.validate(json.loads(result.text), schema)
            assert result.schema_valid is True and result.schema_error is None
            escapes += "\\" in result.text
    assert escapes >= 40  # (every answer to the last schema quotes a string with escapes, and it parsed)


def test_strings_in_schema_answers_never_hold_a_raw_control_character():
    """The converter's strings take any character but a quote and a backslash; JSON wants control characters
    escaped, so edgeinfer's grammar refuses them as llama.cpp's own JSON grammar does."""
    gbnf = grammar.from_schema('{"type": "string"}').gbnf
    assert r'char ::= [^"\\\x7F\x00-\x1F]' in gbnf


def test_format_json_gives_a_json_object(tiny_model, cli, edgeinfer_home):
    """A random model writes free JSON strings of any length: each answer is a whole object, or one cut short
    by --max-tokens and reported so (exit 13); at temperature 0 this one ends."""
    for sampling in (("--temperature", "0"), ("--seed", "1"), ("--seed", "2"), ("--seed", "3")):
        run = cli("run", "-m", tiny_model, "--raw", "--format", "json", "--json", *sampling, "-n", "300", "-t", "1",
                  "Answer in JSON:")
        answer = json.loads(run.stdout)
        if answer["finish_reason"] == "length":
            assert run.exit_code == 13 and answer["schema_valid"] is False and "not JSON" in run.error_line
            continue
        assert run.exit_code == 0, run.stderr
        assert answer["finish_reason"] == "stop" and answer["schema_valid"] is True
        assert isinstance(json.loads(answer["text"]), dict)
        assert sampling[0] != "--temperature" or answer["finish_reason"] == "stop"


def test_a_schema_rule_the_grammar_cannot_enforce_is_caught_when_the_answer_ends(tiny_model, cli, edgeinfer_home):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10 ** 17}}, "required": ["n"]}
    run = cli("run", "-m", tiny_model, "--raw", "--json-schema", json.dumps(schema), "--json", "--temperature", "0",
              "-n", "100", "-t", "1", "Answer in JSON:")
    assert run.exit_code == 13
    assert "does not match the schema at n" in run.error_line
    answer = json.loads(run.stdout)
    assert answer["schema_valid"] is False and "minimum" in answer["schema_error"]


def test_an_answer_cut_short_by_max_tokens_is_reported_as_not_matching(tiny_model, cli, edgeinfer_home):
    run = cli("run", "-m", tiny_model, "--raw", "--format", "json", "--temperature", "0", "-n", "3", "-t", "1", "Hi")
    assert run.exit_code == 13 and "not JSON" in run.error_line
    assert run.stdout.startswith("{")


# --- GBNF grammars ---------------------------------------------------------------------------


def test_a_grammar_for_arithmetic_gives_expressions_in_its_language(tiny, tmp_path):
    constraint = grammar.from_grammar(ARITHMETIC, "arithmetic.gbnf")
    ended = 0
    for answer in sampled(tiny, constraint, range(24), max_tokens=120):
        text, reason = answer.result.text, answer.result.finish_reason
        assert set(text) <= set("0123456789+-*()="), text
        if reason == "stop":  # the grammar is complete after "=": nothing but the end may follow
            ended += 1
            assert text.endswith("=") and text.count("=") == 1
            tree = ast.parse(text[:-1], mode="eval")
            assert all(isinstance(node, (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult))
                       for node in ast.walk(tree)), text
    assert ended >= 12


def test_a_grammar_file_on_the_command_line(tiny_model, cli, edgeinfer_home, tmp_path):
    path = tmp_path / "yes-no.gbnf"
    path.write_text('root ::= ("yes" | "no") "."\n', encoding="utf-8")
    code, out, err = cli("run", "-m", tiny_model, "--raw", "--grammar", path, "--seed", "4", "-n", "20", "-t", "1", "Q?")
    assert code == 0, err
    assert out.strip() in ("yes.", "no.")


def test_a_grammar_that_dead_ends_is_a_clear_error(tiny_model, cli, edgeinfer_home, tmp_path):
    dead = tmp_path / "dead.gbnf"
    dead.write_text('root ::= "ab" [\\x00]\n', encoding="utf-8")  # (no token spells a NUL)
    run = cli("run", "-m", tiny_model, "--raw", "--grammar", dead, "--temperature", "0", "-n", "20", "-t", "1", "Hi")
    assert run.exit_code == 10
    assert "allows no token after" in run.error_line and "cannot go on" in run.error_line
    assert run.stdout.startswith("ab")


def test_runs_of_whitespace_are_capped(tiny):
    needs_spaces = grammar.from_grammar(f'root ::= "x" " "{{{grammar.WHITESPACE_RUN + 10}}} "y"', "spaces.gbnf")
    with pytest.raises(GenerationError, match="whitespace is capped"):
        generate(tiny, tiny.tokenize("Hi"), GREEDY, max_tokens=200, grammar=needs_spaces.compile(tiny))
    # Any amount of whitespace allowed: the answer still holds no run longer than the cap.
    loose = grammar.from_grammar('root ::= ([ \\t\\n]* [a-z])+ "."', "loose.gbnf")
    for answer in sampled(tiny, loose, range(8), max_tokens=150):
        runs = re.findall(r"\s+", answer.result.text)
        assert max(map(len, runs), default=0) <= grammar.WHITESPACE_RUN, answer.result.text


# --- refused before any model loads -----------------------------------------------------------


@pytest.mark.parametrize("option, value, message", [
    ("--json-schema", '{"type": "objec"}', "--json-schema: not a valid JSON Schema at type"),
    ("--json-schema", '{"type": "object", "properties": {"a": ', "--json-schema: not JSON at line 1, column"),
    ("--json-schema", '{"properties": {"a": {"$ref": "https://example.com/a.json"}}}', "never fetches"),
    ("--json-schema", '{"$ref": "other.json#/x"}', "points outside the schema"),
    ("--format", "yaml", "--format takes json"),
])
def test_a_bad_schema_is_one_line_and_exit_2_before_any_model_loads(cli, edgeinfer_home, option, value, message):
    run = cli("run", "-m", "/no/such/model.gguf", option, value, "Hi")
    assert run.exit_code == 2
    assert message in run.error_line


@pytest.mark.parametrize("text, message", [
    ('root ::= "a" foo\n', "Undefined rule identifier 'foo'"),
    ('root ::= "a"\nnext := "b"\n', "expecting ::= at line 2, column 6"),
    ('start ::= "a"\n', "does not contain a 'root' symbol"),
    ('root ::= root "a" | "b"\n', "left recursion"),
])
def test_a_bad_grammar_is_one_line_naming_where_and_exit_2(cli, edgeinfer_home, tmp_path, text, message):
    path = tmp_path / "bad.gbnf"
    path.write_text(text, encoding="utf-8")
    run = cli("run", "-m", "/no/such/model.gguf", "--grammar", path, "Hi")
    assert run.exit_code == 2
    assert run.error_line.startswith(f"error: --grammar {path}: ") and message in run.error_line


def test_one_constraint_at_a_time(cli, edgeinfer_home):
    run = cli("run", "--format", "json", "--json-schema", "{}", "Hi")
    assert run.exit_code == 2 and "give one of --format, --json-schema and --grammar" in run.error_line


# --- what the server will call -------------------------------------------------------------------


def test_openai_response_format_and_ollama_format_become_constraints():
    assert grammar.from_response_format(None) is None
    assert grammar.from_response_format({"type": "text"}) is None
    assert grammar.from_response_format({"type": "json_object"}).kind == "json"
    # What openai's client.chat.completions.parse(response_format=SomeModel) sends for a Pydantic model.
    strict = {"type": "json_schema", "json_schema": {"name": "Step", "strict": True, "schema": {
        "$defs": {"Item": {"properties": {"name": {"title": "Name", "type": "string"}}, "required": ["name"],
                           "title": "Item", "type": "object", "additionalProperties": False}},
        "properties": {"items": {"items": {"$ref": "#/$defs/Item"}, "title": "Items", "type": "array"},
                       "total": {"title": "Total", "type": "number"}},
        "required": ["items", "total"], "title": "Step", "type": "object", "additionalProperties": False}}}
    constraint = grammar.from_response_format(strict)
    assert constraint.kind == "schema" and "Step" in constraint.where
    assert constraint.validate('{"items": [{"name": "a"}], "total": 1.5}') is None
    assert "total" in constraint.validate('{"items": []}')
    with pytest.raises(UsageError, match="json_schema must be an object with a schema"):
        grammar.from_response_format({"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(UsageError, match="response_format.type must be"):
        grammar.from_response_format({"type": "yaml"})
    assert grammar.from_ollama_format("json").kind == "json"
    assert grammar.from_ollama_format({"type": "object", "properties": {"a": {"type": "string"}}}).kind == "schema"
    assert grammar.from_ollama_format("") is None
    with pytest.raises(UsageError, match="format must be"):
        grammar.from_ollama_format(42)


# --- speculative decoding stays exact --------------------------------------------------------


@pytest.mark.parametrize("which", ["close", "ngram"])
def test_greedy_speculation_under_a_schema_gives_the_constrained_targets_own_tokens(pair, which):
    target = pair.target
    schema = grammar.from_schema(json.dumps(SCHEMAS["required and optional keys, strings with escapes"]))
    compiled = schema.compile(target)
    for text in ("Answer in JSON: the title and id of the book", 'Copy this: {"id": 12, "title": "Hello world"}'):
        prompt = target.tokenize(text, add_special=False)
        plain = generate(target, prompt, GREEDY, max_tokens=120, grammar=compiled)
        for draft_max in (2, 5):
            drafter = NgramDrafter() if which == "ngram" else ModelDrafter(pair.close, target.n_vocab, target.info.file_size)
            options = DraftOptions(ref=drafter.name, draft_max=draft_max, p_min=0.0, adaptive=False)
            fast = generate(target, prompt, GREEDY, max_tokens=120, grammar=compiled,
                            stepper_factory=stepper_factory(lambda: drafter, options, 120))
            assert fast.tokens == plain.tokens, (which, text, draft_max)
            assert fast.finish_reason == plain.finish_reason == "stop"
        assert schema.validate(plain.text) is None
    if which == "close":
        assert fast.stats["accepted"] > 0


def test_run_with_draft_and_a_schema_on_the_command_line(pair, cli, edgeinfer_home):
    schema = json.dumps(SCHEMAS["enums"])
    args = ("run", "-m", pair.q8, "--raw", "--json-schema", schema, "--temperature", "0", "-n", "60", "-t", "1",
            "--cache-type", "q8_0", "--json", "Answer in JSON:")
    plain = json.loads(cli(*args).stdout)
    for draft in ("ngram", str(pair.q8).replace("q8_0", "q4_k_m")):
        run = cli(*args, "--draft", draft)
        assert run.exit_code == 0, run.stderr
        assert json.loads(run.stdout)["text"] == plain["text"]
    assert plain["schema_valid"] is True


# --- batches and chat -----------------------------------------------------------------------


def test_batch_lines_carry_their_own_constraints(tiny_model, cli, edgeinfer_home, tmp_path):
    rows = [{"id": 1, "prompt": "a", "format": "json"},
            {"id": 2, "prompt": "b", "json_schema": SCHEMAS["enums"]},
            {"id": 3, "prompt": "c", "grammar": 'root ::= [a-c]+ "!"'},
            {"id": 4, "prompt": "d", "format": SCHEMAS["arrays with min and max items"]},
            {"id": 5, "prompt": "e"},
            {"id": 6, "prompt": "f", "grammar": "root ::= nothing"}]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    code, out, err = cli("run", "-m", tiny_model, "--raw", "--batch", path, "--parallel", "3", "--seed", "5",
                         "-n", "300", "-t", "1")
    answers = {row["id"]: row for row in map(json.loads, out.splitlines())}
    assert code == 12 and "1 of 6 requests failed" in err
    assert isinstance(json.loads(answers[1]["text"]), dict) and answers[1]["schema_valid"] is True
    jsonschema.validate(json.loads(answers[2]["text"]), SCHEMAS["enums"])
    assert answers[3]["text"].endswith("!") and set(answers[3]["text"][:-1]) <= set("abc")
    assert answers[4]["schema_valid"] is True
    assert "schema_valid" not in answers[5]
    assert "line 6: grammar: Undefined rule identifier 'nothing'" in answers[6]["error"]


def test_chat_format_and_schema_commands(tiny_model, cli, edgeinfer_home, tmp_path):
    schema = tmp_path / "colors.json"
    schema.write_text(json.dumps(SCHEMAS["enums"]), encoding="utf-8")
    typed = f"/format json\nhello\n/schema {schema}\nhello\n/show\n/format off\n/show\n"
    code, out, err = cli("chat", "-m", tiny_model, "--seed", "1", "-n", "300", "-t", "1", input=typed)
    assert code == 0, err
    answers = [line for line in out.splitlines() if line.startswith("{")]
    assert len(answers) == 2  # (free JSON from a random model may be cut short by -n: a note says so if it is)
    jsonschema.validate(json.loads(answers[1]), SCHEMAS["enums"])
    assert f"format          schema (/schema {schema})" in err and "format          off" in err


def test_bench_compares_free_and_constrained_generation(tiny_model, cli, edgeinfer_home):
    code, out, err = cli("bench", tiny_model, "-p", "0", "-n", "24", "-r", "1", "-t", "1", "--format", "json", "--json")
    assert code == 0, err
    tests = {row["test"]: row for row in json.loads(out)}
    assert {"tg24", "tg24 json-prompt", "tg24 json-prompt json"} <= set(tests)
    assert all(row["median_tokens_per_second"] > 0 for row in tests.values())


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=1.0, top_k=8, seed=3)])
def test_looking_among_the_best_logits_first_gives_what_masking_everything_gives(tiny, monkeypatch, sampling):
    """Where the sampled token is refused, the allowed tokens that can be drawn are looked for among the
    highest logits before the whole vocabulary is masked: the answers are the same either way."""
    constraint = grammar.from_schema(json.dumps(SCHEMAS["nested objects"]))
    prompt = tiny.tokenize("Answer in JSON:")
    shortlisted = generate(tiny, prompt, sampling, max_tokens=150, grammar=constraint.compile(tiny))
    monkeypatch.setattr(grammar, "SHORTLIST", 10 ** 9)  # (longer than the vocabulary: every mask is whole)
    whole = generate(tiny, prompt, sampling, max_tokens=150, grammar=constraint.compile(tiny))
    assert shortlisted.tokens == whole.tokens and shortlisted.finish_reason == "stop"


def test_speculative_samplings_distribution_under_a_grammar_is_the_whole_masks(tiny, monkeypatch):
    """p for verifying a draft under a grammar, with top-k, looks for the k best allowed tokens among the
    highest logits first: row by row, the same distribution as masking the whole vocabulary."""
    from edgeinfer.sampling import Sampler

    compiled = grammar.from_schema(json.dumps(SCHEMAS["nested objects"])).compile(tiny)
    sampling = SamplingParams(temperature=1.0, top_k=8, seed=5)
    prompt = tiny.tokenize("Answer in JSON:")
    answer = generate(tiny, prompt, sampling, max_tokens=80, grammar=compiled).tokens
    rows = []
    for n in range(len(answer)):
        history = [*prompt, *answer[:n]]
        rows.append((history, tiny.prefill(history).copy()))
    shortlisted = Sampler(sampling, compiled)
    found = [shortlisted.distribution(logits, history) for history, logits in rows]
    monkeypatch.setattr(grammar, "SHORTLIST", 10 ** 9)  # (longer than the vocabulary: every mask is whole)
    whole = Sampler(sampling, compiled)
    assert len(rows) > 10
    for (history, logits), p in zip(rows, found):
        assert (p == whole.distribution(logits, history)).all()
