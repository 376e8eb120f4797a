"""Parsing and validation of OpenAI and KServe generate requests, and the stop-string helpers of the scheduler."""

from __future__ import annotations

from typing import Any

import pytest

from kiri_runtime.generating import _cut_at_stop, _held_back
from kiri_runtime.generation_api import (
    ApiError,
    Job,
    error_body,
    parse_body,
    parse_chat,
    parse_completion,
    parse_generate,
    resolve_max_tokens,
)
from kiri_runtime.generative_model import SamplingParams

USER = [{"role": "user", "content": "hi"}]


def chat(**over: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": USER, **over}


def test_a_chat_request_becomes_a_job_with_its_sampling_options() -> None:
    job = parse_chat(
        chat(
            max_tokens=7,
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            seed=3,
            stop="\n",
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
            top_logprobs=2,
        )
    )
    assert job.messages == [{"role": "user", "content": "hi"}]
    assert job.max_tokens == 7 and job.stream and job.include_usage and job.logprobs == 2
    assert job.params(7) == SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, seed=3, stop=("\n",), logprobs=2
    )


def test_max_completion_tokens_wins_over_max_tokens_and_text_parts_are_joined() -> None:
    message = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    job = parse_chat(chat(messages=[message], max_tokens=9, max_completion_tokens=4))
    assert job.max_tokens == 4 and job.messages == [{"role": "user", "content": "ab"}]


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (chat(messages=[]), "messages", "non-empty"),
        (chat(messages=[{"role": "wizard", "content": "x"}]), "messages", "role"),
        (chat(messages=[{"role": "user", "content": 5}]), "messages", "string"),
        (chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages", "text parts"),
        ({"messages": USER}, "model", "model is required"),
        (chat(max_tokens=-1), "max_tokens", "at least 1"),
        (chat(max_tokens=0), "max_tokens", "at least 1"),
        (chat(max_tokens="9"), "max_tokens", "integer"),
        (chat(max_tokens=True), "max_tokens", "integer"),
        (chat(temperature=-0.1), "temperature", "between 0 and 2"),
        (chat(temperature=float("nan")), "temperature", "finite"),
        (chat(top_p=0), "top_p", "(0, 1]"),
        (chat(top_p=1.5), "top_p", "(0, 1]"),
        (chat(top_k=-2), "top_k", "at least 0"),
        (chat(stop=[""]), "stop", "non-empty"),
        (chat(stop=["x"] * 17), "stop", "at most 16"),
        (chat(n=2), "n", "between 1 and 1"),
        (chat(tools=[{"type": "function"}]), "tools", "not supported"),
        (chat(presence_penalty=0.5), "presence_penalty", "not supported"),
        (chat(stream_options={"include_usage": True}), "stream_options", "only allowed when stream"),
        (chat(top_logprobs=2), "top_logprobs", "needs logprobs"),
        (chat(logprobs=True, top_logprobs=21), "top_logprobs", "between 0 and 20"),
    ],
)
def test_a_bad_chat_field_is_refused_naming_the_parameter(
    body: dict[str, Any], param: str, needle: str
) -> None:
    with pytest.raises(ApiError) as err:
        parse_chat(body)
    assert err.value.status == 400
    assert err.value.param == param
    assert needle in err.value.message


def test_top_k_minus_one_means_no_cut_as_in_vllm() -> None:
    assert parse_chat(chat(top_k=-1)).sampling["top_k"] == 0


def test_a_completion_defaults_to_sixteen_tokens_and_takes_a_one_prompt_list() -> None:
    job = parse_completion({"model": "tiny", "prompt": ["def "], "logprobs": 3})
    assert (job.prompt, job.max_tokens, job.logprobs) == ("def ", 16, 3)


