"""`hyperlora serve` as a real process on 127.0.0.1, driven by the real `openai` client (no mocks).

A tiny random Llama and T2L hypernetwork (saved as directories, loaded by the CLI like any model) keep it fast;
`test_smollm2.py` runs the embedded SmolLM2 with the shipped reader (slow)."""
from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import socket
import time
import urllib.request

import openai
import pytest

from eval_helpers import tiny_llama, tiny_tokenizer
from runtime_helpers import make_peft_dir
from serve_helpers import MODEL_ID, ServerProcess, write_tiny_dirs

POLICIES = [None] + [f"policy {i}: always reply about subject number {i}" for i in range(7)]
MESSAGES = [[{"role": "user", "content": f"record {i}: " + "the quick brown fox " * (1 + i % 3)}]
            for i in range(len(POLICIES))]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    mdir, hdir = write_tiny_dirs(root)
    tok = tiny_tokenizer()
    make_peft_dir(tiny_llama(tok), root / "adapters" / "support-bot", targets=("q_proj", "v_proj"), std=1.0)
    return mdir, hdir, root / "adapters"


@pytest.fixture(scope="module")
def server(dirs):
    mdir, hdir, adapters = dirs
    srv = ServerProcess(["--model", str(mdir), "--hypernet", str(hdir), "--model-id", MODEL_ID, "--adapter-dir",
                         str(adapters), "--max-batch", "8", "--max-prefill-rows", "3", "--max-tokens", "600",
                         "--max-policy-tokens", "64", "--max-body-bytes", "20000"]).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)


def chat(client, i, n=12, **kw):
    extra = {"return_token_ids": True}
    if POLICIES[i] is not None:
        extra["policy"] = POLICIES[i]
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES[i], max_tokens=n, temperature=0,
                                       extra_body=extra, **kw)
    return r.choices[0].model_extra["token_ids"], r


