#!/usr/bin/env python3
"""What structured output costs: generation tok/s with no constraint, with `--format json` and with a nested
JSON Schema, in edgeinfer and in llama-cpp-python's own grammar path, on the same file and prompt.

edgeinfer samples first and asks the grammar about the chosen token alone, masking the whole vocabulary only
when that token is refused; llama-cpp-python's `Llama.create_completion(grammar=LlamaGrammar...)` runs the
grammar in its sampler chain. Six variants, interleaved (A B C D E F, B C D E F A, ...) so that machine noise
hits all alike; medians and ratios; greedy; a fresh KV cache for each answer; and a count of the answers that
parse and validate (jsonschema).

Usage (take the quiet lock first on a shared machine):
    EDGEINFER_HOME=/tmp/benchhome python scripts/bench_structured.py \\
        --model qwen2.5-coder-1.5b-instruct --model smollm2-135m-instruct --threads 2 --reps 3
Models are catalog names (pulled if missing) or .gguf paths.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jsonschema

from edgeinfer import grammar
from edgeinfer.engine import LoadOptions, generate, load
from edgeinfer.library import Library, locate
from edgeinfer.sampling import SamplingParams
from edgeinfer.template import chat_tokens

GREEDY = SamplingParams(temperature=0)
PROMPT = ("Describe a small online bookshop's inventory as JSON: an object with a \"shop\" name, an \"address\" object "
          "(street, city, country) and a \"books\" array of 4 books, each with title, author, year, price, "
          "in_stock (a boolean) and a \"tags\" array of 2 or 3 short words. Reply with the JSON only.")
SHORT = {"type": "string", "maxLength": 48}  # (bounded strings: a small model's answer still ends)
SCHEMA = {
    "type": "object",
    "properties": {
        "shop": SHORT,
        "address": {"type": "object", "properties": {"street": SHORT, "city": SHORT, "country": SHORT},
                    "required": ["street", "city", "country"]},
        "books": {"type": "array", "minItems": 1, "maxItems": 6, "items": {
            "type": "object",
            "properties": {"title": SHORT, "author": SHORT, "year": {"type": "integer"}, "price": {"type": "number"},
                           "in_stock": {"type": "boolean"},
                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4}},
            "required": ["title", "author", "year", "price", "in_stock", "tags"]}},
    },
    "required": ["shop", "address", "books"],
}
VARIANTS = ("edgeinfer free", "edgeinfer json", "edgeinfer schema",
            "llama-cpp-python free", "llama-cpp-python json", "llama-cpp-python schema")


def valid(text: str, kind: str) -> bool | None:
    """Does an answer parse (and validate), for the constrained variants; None for free text."""
    if kind == "free":
        return None
    try:
        value = json.loads(text)
        if kind == "schema":
            jsonschema.validate(value, SCHEMA)
        return isinstance(value, dict)
    except (ValueError, jsonschema.ValidationError):
        return False


def edgeinfer_answer(model, prompt: list[int], n: int, compiled) -> tuple[float, int, str]:
    model.truncate(0)
    result = generate(model, prompt, GREEDY, max_tokens=n, grammar=compiled)
    return result.generation_tokens_per_second, result.completion_tokens, result.text


def llama_answer(llm, prompt: list[int], n: int, llama_grammar) -> tuple[float, int, str]:
    """create_completion streamed, so that generation is timed from the first token on, as edgeinfer's is."""
    llm.reset()
    first, count, parts = None, 0, []
    for chunk in llm.create_completion(prompt, max_tokens=n, temperature=0.0, repeat_penalty=1.0, stream=True,
                                       grammar=llama_grammar):
        count += 1
        first = first or time.perf_counter()
        parts.append(chunk["choices"][0]["text"])
    end = time.perf_counter()
    return ((count - 1) / (end - first) if count > 1 else 0.0), count, "".join(parts)


def bench_model(name: str, path: Path, reps: int, n: int, threads: int) -> dict:
    from llama_cpp import Llama, LlamaGrammar
    from llama_cpp.llama_grammar import JSON_GBNF

    ours = load(path, LoadOptions(n_ctx=2048, n_threads=threads))
    prompt = chat_tokens(ours, [{"role": "user", "content": PROMPT}])
    json_c, schema_c = grammar.json_object(), grammar.from_schema(json.dumps(SCHEMA))
    compiled = {"json": json_c.compile(ours), "schema": schema_c.compile(ours)}
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    # llama-cpp-python's own grammars: its JSON grammar and its own converter's output for the schema.
    theirs = {"json": LlamaGrammar.from_string(JSON_GBNF, verbose=False),
              "schema": LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)}
    run = {
        "edgeinfer free": lambda: edgeinfer_answer(ours, prompt, n, None),
        "edgeinfer json": lambda: edgeinfer_answer(ours, prompt, n, compiled["json"]),
        "edgeinfer schema": lambda: edgeinfer_answer(ours, prompt, n, compiled["schema"]),
        "llama-cpp-python free": lambda: llama_answer(llm, prompt, n, None),
        "llama-cpp-python json": lambda: llama_answer(llm, prompt, n, theirs["json"]),
        "llama-cpp-python schema": lambda: llama_answer(llm, prompt, n, theirs["schema"]),
    }
    run["edgeinfer free"]()  # warm-up: page the weights in
    samples: dict[str, list[tuple[float, int, str]]] = {k: [] for k in VARIANTS}
    for rep in range(reps):
        for k in VARIANTS[rep % len(VARIANTS):] + VARIANTS[: rep % len(VARIANTS)]:
            samples[k].append(run[k]())
    ours.close()
    llm.close()
    row: dict = {"model": name, "prompt_tokens": len(prompt), "max_tokens": n, "threads": threads, "reps": reps}
    for k, got in samples.items():
        kind = k.rsplit(" ", 1)[1]
        verdicts = [valid(text, kind) for _, _, text in got]
        row[k] = {"tok_s": round(statistics.median(s for s, _, _ in got), 2),
                  "tokens": round(statistics.median(c for _, c, _ in got)),
                  **({"valid": f"{sum(map(bool, verdicts))}/{len(verdicts)}"} if kind != "free" else {})}
    for side in ("edgeinfer", "llama-cpp-python"):
        free = row[f"{side} free"]["tok_s"]
        for kind in ("json", "schema"):
            row[f"{side} {kind}"]["vs_free"] = round(row[f"{side} {kind}"]["tok_s"] / free, 3) if free else None
    for kind in ("json", "schema"):
        theirs_tok_s = row[f"llama-cpp-python {kind}"]["tok_s"]
        row[f"edgeinfer {kind}"]["vs_llama_cpp_python"] = round(row[f"edgeinfer {kind}"]["tok_s"] / theirs_tok_s, 3) \
            if theirs_tok_s else None
    row["sample_answers"] = {k: got[0][2][:160] for k, got in samples.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="catalog name or .gguf path (repeatable)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=512, help="most tokens an answer may have")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    lib = Library.open()
    print(json.dumps({"cpu": _cpu(), "python": platform.python_version()}))
    for ref in args.model or ["qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct"]:
        path = Path(ref) if ref.endswith(".gguf") else locate(lib, ref, pull_missing=True)
        print(json.dumps(bench_model(ref, path, args.reps, args.tokens, args.threads), indent=2), flush=True)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