def test_a_completion_takes_token_ids_with_echo_and_up_to_twenty_logprobs_for_a_verify_call() -> None:
    body = {
        "model": "tiny",
        "prompt": [5, 7, 9],
        "echo": True,
        "logprobs": 20,
        "return_tokens_as_token_ids": True,
    }
    job = parse_completion(body)
    assert (job.prompt, job.prompt_ids, job.echo, job.logprobs, job.tokens_as_ids) == (
        "",
        [5, 7, 9],
        True,
        20,
        True,
    )
    assert parse_completion({"model": "tiny", "prompt": [[5, 7]]}).prompt_ids == [5, 7]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "tiny", "prompt": 5}, "prompt"),
        ({"model": "tiny", "prompt": "a", "echo": True, "stream": True}, "echo"),
        ({"model": "tiny", "prompt": "a", "echo": True, "logprobs": 21}, "logprobs"),
        ({"model": "tiny", "prompt": [1, True]}, "prompt"),
        ({"model": "tiny", "prompt": []}, "prompt"),
        ({"model": "tiny", "prompt": "a", "suffix": "b"}, "suffix"),
        ({"model": "tiny", "prompt": "a", "logprobs": 6}, "logprobs"),
        ({"model": "tiny", "prompt": "a", "best_of": 2}, "best_of"),
    ],
)
def test_a_bad_completion_field_is_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_completion(body)
    assert (err.value.status, err.value.param) == (400, param)


def test_a_kserve_generate_request_reads_text_input_and_parameters() -> None:
    job, details = parse_generate(
        "tiny", {"text_input": "x", "parameters": {"max_tokens": 3, "temperature": 0, "details": True}}
    )
    assert (job.prompt, job.max_tokens, job.sampling, details, job.logprobs) == (
        "x",
        3,
        {"temperature": 0.0},
        True,
        0,
    )


@pytest.mark.parametrize(
    ("raw", "code"),
    [(b"\xff\xfe{}", "invalid_utf8"), (b'{"model": ', "invalid_json"), (b"[1]", "invalid_json")],
)
def test_a_body_that_is_not_a_utf8_json_object_is_a_400(raw: bytes, code: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_body(raw)
    assert (err.value.status, err.value.code) == (400, code)


def test_the_context_check_refuses_before_any_work_and_fills_in_max_tokens() -> None:
    assert resolve_max_tokens(Job(model="m", prompt="p"), prompt_tokens=10, context_length=512) == 502
    assert resolve_max_tokens(Job(model="m", prompt="p", max_tokens=502), 10, 512) == 502
    with pytest.raises(ApiError, match="max_tokens asks for 503 more") as err:
        resolve_max_tokens(Job(model="m", prompt="p", max_tokens=503), 10, 512)
    assert (err.value.param, err.value.code) == ("max_tokens", "context_length_exceeded")
    with pytest.raises(ApiError, match="the prompt has 512") as err:
        resolve_max_tokens(Job(model="m", messages=[]), 512, 512)
    assert err.value.param == "messages"


def test_error_bodies_have_openai_fields() -> None:
    assert error_body(429, "full", None, "queue_full") == {
        "error": {"message": "full", "type": "rate_limit_error", "param": None, "code": "queue_full"}
    }
    assert error_body(500, "boom")["error"]["type"] == "server_error"


def test_text_is_cut_at_the_earliest_stop_string() -> None:
    assert _cut_at_stop("abc STOP def END", ("END", "STOP")) == ("abc ", True)
    assert _cut_at_stop("abc", ("x",)) == ("abc", False)


def test_a_tail_that_may_begin_a_stop_string_is_held_back() -> None:
    assert _held_back("hello wor", ("world",)) == 3
    assert _held_back("hello", ("world",)) == 0
    assert _held_back("ab", ("b", "abc")) == 2


def test_greedy_and_seeded_requests_batch_differently() -> None:
    assert SamplingParams(max_tokens=1, temperature=0.0, seed=5).cohort_key() == ("greedy",)
    assert SamplingParams(max_tokens=1, seed=5).cohort_key() is None
    assert SamplingParams(max_tokens=1, top_p=0.5).cohort_key() == ("sample", 1.0, 0.5, 0)