def raw(server, method, path, body=None, headers=None):
    """(status, headers, parsed JSON body) without the client library."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    try:
        return r.status, dict(r.getheaders()), json.loads(payload)
    except ValueError:
        return r.status, dict(r.getheaders()), payload.decode()


def test_concurrent_mixed_policies_equal_each_alone(client):
    lengths = [8 + 4 * (i % 4) for i in range(len(POLICIES))]
    alone = [chat(client, i, n)[0] for i, n in enumerate(lengths)]
    with cf.ThreadPoolExecutor(8) as ex:
        together = list(ex.map(lambda a: chat(client, *a)[0], enumerate(lengths)))
    assert together == alone
    assert all(len(t) == n for t, n in zip(alone, lengths))  # nothing stopped early: every token compared
    # the policies change the replies (row 0 has none)
    assert len({tuple(t[:8]) for t in alone}) >= 6


def test_chat_stream_equals_non_stream_and_completions_work(client):
    _, full = chat(client, 3, n=16)
    stream = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES[3], max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"policy": POLICIES[3]})
    parts, reasons, usage = [], [], None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            parts.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(parts) == full.choices[0].message.content
    assert reasons[-1] == full.choices[0].finish_reason == "length"
    assert usage.completion_tokens == 16 and usage.prompt_tokens == full.usage.prompt_tokens
    r = client.completions.create(model=MODEL_ID, prompt="once upon a time", max_tokens=10, temperature=0,
                                  extra_body={"policy": POLICIES[2]})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
    s = client.completions.create(model=MODEL_ID, prompt="once upon a time", max_tokens=10, temperature=0,
                                  stream=True, extra_body={"policy": POLICIES[2]})
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text


def test_models_adapters_and_registered_policies(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == MODEL_ID and "support-bot" in ids
    # an adapter by model name (vLLM's way) and by policy field give the same tokens, and differ from the base
    by_model = client.chat.completions.create(model="support-bot", messages=MESSAGES[1], max_tokens=10,
                                              temperature=0, extra_body={"return_token_ids": True})
    by_field = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES[1], max_tokens=10, temperature=0,
                                              extra_body={"policy": "support-bot", "return_token_ids": True})
    base = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES[1], max_tokens=10, temperature=0,
                                          extra_body={"return_token_ids": True})
    t = lambda r: r.choices[0].model_extra["token_ids"]  # noqa: E731
    assert t(by_model) == t(by_field) != t(base)
    # register a policy: content-hash id, the same text gets the same id
    st, _, p = raw(server, "POST", "/v1/policies", {"text": POLICIES[4]})
    assert st == 201 and p["id"].startswith("policy-")
    st2, _, p2 = raw(server, "POST", "/v1/policies", {"text": POLICIES[4]})
    assert st2 == 200 and p2["id"] == p["id"]
    assert p["id"] in [m.id for m in client.models.list().data]
    assert [x["id"] for x in raw(server, "GET", "/v1/policies")[2]["data"]] == [p["id"]]
    text_tokens = chat(client, 4)[0]
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES[4], max_tokens=12, temperature=0,
                                       extra_body={"policy": p["id"], "return_token_ids": True})
    r2 = client.chat.completions.create(model=p["id"], messages=MESSAGES[4], max_tokens=12, temperature=0,
                                        extra_body={"return_token_ids": True})
    assert t(r) == t(r2) == text_tokens
    # delete it: the id is unknown from then on, and the error names the close ids, never serving it as text
    assert raw(server, "DELETE", f"/v1/policies/{p['id']}")[2]["deleted"] is True
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES[4], max_tokens=4,
                                       extra_body={"policy": p["id"]})
    assert e.value.body["code"] == "policy_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="support-bt", messages=MESSAGES[4], max_tokens=4)
    assert e.value.body["code"] == "model_not_found" and "support-bot" in e.value.body["message"]


def test_options_return_scores_and_the_best_option(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES[2], max_tokens=4,
                                       extra_body={"policy": POLICIES[2], "options": ["approve", "review"]})
    d = r.model_extra["decision"]  # decide()'s Decision (raw probabilities: no calibration given)
    assert set(d["probabilities"]) == {"approve", "review"}
    assert d["answer"] == max(d["probabilities"], key=d["probabilities"].get) == r.choices[0].message.content
    assert abs(sum(d["probabilities"].values()) - 1) < 1e-6 and d["confidence"] == max(d["probabilities"].values())
    assert isinstance(d["escalate"], bool) and d["verdict"] in (True, False)
    with pytest.raises(openai.BadRequestError):  # decide() reads one record: one user message
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES[2] * 2, max_tokens=4,
                                       extra_body={"policy": POLICIES[2], "options": ["approve", "review"]})


@pytest.mark.parametrize("body, code", [
    ({"max_tokens": 601}, "max_tokens_exceeded"),
    ({"policy": "x " * 70}, "policy_too_long"),
    ({"policy": "oneword"}, "invalid_policy"),
    ({"temperature": -1}, "invalid_request"),
    ({"messages": []}, "invalid_request"),
    ({"n": 2}, "invalid_request"),
    ({"logprobs": True}, "invalid_request"),  # refused, not answered with logprobs: null
    ({"options": ["only one"]}, "invalid_request"),
])
def test_bad_requests_are_openai_style_400s(client, server, body, code):
    full = {"model": MODEL_ID, "messages": MESSAGES[0], "max_tokens": 4, **body}
    st, _, err = raw(server, "POST", "/v1/chat/completions", full)
    assert st == 400 and err["error"]["code"] == code, err
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]


def test_malformed_and_oversized_bodies(server, client):
    st, _, err = raw(server, "POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert st == 400 and "error" in err
    big = {"model": MODEL_ID, "messages": [{"role": "user", "content": "y" * 30000}]}
    st, _, err = raw(server, "POST", "/v1/chat/completions", big)
    assert st == 400 and err["error"]["code"] == "request_too_large"
    # nothing above touched the server: it still answers, the same as before
    assert chat(client, 5)[0] == chat(client, 5)[0]
    assert raw(server, "GET", "/nowhere")[0] == 404


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + ("{" + want if want else "")) or (not want and line.startswith(name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_disconnect_cancels_the_generation(server, client):
    def metrics():
        with urllib.request.urlopen(server.base + "/metrics") as r:
            return r.read().decode()

    before = _metric(metrics(), "hyperlora_finished_requests_total", reason="cancelled")
    s = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"model": MODEL_ID, "messages": MESSAGES[0], "max_tokens": 590, "stream": True,
                       "temperature": 0, "ignore_eos": True}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while b"data:" not in got:
        got += s.recv(4096)
    s.close()
    t0 = time.time()
    while time.time() - t0 < 20:
        m = metrics()
        if _metric(m, "hyperlora_finished_requests_total", reason="cancelled") > before:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the dropped stream was not cancelled")
    assert _metric(m, "hyperlora_running_requests") == 0 or json.loads(
        urllib.request.urlopen(server.base + "/health").read())["running"] == 0
    for name in ("hyperlora_pool_hits_total", "hyperlora_pool_misses_total", "hyperlora_pool_evictions_total",
                 "hyperlora_adapter_generation_seconds_total", "hyperlora_time_to_first_token_seconds_bucket",
                 "hyperlora_time_per_output_token_seconds_bucket", "hyperlora_step_distinct_adapters_bucket",
                 "hyperlora_batch_rows_bucket", "hyperlora_queue_depth", "hyperlora_generation_tokens_total"):
        assert name in m, name
    assert _metric(m, "hyperlora_pool_misses_total") >= 7


@pytest.fixture(scope="module")
def guarded(dirs):
    mdir, hdir, _ = dirs
    srv = ServerProcess(["--model", str(mdir), "--hypernet", str(hdir), "--model-id", MODEL_ID, "--api-key",
                         "sekret", "--max-batch", "1", "--max-queue", "1", "--max-tokens", "3000"]).wait_ready()
    yield srv
    srv.stop()


def test_api_key_and_a_full_queue(guarded):
    anon = openai.OpenAI(base_url=guarded.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anon.models.list()
    c = openai.OpenAI(base_url=guarded.url, api_key="sekret", max_retries=0)
    assert c.models.list().data[0].id == MODEL_ID
    long = c.chat.completions.create(model=MODEL_ID, messages=MESSAGES[0], max_tokens=3000, temperature=0,
                                     stream=True, extra_body={"ignore_eos": True})
    next(iter(long))  # running: the one batch row is taken
    with cf.ThreadPoolExecutor(1) as ex:
        queued = ex.submit(lambda: c.chat.completions.create(model=MODEL_ID, messages=MESSAGES[1], max_tokens=3,
                                                             temperature=0))
        t0 = time.time()
        while json.loads(urllib.request.urlopen(guarded.base + "/health").read())["waiting"] < 1:
            assert time.time() - t0 < 20
            time.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model=MODEL_ID, messages=MESSAGES[2], max_tokens=3)
        assert e.value.response.headers["retry-after"] == "1" and e.value.body["code"] == "queue_full"
        long.close()  # frees the row: the queued request runs
        assert queued.result(timeout=30).usage.completion_tokens == 3


def test_sigterm_stops_admitting_and_drains(dirs):
    mdir, hdir, _ = dirs
    srv = ServerProcess(["--model", str(mdir), "--hypernet", str(hdir), "--model-id", MODEL_ID,
                         "--max-tokens", "600"]).wait_ready()
    try:
        c = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0)
        stream = c.chat.completions.create(model=MODEL_ID, messages=MESSAGES[0], max_tokens=600, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"policy": POLICIES[1], "ignore_eos": True})
        it = iter(stream)
        next(it)
        srv.sigterm()
        time.sleep(0.3)
        with pytest.raises((openai.APIConnectionError, openai.InternalServerError)):
            openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=5).chat.completions.create(
                model=MODEL_ID, messages=MESSAGES[1], max_tokens=3)
        chunks = list(it)
        assert chunks[-1].usage.completion_tokens == 600  # the in-flight request ran to its end
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        srv.proc.wait(30)
        assert srv.proc.returncode in (0, -15)  # uvicorn re-raises the signal after its graceful shutdown
    finally:
        srv.stop()
