"""Benchmark speculative decoding on real models (not a test): is it a win on this machine?

For each target (the 1.5B Q4_K_M, and the same model requantized to Q8_0) and each
drafter (the 0.5B model as `run --draft` uses it, with copies out of the context where
they promise more; the 0.5B model alone; prompt lookup alone), greedy, interleaved repetitions over
coding and code-edit prompts: plain tok/s, speculative tok/s, speedup, acceptance,
tokens per target pass, memory; llama-cpp-python's own `draft_model` hook
(LlamaPromptLookupDecoding, and a LlamaDraftModel wrapping the 0.5B) as the
naive baselines; with --llama-cpp DIR, llama.cpp's own llama-speculative-simple and
llama-lookup as peers in the same run; the measured cost of a target pass of n tokens; and the ceiling,
the best speedup a fixed draft length could give with those costs and the
acceptance observed.

    .venv/bin/python scripts/bench_speculative.py                      # the full run (~30 min on 2 cores)
    .venv/bin/python scripts/bench_speculative.py --prompts 2 --edits 1 --max-tokens 48 --no-hooks   # a quick look

Models are references as everywhere in edgeinfer (catalog names by default, pulled
when missing); the Q8_0 target is made with edgeinfer's own quantizer, once, into
the store. Each drafter first runs one untimed request, as a user's first `run --draft`
on a machine does (it measures the pass costs and the acceptance, kept in the cost
book); the timed requests then start from that memory, and a pair the plan finds
hopeless runs as `run` would run it then: plain.
Each speculative request is paired with the plain request of the same prompt and repetition, run
beside it: per prompt, the figure is the median of those paired speedups with a 90% bootstrap interval.
Where a method came out slower than plain on a prompt, a second look runs more pairs (--confirm) of
exactly those, so that the worst prompt is judged on enough runs to tell a loss from a busy minute;
overall figures use the main repetitions only, where every prompt counts equally.
The ceiling is computed per prompt from that prompt's acceptance; the pooled one
(one acceptance over all prompts) is in the JSON too. Speed is generation tok/s (after the first token: the draft model reads
the prompt during prompt processing, as llama.cpp's speculative example counts it);
the end-to-end column compares whole requests, prompt processing included.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeinfer import machine  # noqa: E402
from edgeinfer.library import Library, locate  # noqa: E402
from edgeinfer.speculative.drafters import ModelDrafter, NgramDrafter  # noqa: E402
from edgeinfer.engine import LoadOptions, generate, load  # noqa: E402
from edgeinfer.sampling import SamplingParams  # noqa: E402
from edgeinfer.speculative.costs import CostBook, expected_round  # noqa: E402
from edgeinfer.speculative import (DraftOptions, check_pair, cost_model,  # noqa: E402
                                   modelless_factory, plan_speculation, stepper_factory)
from edgeinfer.speculative.plan import SPECULATION_CACHES  # noqa: E402
from edgeinfer.template import chat_tokens  # noqa: E402

GREEDY = SamplingParams(temperature=0)
FLOOR = 0.97  # the "never slower": every drafter on every prompt at least this fraction of plain

CODING = [
    "Write a Python function that merges two sorted lists into one sorted list, with a docstring and type hints.",
    "Write a Python class LRUCache with get and put methods, both O(1), using OrderedDict.",
    "Write a Python function that parses a CSV file of (name, age) rows and returns the average age per name.",
    "Implement binary search in Python, iteratively, returning the index or -1.",
    "Write a JavaScript function that debounces another function by a given number of milliseconds.",
    "Write a Python function that returns all prime numbers below n with the sieve of Eratosthenes.",
    "Write a SQL query that returns the five customers with the highest total order value, and explain it briefly.",
    "Write a Python async function that downloads a list of URLs concurrently with aiohttp, at most 5 at a time.",
]

_FUNCTION_A = '''def summarize_orders(orders, min_total=0.0):
    totals = {}
    counts = {}
    for order in orders:
        customer = order["customer"]
        amount = float(order["amount"])
        if amount < 0:
            raise ValueError(f"negative amount in order {order['id']}")
        totals[customer] = totals.get(customer, 0.0) + amount
        counts[customer] = counts.get(customer, 0) + 1
    result = []
    for customer, total in totals.items():
        if total < min_total:
            continue
        average = total / counts[customer]
        result.append({
            "customer": customer,
            "total": round(total, 2),
            "orders": counts[customer],
            "average": round(average, 2),
        })
    result.sort(key=lambda row: row["total"], reverse=True)
    return result
'''

_FUNCTION_B = '''def load_config(path, defaults=None):
    import json
    import os
    settings = dict(defaults or {})
    if not os.path.exists(path):
        return settings
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    for key, value in data.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            merged = dict(settings[key])
            merged.update(value)
            settings[key] = merged
        else:
            settings[key] = value
    port = settings.get("port", 8080)
    if not 0 < int(port) < 65536:
        raise ValueError(f"bad port: {port}")
    settings["port"] = int(port)
    return settings
'''

EDITS = [
    f"Rename the variable `totals` to `sums_by_customer` in this function. Return the whole function, nothing else.\n\n```python\n{_FUNCTION_A}```",
    f"Add a docstring to this function. Return the whole function, nothing else.\n\n```python\n{_FUNCTION_B}```",
    f"Rename the parameter `orders` to `order_rows` in this function. Return the whole function, nothing else.\n\n```python\n{_FUNCTION_A}```",
    f"Rename the variable `settings` to `config` in this function. Return the whole function, nothing else.\n\n```python\n{_FUNCTION_B}```",
]


def peak_rss_mib(target: Path, draft: str | None, threads: int, cache_type: str = "f16") -> int:
    """Peak memory of a real `edgeinfer run` (its own process), plain or with a draft; the figure the
    kernel keeps for the child, so call it while this process is still small."""
    command = [sys.executable, "-m", "edgeinfer", "run", "-m", str(target), "--temperature", "0",
               "-n", "32", "-t", str(threads), "--cache-type", cache_type, *(["--draft", draft] if draft else []),
               EDITS[0]]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed")
    return usage.ru_maxrss >> 10  # kilobytes on Linux


def pass_costs(model, upto: int = 9, reps: int = 3) -> dict[int, float]:
    """Seconds for one pass of n tokens (logits at all n) after a 200-token context, min over reps."""
    context = model.tokenize(_FUNCTION_A * 2, add_special=False)[:200]
    model.prefill(context)
    base = len(model.cached)
    best: dict[int, float] = {}
    for _ in range(reps):
        for n in range(1, upto + 1):
            start = time.perf_counter()
            model.decode(context[:n], all_logits=True)
            best[n] = min(best.get(n, 1e9), time.perf_counter() - start)
            model.truncate(base)
    return best


def ceiling(costs: dict[int, float], step: float, reject: float, doubt: float, max_k: int,
            sync: float | None = None) -> tuple[float, int]:
    """The best speedup over plain decoding any fixed draft length k could give with these pass costs,
    this draft step and the rejection and doubt rates observed (the same round model the stepper uses)."""
    if max_k < 1:  # no pass of 2 tokens scores exactly: nothing may be verified
        return 1.0, 0
    def speedup(k: int) -> float:
        tokens, seconds = expected_round(k, reject, doubt, step, costs.__getitem__, sync)
        return tokens * costs[1] / seconds

    best = max(range(1, max_k + 1), key=speedup)
    return max(1.0, speedup(best)), best


def requantized_q8(lib: Library, source: Path) -> Path:
    """The target requantized to Q8_0 by `edgeinfer quantize --type Q8_0`, made once and kept in the store."""
    from edgeinfer.quantize import quantize

    label = f"quantize:{source.resolve()}"
    for entry in lib.store.entries().values():
        if entry.source == label and entry.quantization == "Q8_0" and entry.path.is_file():
            return entry.path
    return quantize(source, qtype="Q8_0", evaluate=False, store=lib.store).path


# --- llama-cpp-python's own hook, the naive baselines ----------------------------------


def hook_drafters(draft_path: Path, threads: int, n_ctx: int, num_pred: int):
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaDraftModel, LlamaPromptLookupDecoding

    class SmallModelDraft(LlamaDraftModel):
        """Greedy drafts of num_pred tokens from a small Llama, reusing its cached prefix."""

        def __init__(self) -> None:
            self.llm = Llama(str(draft_path), n_ctx=n_ctx, n_threads=threads, n_batch=512, verbose=False)

        def __call__(self, input_ids, /, **kwargs):
            llm, ids = self.llm, [int(t) for t in input_ids]
            cached = llm.input_ids[: llm.n_tokens].tolist()
            keep = 0
            while keep < min(len(cached), len(ids) - 1) and cached[keep] == ids[keep]:
                keep += 1
            llm.n_tokens = keep
            llm._ctx.kv_cache_seq_rm(-1, keep, -1)
            llm.eval(ids[keep:])
            out = []
            for _ in range(num_pred):
                # Without logits_all, Llama.eval keeps no scores: read llama.cpp's last row directly.
                token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm._n_vocab,))))
                out.append(token)
                llm.eval([token])
            return np.array(out, dtype=np.intc)

    return {"hook-ngram": lambda: LlamaPromptLookupDecoding(num_pred_tokens=num_pred),
            "hook-draft": SmallModelDraft}


def run_hook(llm, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    llm.reset()
    start, first, n = time.perf_counter(), None, 0
    for _chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
        n += 1
        if first is None:
            first = time.perf_counter()
    seconds = time.perf_counter() - (first or start)
    return ((n - 1) / seconds if n > 1 and seconds > 0 else 0.0), n


# --- llama.cpp's own examples, the peers in C++ ---------------------------------------------

PEERS = {"llama.cpp-draft": "llama-speculative-simple", "llama.cpp-lookup": "llama-lookup"}


def llama_cpp_peers(folder: Path | None) -> dict[str, Path]:
    """llama.cpp's speculative example (the draft model) and its prompt-lookup example, from the folder the
    user built them into. Build them from the llama.cpp that llama-cpp-python vendors (its sdist carries it)
    so that both sides run the same kernels; without a folder, no peers."""
    if folder is None:
        return {}
    found = {method: folder / binary for method, binary in PEERS.items()}
    missing = [str(path) for path in found.values() if not path.is_file()]
    if missing:
        raise SystemExit(f"--llama-cpp: not built: {', '.join(missing)}")
    return found


def run_peer(binary: Path, target: Path, draft: Path, prompt: str, args, plain: bool = False) -> tuple[float, str, float]:
    """One greedy request through a llama.cpp example on its own defaults (draft length, p-min), as a user of
    llama.cpp runs it: its decode speed (tokens over the time after the prompt), its stdout (the prompt,
    then the answer) and the share of drafted tokens it accepted. With `plain`, drafting off
    (--spec-draft-n-max 0): the example's own plain decoding, which its speculative answers must equal."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as handle:
        handle.write(prompt)
        handle.flush()
        command = [str(binary), "-m", str(target), "-f", handle.name, "-n", str(args.max_tokens),
                   "-t", str(args.threads), "-c", str(args.ctx), "--temp", "0", "-ctk", args.cache_type,
                   "-ctv", args.cache_type]
        if binary.name == PEERS["llama.cpp-draft"]:
            command += ["--spec-type", "draft-simple", "-md", str(draft), "-td", str(args.threads)]
        if plain:
            command += ["--spec-draft-n-max", "0"]
        done = subprocess.run(command, capture_output=True, text=True, errors="replace")
    speed = re.search(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s", done.stderr)
    if done.returncode != 0 or speed is None:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    accept = re.search(r"accept\s+=\s+([\d.]+)%", done.stderr)
    return float(speed.group(1)), done.stdout, float(accept.group(1)) / 100 if accept else 0.0


def same_answer(one: str, other: str) -> bool:
    """Do two printed answers agree as far as the shorter goes? (An example may print a token or a
    drafted block past -n.)"""
    one, other = one.rstrip(), other.rstrip()
    return one.startswith(other) or other.startswith(one)


# --- the benchmark -------------------------------------------------------------------------


def load_options(args) -> LoadOptions:
    """Target and draft load alike: one context size, thread count and KV cache type for the whole run."""
    return LoadOptions(n_ctx=args.ctx, n_threads=args.threads, cache_type=args.cache_type)


def bench_target(name: str, path: Path, draft, prompts, peak_rss: tuple[int, int], args) -> dict:
    options = load_options(args)
    spec = DraftOptions(ref="bench", draft_max=args.draft_max, p_min=args.p_min)
    book = CostBook(None)  # this run's memory of costs, as a user's home keeps it between runs
    rows: dict[str, list[dict]] = {}
    with load(path, options) as target:
        tokens = [chat_tokens(target, [{"role": "user", "content": p}]) for _, p in prompts]
        generate(target, tokens[0], GREEDY, max_tokens=8)  # warm the page cache and llama.cpp's buffers
        costs = pass_costs(target)
        # What exactness means: the target's own greedy answer, decoded one token at a time.
        reference = {}
        for i, prompt in enumerate(tokens):
            target.truncate(0)  # as every timed request starts: the prompt read in one go, not after a cached prefix
            reference[i] = generate(target, prompt, GREEDY, max_tokens=args.max_tokens).tokens
        # "draft" is the draft model as `run --draft` uses it (with copies out of the context where they
        # promise more), "draft-alone" as `run --draft --no-draft-lookup`, "ngram" prompt lookup alone.
        every = {"draft": lambda: ModelDrafter(draft, target.n_vocab, target.info.file_size),
                 "draft-alone": lambda: ModelDrafter(draft, target.n_vocab, target.info.file_size, lookup=False),
                 "ngram": NgramDrafter}
        drafters = {m: every[m]() for m in args.methods}
        factories = {m: stepper_factory(every[m] if m == "ngram" else (lambda d=drafters[m]: d), spec,
                                        args.max_tokens, book) for m in args.methods}
        # A user's first `run --draft` on this machine, untimed: it measures the pass costs and learns; then,
        # as for every later run, the plan decides whether the pair is worth loading at all.
        plans = {}
        for method, factory in factories.items():
            target.truncate(0)
            draft.truncate(0)
            generate(target, tokens[-1], GREEDY, max_tokens=args.max_tokens, stepper_factory=factory)
            asked = replace(spec, lookup=method != "draft-alone")
            plan = plans[method] = plan_speculation(path, None if method == "ngram" else args.draft, asked, options, book)
            # Speculation off, or the draft model set aside for prompt lookup: what `run` would then run.
            factories[method] = modelless_factory(plan, args.max_tokens) or factories[method]
            if plan.skipped or plan.note:
                print(f"  {name} {method}: {plan.skipped or plan.note}", flush=True)

        peers = llama_cpp_peers(args.llama_cpp)
        texts = ["".join(target.token_text(t) for t in prompt) for prompt in tokens]

        # llama.cpp's examples read the prompt but its last token in one batch and that token with the first
        # verification, where `run` reads the whole prompt at once: their plain answer may then differ from
        # ours at a near-tie with no speculation at all. Each is judged against its own plain decoding.
        peer_reference = {i: run_peer(peers["llama.cpp-lookup"], path, args.draft, text, args, plain=True)[1]
                          for i, text in enumerate(texts)} if peers else {}
        peer_plain_is_ours = {i: target.detokenize(reference[i]).strip() in out for i, out in peer_reference.items()}

        def timed_peer(method: str, i: int, rep: int) -> dict:
            """One request through llama.cpp's own example; exact when its answer is llama.cpp's plain one."""
            tok_s, stdout, accepted = run_peer(peers[method], path, args.draft, texts[i], args)
            exact = same_answer(stdout, peer_reference[i])
            print(f"  {name} prompt {i} ({prompts[i][0]}) rep {rep} {method} {tok_s:6.2f} tok/s  acc {accepted:.2f}"
                  f"{'' if exact else '  NOT EXACT'}", flush=True)
            return {"prompt": i, "kind": prompts[i][0], "rep": rep, "tok_s": tok_s, "exact": exact,
                    "acceptance_rate": accepted}

        def timed(method: str, i: int, rep: int) -> dict:
            """One request, timed; a method's row carries the plain run it is paired with (filled in later)."""
            if method in peers:
                return timed_peer(method, i, rep)
            skipped = method != "plain" and plans[method].skipped is not None
            target.truncate(0)  # every request reads its prompt afresh: no method inherits another's cache
            draft.truncate(0)
            result = generate(target, tokens[i], GREEDY, max_tokens=args.max_tokens,
                              stepper_factory=factories.get(method))
            row = {"prompt": i, "kind": prompts[i][0], "rep": rep, "tok_s": result.generation_tokens_per_second,
                   "total_s": result.total_seconds, "ttft_s": result.time_to_first_token, "tokens": result.completion_tokens,
                   "exact": result.tokens == reference[i], **result.stats}
            print(f"  {name} prompt {i} ({row['kind']}) rep {rep} {method:5s} {row['tok_s']:6.2f} tok/s"
                  + (f"  acc {row['acceptance_rate']:.2f} tpp {row['tokens_per_pass']:.2f} k {row['mean_draft_length']}"
                     f"{'' if row['exact'] else '  NOT EXACT'}" if method != "plain" and not skipped else ""), flush=True)
            return row

        for rep in range(args.reps):
            for i in range(len(prompts)):
                # Odd repetitions run the methods in reverse order, so that a machine slowly getting busier or
                # quieter favours none of them in the medians (ABBA).
                order = ("plain", *args.methods, *peers)
                done = {m: timed(m, i, rep) for m in (order if rep % 2 == 0 else order[::-1])}
                for method, row in done.items():
                    if method != "plain":
                        row["plain"] = done["plain"]  # the plain run beside it
                    rows.setdefault(method, []).append(row)
        # A second look where a method seemed slower than plain on a prompt: more pairs (plain and that
        # method back to back, ABBA) for exactly those, so that the worst prompt is not just the unluckiest.
        suspects = [(m, i) for m in args.methods for i in range(len(prompts))
                    if statistics.median(paired([r for r in rows[m] if r["prompt"] == i])) < 1.0]
        for extra in range(args.confirm):
            rep = args.reps + extra
            for method, i in suspects:
                # ABBA goes on where the repetitions left off: after one repetition (plain first), the method first.
                order = ("plain", method) if rep % 2 == 0 else (method, "plain")
                done = {m: timed(m, i, rep) for m in order}
                done[method]["plain"] = done["plain"]
                rows[method].append(done[method])
                rows["plain"].append(done["plain"])
        learned = {m: cost_model(target, d, book) for m, d in drafters.items()}
        priors = {m: (c.rejection_prior(), c.doubt_prior()) for m, c in learned.items()}
        ratios = {m: c.ratios(args.draft_max + 1) for m, c in learned.items()}
        model_costs = cost_model(target, ModelDrafter(draft, target.n_vocab, target.info.file_size), book)
        # The largest pass the steppers verified: each method's first request measured it on this target.
        limit = min(c.verify_cap(args.draft_max) for c in learned.values()) + 1
        draft_costs = model_costs.draft_step(0.0), model_costs.draft_sync(0.0)  # a step, a round's first
    gc.collect()
    hooks = bench_hooks(path, prompts, tokens, args) if args.hooks else {}
    return summarize(name, path, rows, hooks, costs, limit, draft_costs, ratios, priors, plans, *peak_rss, args,
                     peers=list(peers), peer_plain_is_ours=peer_plain_is_ours)


def bench_hooks(path: Path, prompts, tokens, args) -> dict[str, list[dict]]:
    from llama_cpp import Llama

    rows: dict[str, list[dict]] = {}
    makers = hook_drafters(args.draft, args.threads, args.ctx, args.hook_pred)
    count = min(len(prompts), args.hook_prompts)
    for method, make in makers.items():
        llm = Llama(str(path), n_ctx=args.ctx, n_threads=args.threads, n_batch=512, draft_model=make(), verbose=False)
        for rep in range(args.reps):
            for i in range(count):
                tok_s, n = run_hook(llm, tokens[i], args.max_tokens)
                rows.setdefault(method, []).append({"prompt": i, "kind": prompts[i][0], "rep": rep, "tok_s": tok_s})
                print(f"  {path.name} prompt {i} rep {rep} {method} {tok_s:6.2f} tok/s", flush=True)
        del llm
        gc.collect()
    return rows


def summarize(name, path, rows, hooks, costs, limit, draft_costs, learned, priors, plans, rss_plain, rss_spec,
              args, peers: list[str], peer_plain_is_ours: dict[int, bool]) -> dict:
    main = {m: [r for r in rs if r["rep"] < args.reps] for m, rs in rows.items()}  # every prompt equally often
    plain = {(r["prompt"], r["rep"]): r["tok_s"] for r in main["plain"]}
    # The noise floor: how far apart two plain runs of the same prompt came out (1.0: identical).
    spreads = [min(vs) / max(vs) for p in {p for p, _ in plain} if len(vs := [v for (q, _), v in plain.items() if q == p]) > 1]
    out = {"target": name, "path": str(path), "plain_tok_s": statistics.median(plain.values()),
           "pass_cost_ratios": {n: round(c / costs[1], 2) for n, c in costs.items()},
           "pass_cost_ms": {n: round(c * 1000, 1) for n, c in costs.items()}, "exact_pass_limit": limit,
           "draft_step_ms": round(draft_costs[0] * 1000, 1),
           "draft_sync_ms": round(draft_costs[1] * 1000, 1),
           "plain_worst_rep_ratio": round(min(spreads), 3) if spreads else None,
           "learned_ratios": learned, "peak_rss_plain_mib": rss_plain, "peak_rss_speculative_mib": rss_spec,
           "methods": {}}
    for method in args.methods:
        rs, every = main[method], rows[method]
        speedups = paired(rs)
        # Per prompt, every pair it got (the second look's too): the median speedup and its 90% interval.
        by_prompt = {p: paired([r for r in every if r["prompt"] == p]) for p in sorted({r["prompt"] for r in every})}
        per_prompt = {p: statistics.median(v) for p, v in by_prompt.items()}
        intervals = {p: median_interval(v) for p, v in by_prompt.items()}
        worst = min(per_prompt, key=per_prompt.get)
        drafted, accepted = sum(r.get("drafted", 0) for r in rs), sum(r.get("accepted", 0) for r in rs)
        reject, doubt = _rates(rs, priors[method])
        draft_step, sync = (0.0, 0.0) if method == "ngram" else draft_costs
        max_k = min(args.draft_max, limit - 1)
        ceil, best_k = ceiling(costs, draft_step, reject, doubt, max_k, sync)
        # The ceiling of each prompt from its own acceptance: prompts differ (a code edit is nearly all
        # copying, a new function barely any), and E(k) is not linear in the acceptance, so a ceiling
        # from the pooled acceptance would promise edits' gains on every prompt.
        ceilings = {p: ceiling(costs, draft_step, *_rates([r for r in rs if r["prompt"] == p], (reject, doubt)),
                               max_k, sync)[0] for p in per_prompt}
        edits = paired([r for r in rs if r["kind"] == "edit"])
        out["methods"][method] = {
            "tok_s": round(statistics.median(r["tok_s"] for r in rs), 2),
            "speedup": round(statistics.median(speedups), 3),
            "speedup_geomean": round(float(np.exp(np.mean(np.log(speedups)))), 3),
            "speedup_code_edit": round(statistics.median(edits), 3) if edits else None,
            "speedup_end_to_end": round(statistics.median(r["plain"]["total_s"] / r["total_s"] for r in rs), 3),
            "first_token_vs_plain": round(statistics.median(r["ttft_s"] / r["plain"]["ttft_s"] for r in rs), 3),
            "worst_prompt": worst,
            "worst_prompt_speedup": round(per_prompt[worst], 3),
            "worst_prompt_interval": [round(x, 3) for x in intervals[worst]],
            "worst_prompt_pairs": len(by_prompt[worst]),
            # Prompts on which the method is slower than the floor beyond the noise: the whole interval below.
            "below_floor": [p for p in per_prompt if intervals[p][1] < FLOOR],
            "second_look_pairs": len(every) - len(rs),
            "per_prompt_speedup": {p: round(v, 3) for p, v in per_prompt.items()},
            "per_prompt_interval": {p: [round(x, 3) for x in v] for p, v in intervals.items()},
            "per_prompt_pairs": {p: len(v) for p, v in by_prompt.items()},
            "copied_share": round(sum(r.get("copied", 0) for r in rs) / accepted, 3) if accepted else 0.0,
            "acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0,
            "per_token_acceptance": round(1 - reject, 3),
            "doubt_rate": round(doubt, 3),
            "tokens_per_pass": round(statistics.mean(r.get("tokens_per_pass", 1.0) for r in rs), 3),
            "mean_draft_length": round(statistics.mean(r.get("mean_draft_length", 0.0) for r in rs), 2),
            "ceiling_pooled": round(ceil, 3), "ceiling_k": best_k,
            "of_ceiling_pooled": round(statistics.median(speedups) / ceil, 3),
            "ceiling": round(statistics.median(ceilings.values()), 3),
            "of_ceiling": round(statistics.median(per_prompt[p] / ceilings[p] for p in per_prompt), 3),
            "worst_of_ceiling": round(min(per_prompt[p] / ceilings[p] for p in per_prompt), 3),
            "exact": all(r["exact"] for r in every),
            "exact_runs": f"{sum(r['exact'] for r in every)}/{len(every)}",
            "skipped": plans[method].skipped,
            "lookup_only": plans[method].note,
        }
    if peers:  # on how many prompts llama.cpp's examples, drafting off, gave `run`'s own answer
        out["llama_cpp_plain_is_ours"] = f"{sum(peer_plain_is_ours.values())}/{len(peer_plain_is_ours)}"
    for method in peers:  # llama.cpp's own examples, interleaved with the rest as every method is
        rs = main[method]
        per_prompt = {p: statistics.median(paired([r for r in rs if r["prompt"] == p])) for p in {r["prompt"] for r in rs}}
        worst = min(per_prompt, key=per_prompt.get)
        edits = paired([r for r in rs if r["kind"] == "edit"])
        out["methods"][method] = {"tok_s": round(statistics.median(r["tok_s"] for r in rs), 2),
                                  "speedup": round(statistics.median(paired(rs)), 3),
                                  "speedup_code_edit": round(statistics.median(edits), 3) if edits else None,
                                  "worst_prompt": worst, "worst_prompt_speedup": round(per_prompt[worst], 3),
                                  "per_prompt_speedup": {p: round(v, 3) for p, v in sorted(per_prompt.items())},
                                  "acceptance_rate": round(statistics.median(r["acceptance_rate"] for r in rs), 3),
                                  "exact_runs": f"{sum(r['exact'] for r in rs)}/{len(rs)}"}
    for method, rs in hooks.items():  # run after the rest: against the plain run of the same prompt and repetition
        speedups = [r["tok_s"] / plain[(r["prompt"], r["rep"])] for r in rs]
        out["methods"][method] = {"tok_s": round(statistics.median(r["tok_s"] for r in rs), 2),
                                  "speedup": round(statistics.median(speedups), 3),
                                  "speedup_code_edit": round(statistics.median(
                                      [s for r, s in zip(rs, speedups) if r["kind"] == "edit"] or [0]), 3)}
    return out


def paired(rows: list[dict]) -> list[float]:
    """Each run's speedup over the plain run beside it: the same prompt, a minute apart at most, so that
    a machine busy for a while slows both (medians of each side apart let it slow one)."""
    return [r["tok_s"] / r["plain"]["tok_s"] for r in rows if r["plain"]["tok_s"]]


def median_interval(values: list[float], level: float = 0.9, draws: int = 4000) -> tuple[float, float]:
    """A bootstrap interval for the median of these values, seeded so that the same runs give the same interval."""
    samples = np.random.default_rng(0).choice(values, size=(draws, len(values)))
    low, high = np.quantile(np.median(samples, axis=1), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _rates(rows: list[dict], fallback: tuple[float, float]) -> tuple[float, float]:
    """The chance a proposed token was rejected, and the chance the draft stopped unsure at a position it
    reached, in these runs; the fallback's where nothing was proposed."""
    drafted, rejections = sum(r.get("drafted", 0) for r in rows), sum(r.get("rejections", 0) for r in rows)
    accepted, doubts = sum(r.get("accepted", 0) for r in rows), sum(r.get("doubts", 0) for r in rows)
    reject = rejections / (accepted + rejections) if accepted + rejections else fallback[0]  # of the tokens judged
    doubt = doubts / (drafted + doubts) if drafted + doubts else fallback[1]
    return reject, doubt


def print_report(report: dict) -> None:
    print(f"\nCPU: {report['cpu']}  flags: {' '.join(report['flags'])}  threads: {report['threads']}; "
          f"peak RSS of `edgeinfer run` on the draft alone {report['peak_rss_draft_alone_mib']} MiB")
    for t in report["targets"]:
        ratios = "  ".join(f"{n}:{r:.2f}" for n, r in t["pass_cost_ratios"].items())
        print(f"\n{t['target']}: plain {t['plain_tok_s']:.2f} tok/s; v(1) {t['pass_cost_ms'][1]} ms; "
              f"v(n)/v(1) {ratios}; passes of up to {t['exact_pass_limit']} tokens score exactly as one-token steps; "
              f"draft step {t['draft_step_ms']} ms (re-sync {t['draft_sync_ms']} ms); peak RSS of `edgeinfer run`: plain {t['peak_rss_plain_mib']} MiB, "
              f"with draft {t['peak_rss_speculative_mib']} MiB")
        if "llama_cpp_plain_is_ours" in t:
            print(f"  llama.cpp's examples with drafting off gave `run`'s own answer on {t['llama_cpp_plain_is_ours']} "
                  "prompts; their exactness below is against that plain answer of theirs")
        if t["plain_worst_rep_ratio"]:
            print(f"  noise: two plain runs of one prompt differed by up to {1 - t['plain_worst_rep_ratio']:.0%}")
        print(f"  {'method':11s} {'tok/s':>7s} {'speedup':>8s} {'edits':>6s} {'worst':>6s} {'accept':>7s} "
              f"{'tok/pass':>8s} {'k':>5s} {'ceiling':>8s} {'of ceil':>8s} {'e2e':>6s} {'TTFT':>6s} exact")
        for name, m in t["methods"].items():
            if "ceiling" in m:
                print(f"  {name:11s} {m['tok_s']:7.2f} {m['speedup']:7.2f}x {m['speedup_code_edit'] or 0:5.2f}x "
                      f"{m['worst_prompt_speedup']:5.2f}x {m['acceptance_rate']:7.2f} {m['tokens_per_pass']:8.2f} "
                      f"{m['mean_draft_length']:5.1f} {m['ceiling']:7.2f}x {m['of_ceiling']:7.0%} "
                      f"{m['speedup_end_to_end']:5.2f}x {m['first_token_vs_plain']:5.2f}x  {m['exact_runs']}"
                      + ("  (speculation off: cannot win here)" if m["skipped"] else "")
                      + ("  (the draft model cannot win here: prompt lookup only)" if m["lookup_only"] else ""))
            elif "exact_runs" in m:  # llama.cpp's own examples
                print(f"  {name:11s} {m['tok_s']:7.2f} {m['speedup']:7.2f}x {m['speedup_code_edit'] or 0:5.2f}x "
                      f"{m['worst_prompt_speedup']:5.2f}x {m['acceptance_rate']:7.2f} {'':60s} {m['exact_runs']}")
            else:
                print(f"  {name:11s} {m['tok_s']:7.2f} {m['speedup']:7.2f}x {m['speedup_code_edit']:5.2f}x")
        for name, m in t["methods"].items():
            if "worst_prompt_interval" in m:
                low, high = m["worst_prompt_interval"]
                print(f"  {name}: worst prompt {m['worst_prompt']} at {m['worst_prompt_speedup']:.3f}x "
                      f"(90% interval {low:.3f}-{high:.3f}, {m['worst_prompt_pairs']} pairs; "
                      f"{m['second_look_pairs']} second-look pairs in all); below {FLOOR}x beyond the noise: "
                      f"{', '.join(map(str, m['below_floor'])) or 'no prompt'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct", help="model reference (Q4_K_M target)")
    parser.add_argument("--target-q8", default=None, help="default: TARGET requantized to Q8_0 by edgeinfer quantize")
    parser.add_argument("--draft", default=None, help="default: the catalog's draft for TARGET")
    parser.add_argument("--prompts", type=int, default=8, help="coding prompts (at most 8)")
    parser.add_argument("--edits", type=int, default=4, help="code-edit prompts (at most 4)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--confirm", type=int, default=4,
                        help="extra plain/method pairs for each prompt on which a method came out slower than plain")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--cache-type", default="auto", choices=["auto", *machine.KV_CACHE_TYPES],
                        help="the KV cache's type, as `run --cache-type` (auto: what a first `run --draft` takes here)")
    parser.add_argument("--draft-max", type=int, default=8)
    parser.add_argument("--p-min", type=float, default=0.75)
    parser.add_argument("--targets", default="q4,q8", help="which targets: q4, q8 or both")
    parser.add_argument("--methods", default="draft,draft-alone,ngram",
                        help="draft (the draft model with copies out of the context, as `run --draft`), draft-alone "
                             "(--no-draft-lookup), ngram (prompt lookup)")
    parser.add_argument("--no-hooks", dest="hooks", action="store_false", help="skip llama-cpp-python's draft_model hook")
    parser.add_argument("--hook-prompts", type=int, default=4, help="prompts run through the hooks (they are slow)")
    parser.add_argument("--hook-pred", type=int, default=4, help="tokens the hooks draft per round")
    parser.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                        help="a folder holding llama.cpp's llama-speculative-simple and llama-lookup, built from the "
                             "llama.cpp that llama-cpp-python vendors: run them as peers, interleaved with the rest")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    if args.cache_type == "auto":  # what a first `run --draft` takes (plan.choose_cache): both sides run on it
        args.cache_type = SPECULATION_CACHES[0]

    codes, edits = [("code", p) for p in CODING[: args.prompts]], [("edit", p) for p in EDITS[: args.edits]]
    prompts = [p for i in range(max(len(codes), len(edits))) for p in (codes[i:i + 1] + edits[i:i + 1])]
    lib = Library.open()
    spec = lib.catalog.models.get(args.target)
    draft_ref = args.draft or (spec.draft if spec and spec.draft else "qwen2.5-coder-0.5b-instruct")
    target_path, args.draft = locate(lib, args.target), locate(lib, draft_ref)
    keys = args.targets.split(",")
    q8 = (locate(lib, args.target_q8) if args.target_q8 else requantized_q8(lib, target_path)) if "q8" in keys else None
    targets = {"q4": (args.target, target_path), "q8": (q8.name if q8 else "", q8)}
    started = time.perf_counter()
    check_pair(target_path, args.draft)
    # Before this process holds any model: Linux carries a parent's peak RSS into a child it forks.
    report = {"cpu": machine.cpu_name(), "flags": machine.cpu_flags(), "threads": args.threads,
              "prompts": len(prompts), "reps": args.reps, "max_tokens": args.max_tokens, "cache_type": args.cache_type,
              "targets": []}
    peak_rss = {key: (peak_rss_mib(p, None, args.threads, args.cache_type),
                     peak_rss_mib(p, str(args.draft), args.threads, args.cache_type))
                     for key, (_, p) in targets.items() if key in keys}
    report["peak_rss_draft_alone_mib"] = peak_rss_mib(args.draft, None, args.threads, args.cache_type)
    with load(args.draft, load_options(args)) as draft:
        draft_costs = pass_costs(draft)
        report["draft"] = {"path": str(args.draft), "pass_cost_ms": {n: round(c * 1000, 1) for n, c in draft_costs.items()}}
        for key in keys:
            name, path = targets[key]
            print(f"{name}:", flush=True)
            report["targets"].append(bench_target(name, path, draft, prompts, peak_rss[key], args))
    report["seconds"] = round(time.perf_counter() - started, 1)
    print_report(report)
    print(f"\n{report['seconds']} s")
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
