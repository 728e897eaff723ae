"""The OpenAI-compatible server, live on loopback, driven by the official `openai` client: results
equal the library's own generation, streaming and not, several clients at once; bad requests get a
4xx JSON error; a client that disconnects frees its slot; the server stops by itself."""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import re
import socket
import subprocess
import sys
import time

import openai
import pytest

import engine
from tiny_llama import TinyConfig, write_tiny_llama

TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
            "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
            "\n\n{% endif %}")
CTX = 192
PROMPTS = ["the cat sat on", "a quick brown fox", "once upon a time there", "in the beginning", "hello world",
           "we the people"]


def start_server(model_path, *extra, max_seconds=240):
    proc = subprocess.Popen([sys.executable, "-m", "engine.serve", "--model", str(model_path), "--port", "0",
                             "--ctx", str(CTX), "--threads", "1", "--max-seconds", str(max_seconds), *extra],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"server did not start: {proc.stderr.read()}")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("srv") / "tiny.gguf",
                            TinyConfig(n_layers=2, ctx=CTX, chat_template=TEMPLATE))


@pytest.fixture(scope="module")
def reference(tiny_path):
    m = engine.load(tiny_path, n_ctx=CTX, threads=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def server(tiny_path):
    proc, port = start_server(tiny_path)
    yield port
    proc.terminate()
    try:
        assert proc.wait(timeout=30) == 0  # SIGTERM: a clean stop
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused", timeout=60, max_retries=0)


def model_id(client):
    return client.models.list().data[0].id


def greedy_text(ref, prompt, n, **kw):
    return "".join(ref.generate(prompt, n, temperature=0, **kw))


def health(port) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/health")
    return json.loads(c.getresponse().read())


def test_models_lists_the_loaded_file(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_completion_equals_library_greedy(client, reference):
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    want = greedy_text(reference, PROMPTS[0], 24)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(reference.tokenize(PROMPTS[0]))
    assert r.usage.completion_tokens == 24 and r.usage.total_tokens == r.usage.prompt_tokens + 24


def test_streaming_completion_concatenates_to_the_same_text(client, reference):
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy_text(reference, PROMPTS[1], 20)
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20


def test_chat_uses_the_gguf_template(client, reference):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    want = greedy_text(reference, "hello there", 16, chat=True, system="be brief")
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(reference.prompt_ids("hello there", chat=True, system="be brief"))
    parts = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0,
                                                stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == want


def test_stop_strings_cut_the_text(client, reference):
    full = greedy_text(reference, PROMPTS[2], 30, stop=())
    stop = full[8:11]
    r = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", prompt=PROMPTS[3], max_tokens=16, temperature=1.0, top_p=0.9, seed=123)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    c = client.completions.create(**{**kw, "seed": 124})
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].text != c.choices[0].text


def test_concurrent_clients_share_passes_and_get_their_own_results(client, reference, server):
    before = health(server)["passes"]
    n = 24

    def one(i):
        p = PROMPTS[i % len(PROMPTS)]
        if i % 2:
            return "".join(c.choices[0].text for c in client.completions.create(
                model="tiny", prompt=p, max_tokens=n, temperature=0, stream=True))
        return client.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        got = list(ex.map(one, range(6)))
    assert got == [greedy_text(reference, PROMPTS[i % len(PROMPTS)], n) for i in range(6)]
    h = health(server)
    assert h["max_rows"] > 1  # generations shared passes
    assert h["passes"] - before < 6 * (n + 1)  # fewer passes than running them one after another
    assert h["active"] == 0


def raw_post(port, path, body: bytes) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read())


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b'{"model": "tiny"}', "prompt"),
    (b'{"prompt": "hi", "max_tokens": -1}', "max_tokens"),
    (b'{"prompt": "hi", "temperature": "hot"}', "temperature"),
    (b'{"prompt": "hi", "stop": [1, 2]}', "stop"),
    (b'{"prompt": [1, 99999]}', "prompt"),
    (b'[1, 2]', None),
])
def test_malformed_requests_get_openai_error_shape(server, body, param):
    status, out = raw_post(server, "/v1/completions", body)
    assert status == 400
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["message"]
    assert out["error"]["param"] == param


def test_bad_requests_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="n"):
        client.completions.create(model="tiny", prompt="hi", n=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="context") as e:
        client.completions.create(model="tiny", prompt="word " * (CTX + 10), max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="tiny", input="hi")


def test_generation_stops_at_the_context_end(client, reference):
    prompt = "word " * 60
    n_prompt = len(reference.tokenize(prompt))
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=1000, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= CTX and r.usage.prompt_tokens == n_prompt


def test_disconnect_mid_stream_frees_the_slot(server, client, reference):
    n = CTX - 20
    prompt = next(p for p in PROMPTS if greedy_text(reference, p, n) and reference.stats.finish_reason == "length")
    before = health(server)["cancelled"]
    sock = socket.create_connection(("127.0.0.1", server), timeout=10)
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while b"data:" not in got:
        got += sock.recv(4096)
    sock.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (health(server)["active"] or health(server)["cancelled"] == before):
        time.sleep(0.05)
    h = health(server)
    assert h["active"] == 0 and h["cancelled"] == before + 1
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0).choices[0].text is not None


def test_server_stops_by_itself_and_refuses_a_busy_port(tiny_path, server):
    proc, _ = start_server(tiny_path, max_seconds=1)
    assert proc.wait(timeout=60) == 0
    r = subprocess.run([sys.executable, "-m", "engine.serve", "--model", str(tiny_path), "--port", str(server)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "--port" in r.stderr


def test_speculating_server_gives_plain_greedy_results(tiny_path, reference):
    proc, port = start_server(tiny_path, "--prompt-lookup", "--speculate", "4")
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=0)
        prompts = [p + " " + p for p in PROMPTS[:4]]  # repeated text: prompt lookup finds drafts

        def one(p):
            return c.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            got = list(ex.map(one, prompts))
        assert got == [greedy_text(reference, p, 24) for p in prompts]
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
