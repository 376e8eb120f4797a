"""`kiri serve` on a language model (the tiny trained LLaMA as an onnxruntime-genai fp32 directory): the OpenAI API
through the official `openai` client, KServe's generate extension, bad input, queue limit, disconnects, metrics."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from runtime_helpers import ThreadedServer, metric_samples, sample, sha256_of

from kiri_runtime.serving import ServeConfig
from lm_fixture import GreedyChat, greedy_chat, raw_greedy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# Any question, where the test reads no more than a few tokens of the answer.
QUESTION = [{"role": "user", "content": "What does def dedent do?"}]


@pytest.fixture(scope="module")
def genai_dir() -> Path:
    from lm_fixture import tiny_genai

    return tiny_genai()


@pytest.fixture(scope="module")
def chat(genai_dir: Path) -> GreedyChat:
    """A question whose greedy answer ends with <|im_end|>, and that answer, by a raw loop: the weights are
    trained on the machine that runs the tests, so which question that is depends on it."""
    return greedy_chat(genai_dir)


def _start(genai_dir: Path | str, tmp: Path, wait: bool = True, **over: Any) -> ThreadedServer:
    uri = genai_dir if isinstance(genai_dir, str) else str(genai_dir)
    config = ServeConfig(
        model_uri=uri, name="tiny", host="127.0.0.1", port=0, cache_dir=tmp, threads=1, shutdown_grace_s=5.0
    )
    for key, value in over.items():
        setattr(config, key, value)
    server = ThreadedServer(config).start()
    if wait:
        server.wait_ready(60)
    return server


@pytest.fixture(scope="module")
def server(genai_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    s = _start(genai_dir, tmp_path_factory.mktemp("lm-cache"))
    yield s
    s.stop()


@pytest.fixture
def start(genai_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ThreadedServer]]:
    servers: list[ThreadedServer] = []

    def make(**over: Any) -> ThreadedServer:
        servers.append(_start(genai_dir, tmp_path / f"c{len(servers)}", **over))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def client(server: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def metric(server: ThreadedServer, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            got = head[len(name) :].strip("{}")
            if all(part in got.split(",") for part in want.split(",") if part):
                total += float(value)
    return total


def test_greedy_generate_equals_a_raw_onnxruntime_genai_greedy_loop_token_for_token(
    server: ThreadedServer, genai_dir: Path
) -> None:
    import onnxruntime_genai as og

    prompt = "def dedent(text):\n"
    ids = [int(t) for t in og.Tokenizer(og.Model(str(genai_dir))).encode(prompt)]
    reference = raw_greedy(genai_dir, ids, 40)
    body = {"text_input": prompt, "parameters": {"max_tokens": 40, "temperature": 0, "details": True}}
    answer = httpx.post(f"{server.url}/v2/models/tiny/generate", json=body).json()
    served = [t["id"] for t in answer["details"]["logprobs"]]
    assert served == reference[: len(served)]
    assert len(served) == 40 or served[-1] == 2  # all 40, or stopped at <|im_end|>
    assert answer["model_name"] == "tiny" and answer["model_version"] == "1"


def test_a_greedy_chat_answer_through_the_openai_client_is_the_raw_loops_text(
    server: ThreadedServer, chat: GreedyChat
) -> None:
    # `chat` is the raw loop's answer to the chat template rendered by onnxruntime-genai's tokenizer
    # (lm_fixture.greedy_chat); the server renders the template itself and must reach the same tokens.
    assert chat.answer_ids[-1] == 2  # ends with <|im_end|>
    answer = client(server).chat.completions.create(
        model="tiny", messages=chat.messages, temperature=0, max_tokens=30
    )
    assert answer.choices[0].message.content == chat.text
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        len(chat.prompt_ids),
        len(chat.answer_ids),
    )


def test_the_openai_client_streams_chat_chunks_that_join_to_the_answer_then_a_usage_chunk(
    server: ThreadedServer, chat: GreedyChat
) -> None:
    stream = client(server).chat.completions.create(
        model="tiny",
        messages=chat.messages,
        temperature=0,
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(chat.answer_ids)
    assert chunks[-1].usage.prompt_tokens == len(chat.prompt_ids)


def test_the_openai_client_streams_a_text_completion_with_logprobs(server: ThreadedServer) -> None:
    plain = client(server).completions.create(
        model="tiny", prompt="def ", max_tokens=12, temperature=0, logprobs=2
    )
    stream = client(server).completions.create(
        model="tiny", prompt="def ", max_tokens=12, temperature=0, logprobs=2, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert plain.choices[0].finish_reason == "length"
    logprobs = plain.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.top_logprobs is not None
    assert "".join(logprobs.tokens) == plain.choices[0].text
    assert len(logprobs.tokens) == 12 and all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.token_logprobs is not None and all(lp <= 0 for lp in logprobs.token_logprobs)


def test_chat_logprobs_give_the_chosen_token_as_the_most_likely_when_greedy(server: ThreadedServer) -> None:
    answer = client(server).chat.completions.create(
        model="tiny", messages=QUESTION, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob


def test_a_seed_reproduces_a_sampled_completion_even_under_concurrent_load(server: ThreadedServer) -> None:
    def sample(seed: int) -> str:
        r = client(server).completions.create(
            model="tiny", prompt="def ", max_tokens=24, temperature=1.0, seed=seed
        )
        return r.choices[0].text

    first = sample(7)
    noise = [threading.Thread(target=sample, args=(i,)) for i in range(3)]
    for t in noise:
        t.start()
    again = sample(7)
    for t in noise:
        t.join()
    assert again == first
    assert {sample(s) for s in (8, 9, 10)} != {first}


def test_a_stop_string_ends_the_answer_before_it(server: ThreadedServer, chat: GreedyChat) -> None:
    # Two stop strings cut from the answer itself (3 characters, at a third and at two thirds of it): the
    # answer ends right before the first place each occurs, mid-token or not.
    text = chat.text
    first, second = text[len(text) // 3 :][:3], text[2 * len(text) // 3 :][:3]
    assert first and second
    answer = client(server).chat.completions.create(
        model="tiny", messages=chat.messages, temperature=0, max_tokens=30, stop=[first]
    )
    assert answer.choices[0].message.content == text[: text.index(first)]
    assert answer.choices[0].finish_reason == "stop"
    streamed = client(server).chat.completions.create(
        model="tiny", messages=chat.messages, temperature=0, max_tokens=30, stop=[second], stream=True
    )
    joined = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert joined == text[: text.index(second)]


def test_a_stop_token_id_ends_the_answer_without_its_text(server: ThreadedServer) -> None:
    body = {"text_input": "def ", "parameters": {"max_tokens": 30, "temperature": 0, "details": True}}
    full = httpx.post(f"{server.url}/v2/models/tiny/generate", json=body).json()
    third = full["details"]["logprobs"][2]
    body["parameters"]["stop_token_ids"] = [third["id"]]
    cut = httpx.post(f"{server.url}/v2/models/tiny/generate", json=body).json()
    assert cut["text_output"] == "".join(t["text"] for t in full["details"]["logprobs"][:2])
    assert cut["details"]["finish_reason"] == "eos_token"


def test_concurrent_greedy_requests_batched_together_answer_as_they_do_alone(server: ThreadedServer) -> None:
    prompts = ["def ", "    return", "def ", "class Template"]  # two of two tokens: they share a batch

    def complete(prompt: str) -> str:
        r = client(server).completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
        return r.choices[0].text

    alone = [complete(p) for p in prompts]
    results: dict[int, str] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, complete(prompts[i]))) for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(4)] == alone


def test_kserve_generate_stream_sends_text_events_and_a_final_finish_reason(server: ThreadedServer) -> None:
    body = {"text_input": "def ", "parameters": {"max_tokens": 6, "temperature": 0}}
    plain = httpx.post(f"{server.url}/v2/models/tiny/generate", json=body).json()
    with httpx.stream("POST", f"{server.url}/v2/models/tiny/generate_stream", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == plain["text_output"]
    assert [e.get("details", {}).get("finish_reason") for e in events][-1] == "length"
    assert all("details" not in e for e in events[:-1])


def test_v1_models_lists_the_language_model_with_its_context(server: ThreadedServer) -> None:
    models = client(server).models.list().data
    assert [(m.id, m.owned_by) for m in models] == [("tiny", "kiri")]
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["max_model_len"] == 512


CHAT = "/v1/chat/completions"
GOOD_CHAT: dict[str, Any] = {"model": "tiny", "messages": QUESTION, "max_tokens": 4, "temperature": 0}
BAD: list[tuple[str, str, bytes | dict[str, Any], int, str | None]] = [
    ("malformed json", CHAT, b'{"model": "tiny", ', 400, None),
    (
        "invalid utf-8",
        CHAT,
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff"}]}',
        400,
        None,
    ),
    ("unknown model", CHAT, {**GOOD_CHAT, "model": "nope"}, 404, "model"),
    ("empty messages", CHAT, {**GOOD_CHAT, "messages": []}, 400, "messages"),
    ("negative max_tokens", CHAT, {**GOOD_CHAT, "max_tokens": -5}, 400, "max_tokens"),
    ("huge max_tokens", CHAT, {**GOOD_CHAT, "max_tokens": 10**9}, 400, "max_tokens"),
    (
        "prompt over the context",
        CHAT,
        {**GOOD_CHAT, "messages": [{"role": "user", "content": "word " * 600}]},
        400,
        "messages",
    ),
    ("negative temperature", CHAT, {**GOOD_CHAT, "temperature": -0.5}, 400, "temperature"),
    ("top_p of zero", CHAT, {**GOOD_CHAT, "top_p": 0}, 400, "top_p"),
    ("top_p over one", CHAT, {**GOOD_CHAT, "top_p": 1.01}, 400, "top_p"),
    ("negative top_k", CHAT, {**GOOD_CHAT, "top_k": -3}, 400, "top_k"),
    ("completion without prompt", "/v1/completions", {"model": "tiny"}, 400, "prompt"),
    (
        "completion prompt over the context",
        "/v1/completions",
        {"model": "tiny", "prompt": "x " * 600},
        400,
        "prompt",
    ),
]


@pytest.mark.parametrize(("label", "path", "body", "status", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_with_an_openai_error_body_and_the_server_keeps_serving(
    server: ThreadedServer,
    label: str,
    path: str,
    body: bytes | dict[str, Any],
    status: int,
    param: str | None,
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}{path}", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    good = httpx.post(f"{server.url}{CHAT}", json=GOOD_CHAT)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v2/models/tiny/generate", {"parameters": {}}, 422),
        ("/v2/models/tiny/generate", {"text_input": "x", "parameters": {"temperature": -1}}, 422),
        ("/v2/models/tiny/generate_stream", {"text_input": "x", "parameters": {"max_tokens": 10**6}}, 422),
        ("/v2/models/nope/generate", {"text_input": "x"}, 404),
    ],
)
def test_kserve_generate_refuses_bad_input_with_its_spec_codes(
    server: ThreadedServer, path: str, body: dict[str, Any], status: int
) -> None:
    r = httpx.post(f"{server.url}{path}", json=body)
    assert r.status_code == status
    assert isinstance(r.json()["error"], str)


def test_client_errors_are_counted_as_rejected_and_never_reach_the_gates_counter(
    start: Callable[..., ThreadedServer],
) -> None:
    server = start()
    assert httpx.post(f"{server.url}{CHAT}", content=b"{").status_code == 400
    assert httpx.post(f"{server.url}{CHAT}", json={**GOOD_CHAT, "top_p": 2}).status_code == 400
    assert metric(server, "kiri_rejected_requests_total", code="400") == 2
    assert metric(server, "kiri_requests_total") == 0


def test_generation_metrics_count_what_the_answers_report(start: Callable[..., ThreadedServer]) -> None:
    server = start()
    usages = []
    for prompt in ("def ", "class "):
        r = client(server).completions.create(model="tiny", prompt=prompt, max_tokens=9, temperature=0)
        assert r.usage is not None
        usages.append(r.usage)
    assert metric(server, "kiri:prompt_tokens_total", model="tiny") == sum(u.prompt_tokens for u in usages)
    assert metric(server, "kiri:generation_tokens_total", model="tiny") == sum(
        u.completion_tokens for u in usages
    )
    assert metric(server, "kiri:time_to_first_token_seconds_count", model="tiny") == 2
    assert metric(server, "kiri:e2e_request_latency_seconds_count", model="tiny") == 2
    assert metric(server, "kiri:request_queue_time_seconds_count", model="tiny") == 2
    assert metric(server, "kiri:inter_token_latency_seconds_count", model="tiny") == 2 * 8
    assert metric(server, "kiri:request_success_total", model="tiny", finished_reason="length") == 2
    assert metric(server, "kiri:num_requests_running", model="tiny") == 0
    assert metric(server, "kiri:num_requests_waiting", model="tiny") == 0
    assert metric(server, "kiri:kv_cache_usage_perc", model="tiny") == 0
    assert metric(server, "kiri_requests_total", model="tiny", code="200") == 2


# Greedy "def " never reaches <|im_end|> within the context on the tiny model: it runs all its max_tokens.
LONG = {"model": "tiny", "prompt": "def ", "max_tokens": 400, "temperature": 0}


def _send(server: ThreadedServer, body: dict[str, Any]) -> socket.socket:
    """A raw HTTP request on its own socket, so the test can drop the connection mid-answer."""
    raw = json.dumps(body)
    assert server.server is not None
    sock = socket.create_connection(("127.0.0.1", server.server.port))
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}"
    sock.sendall(f"{head}\r\n\r\n{raw}".encode())
    return sock


def _wait_running(server: ThreadedServer, n: int) -> None:
    deadline = time.monotonic() + 5
    while metric(server, "kiri:num_requests_running", model="tiny") != n:
        assert time.monotonic() < deadline, f"never {n} running"
        time.sleep(0.02)


def test_the_queue_limit_answers_429_with_retry_after_and_an_openai_error(
    start: Callable[..., ThreadedServer],
) -> None:
    server = start(queue_limit=1, delay_ms=20.0)  # 20 ms per decode step: the first request stays in flight
    sock = _send(server, {**LONG, "stream": True})
    try:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        r = httpx.post(f"{server.url}{CHAT}", json=GOOD_CHAT)
        assert r.status_code == 429
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        g = httpx.post(f"{server.url}/v2/models/tiny/generate", json={"text_input": "x"})
        assert g.status_code == 429 and g.headers["Retry-After"] == "1"
    finally:
        sock.close()


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "plain"])
def test_a_client_that_disconnects_frees_its_slot_at_once(
    start: Callable[..., ThreadedServer], stream: bool
) -> None:
    server = start(queue_limit=1, delay_ms=20.0)  # 400 tokens would take 8 s
    sock = _send(server, {**LONG, "stream": stream})
    if stream:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    _wait_running(server, 1)
    assert httpx.post(f"{server.url}{CHAT}", json=GOOD_CHAT).status_code == 429
    closed = time.monotonic()
    sock.close()
    deadline = closed + 2.0
    while (r := httpx.post(f"{server.url}{CHAT}", json=GOOD_CHAT)).status_code == 429:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.02)
    assert r.status_code == 200
    assert time.monotonic() - closed < 1.0  # one poll interval (0.2 s) plus a 4-token answer at 20 ms a step
    assert metric(server, "kiri:request_success_total", model="tiny", finished_reason="abort") == 1
    assert metric(server, "kiri_rejected_requests_total", model="tiny", code="499") == 1
    assert metric(server, "kiri:num_requests_running", model="tiny") == 0
    assert metric(server, "kiri:generation_tokens_total", model="tiny") < 400


def test_a_long_request_counts_its_tokens_and_inter_token_latencies_while_it_is_still_decoding(
    start: Callable[..., ThreadedServer],
) -> None:
    # The decode thread records metrics per request, not per token, but brings a running request's up to date
    # every METRICS_FLUSH_S (1 s): a dashboard sees a long generation progress.
    server = start(delay_ms=20.0)  # 400 tokens would take 8 s
    sock = _send(server, LONG)
    try:
        _wait_running(server, 1)
        deadline = time.monotonic() + 5
        while metric(server, "kiri:generation_tokens_total", model="tiny") == 0:
            assert time.monotonic() < deadline, "no generated token counted while decoding"
            time.sleep(0.05)
        now = metric_samples(server.url)  # one scrape: a flush may land between two
        counted = sample(now, "kiri:generation_tokens_total", model="tiny")
        assert 0 < counted < 400
        assert sample(now, "kiri:num_requests_running", model="tiny") == 1
        assert sample(now, "kiri:inter_token_latency_seconds_count", model="tiny") == counted - 1
        assert sample(now, "kiri:time_to_first_token_seconds_count", model="tiny") == 1
        assert sample(now, "kiri:e2e_request_latency_seconds_count", model="tiny") == 0
    finally:
        sock.close()


def test_a_packed_model_is_served_only_once_its_digest_is_verified(
    genai_dir: Path, tmp_path: Path, chat: GreedyChat
) -> None:
    from kiri_runtime.compressing.lm.packing import pack

    tar = tmp_path / "tiny.tar"
    sha, _ = pack(genai_dir, tar)
    wrong = _start(tar.as_uri(), tmp_path / "wrong", wait=False, sha256="0" * 64, fetch_retry_max_s=1.0)
    try:
        time.sleep(1.0)
        assert httpx.get(f"{wrong.url}/v2/health/ready").status_code == 503
        r = httpx.post(f"{wrong.url}{CHAT}", json=GOOD_CHAT)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
    finally:
        wrong.stop()
    right = _start(tar.as_uri(), tmp_path / "right", sha256=sha_of(tar, sha))
    try:
        assert (tmp_path / "right" / "unpacked" / sha / "genai_config.json").is_file()
        meta = httpx.get(f"{right.url}/v2/models/tiny").json()
        assert meta["platform"] == "onnxruntime_genai" and meta["parameters"]["kiri_sha256"] == sha
        answer = client(right).chat.completions.create(
            model="tiny", messages=chat.messages, temperature=0, max_tokens=30
        )
        assert answer.choices[0].message.content == chat.text
    finally:
        right.stop()


def sha_of(tar: Path, expected: str) -> str:
    assert sha256_of(tar) == expected
    return expected


# Prompts of 2 to 40-odd tokens on the tiny model's tokenizer.
MIXED = [
    "def ",
    "class Template(object):\n    x = 1",
    "import os\n",
    "    return sorted(set(items), key=len)[:10]",
]


@pytest.mark.parametrize("mode", ["continuous", "cohort", "none"])
def test_concurrent_greedy_requests_of_different_lengths_answer_as_they_do_alone_in_every_batching_mode(
    start: Callable[..., ThreadedServer], genai_dir: Path, mode: str
) -> None:
    import onnxruntime_genai as og

    server = start(lm_batching=mode)
    tok = og.Tokenizer(str(genai_dir))
    alone = [raw_greedy(genai_dir, [int(t) for t in tok.encode(p)], 16) for p in MIXED]

    def complete(prompt: str) -> list[int]:
        body = {"text_input": prompt, "parameters": {"max_tokens": 16, "temperature": 0, "details": True}}
        r = httpx.post(f"{server.url}/v2/models/tiny/generate", json=body, timeout=60).json()
        return [t["id"] for t in r["details"]["logprobs"]]

    results: dict[int, list[int]] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, complete(MIXED[i % 4]))) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        served, reference = results[i], alone[i % 4]
        assert served == reference[: len(served)], (i, served, reference)
        assert len(served) == 16 or served[-1] == 2  # all 16, or stopped at <|im_end|>


def test_requests_of_different_prompt_lengths_share_decode_steps_and_join_a_running_batch(
    start: Callable[..., ThreadedServer],
) -> None:
    server = start(delay_ms=10.0)  # 400 tokens take 4 s or more: the later requests join it
    assert server.server is not None
    scheduler = server.server.rest.generation.schedulers["tiny"]
    decoder = scheduler.decoder
    assert scheduler.batching == "continuous" and decoder is not None
    widths: list[tuple[int, tuple[int, ...]]] = []  # (rows, their lengths) of every decode step
    step = decoder.step

    def recording(tokens: Any) -> Any:
        widths.append((len(tokens), tuple(decoder.lengths)))
        return step(tokens)

    decoder.step = recording  # type: ignore[method-assign]
    first = _send(server, {"model": "tiny", "prompt": MIXED[3], "max_tokens": 400, "temperature": 0})
    try:
        _wait_running(server, 1)
        later = [
            client(server).completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)
            for p in MIXED[:3]
        ]
    finally:
        first.close()
    assert [r.usage.completion_tokens for r in later if r.usage] == [8, 8, 8]
    shared = [lengths for rows, lengths in widths if rows >= 2]
    assert shared, "no decode step ran two requests at once"
    assert any(len(set(lengths)) == len(lengths) for lengths in shared)  # rows of different lengths, one step


def test_an_xz_packed_model_cut_mid_download_resumes_verifies_pins_unpacks_and_answers_as_the_directory(
    genai_dir: Path, tmp_path: Path, chat: GreedyChat
) -> None:
    """What `kiri compress` ships for a language-model variant (packing.pack(compression="xz")): the runtime's
    fetcher, cache, pins and loader take it as they take a plain tar, with no flag."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kiri_runtime.artifacts import ArtifactCache
    from kiri_runtime.compressing.lm.packing import pack

    artifact = tmp_path / "tiny.tar.xz"
    sha, size = pack(genai_dir, artifact, compression="xz")
    payload = artifact.read_bytes()
    ranges: list[str] = []
    cuts = [1]

    class Cutting(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
            if rng:
                ranges.append(rng)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(size - start))
            self.end_headers()
            if not rng and cuts[0]:
                cuts[0] -= 1
                self.wfile.write(payload[: size // 3])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(payload[start:])

    http = ThreadingHTTPServer(("127.0.0.1", 0), Cutting)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{http.server_address[1]}/tiny.tar.xz"
    cache_dir = tmp_path / "cache"
    server = _start(uri, cache_dir, sha256=sha, fetch_retry_max_s=0.2)
    try:
        assert len(ranges) == 1 and 0 < int(ranges[0].removeprefix("bytes=").rstrip("-")) < size
        assert sha256_of(cache_dir / "blobs" / "sha256" / sha) == sha
        unpacked = cache_dir / "unpacked" / sha
        for name in ("genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"):
            assert (unpacked / name).read_bytes() == (genai_dir / name).read_bytes()
        assert [p["sha256"] for p in ArtifactCache(cache_dir).pins("tiny")] == [sha]
        answer = client(server).chat.completions.create(
            model="tiny", messages=chat.messages, temperature=0, max_tokens=30
        )
        assert answer.choices[0].message.content == chat.text
    finally:
        server.stop()
        http.shutdown()
