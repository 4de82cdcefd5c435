"""`lmlab serve` through the official `openai` client: chat, streaming, completions, models,
errors in OpenAI's shape, 16 concurrent streaming clients (each the same text as alone, bad
requests among them refused while the others are served), a client that disconnects, the
limits (429 with Retry-After, a timeout) and the CLI's refusals."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="the openai client is part of the dev extra (pip install -e .[dev])")

from serving import HTTP, random_model_dir, serving  # noqa: E402

from lmlab.cli import main  # noqa: E402

KEY = "test-key"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.getbasetemp() / "serve-models", "transformer", context=1024)


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serving(run_dir, log, f"api_key={KEY}", "name=micro", "max_tokens=1000") as srv:
        srv["log"] = log
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body, key=KEY, raw=None):
    """(status, parsed JSON body, headers) of a POST, without the client's checks."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(server["url"] + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"}
                                                                                 if key else {})})
    try:
        with HTTP.open(req, timeout=60) as r:
            return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}


def metrics(server) -> dict[str, float]:
    req = urllib.request.Request(server["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with HTTP.open(req, timeout=10) as r:
        text = r.read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}


def chat(client, content, **kw):
    return client.chat.completions.create(model="micro", messages=[{"role": "user", "content": content}], **kw)


def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == ["micro"]
    assert client.models.retrieve("micro").owned_by == "lmlab"
    with HTTP.open(server["url"] + "/health", timeout=10) as r:
        assert json.load(r)["status"] == "ok"
    with HTTP.open(server["url"] + "/", timeout=10) as r:  # the web chat needs no key
        assert "<html" in r.read().decode().lower()


def test_chat_completion_and_its_stream_agree(client):
    r = chat(client, "Tell me about the cat.", max_tokens=20, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and r.model == "micro" and c.message.role == "assistant"
    assert c.finish_reason in ("stop", "length") and c.message.content
    assert r.usage.completion_tokens <= 20 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(chat(client, "Tell me about the cat.", max_tokens=20, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert text == c.message.content and finals == [c.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # it streamed


def test_sampling_seed_n_stop_and_max_completion_tokens(client):
    a = chat(client, "Once upon a time", max_completion_tokens=12, temperature=1.0, seed=7, n=3)
    b = chat(client, "Once upon a time", max_completion_tokens=12, temperature=1.0, seed=7, n=3)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # each choice samples with its own seed
    assert a.usage.completion_tokens <= 36
    full = chat(client, "A dog", max_tokens=16, temperature=0).choices[0].message.content
    stop = full[3:5]
    cut = chat(client, "A dog", max_tokens=16, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[:full.index(stop)]


def test_completions_text_ids_echo_and_stream(client, run_dir):
    from lmlab.data.tokenizer import Tokenizer

    tok = Tokenizer.load(run_dir / "tokenizer")
    r = client.completions.create(model="micro", prompt="The cat sat", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    ids = [tok.bos_id] + tok.encode("The cat sat")
    same = client.completions.create(model="micro", prompt=ids, max_tokens=10, temperature=0)
    assert same.choices[0].text == r.choices[0].text and same.usage.prompt_tokens == len(ids)
    two = client.completions.create(model="micro", prompt=["The cat sat", "A dog ran"], max_tokens=6, temperature=0,
                                    echo=True)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[1].text.startswith("A dog ran")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="micro", prompt="The cat sat", max_tokens=10, temperature=0, stream=True))
    assert streamed == r.choices[0].text


@pytest.mark.parametrize("body, status, param, words", [
    ({"model": "micro", "messages": []}, 400, "messages", "empty"),
    ({"model": "micro", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "valid roles"),
    ({"model": "micro", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, "max_tokens",
     "limit of 1000"),
    ({"model": "micro", "messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, "n", "limit of 8"),
    ({"model": "micro", "messages": [{"role": "user", "content": "hi " * 1500}]}, 400, "messages",
     "maximum context length"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "does not exist"),
    ({"model": "micro", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1}, 400,
     "presence_penalty", "not supported"),
    ({"model": "micro", "messages": [{"role": "user", "content": "hi"}], "bogus": 1}, 400, "bogus",
     "Unrecognized request argument"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", "missing"),
    ({"model": "micro", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content", "text only"),
])
def test_bad_requests_get_openai_errors(server, body, status, param, words):
    code, err, _ = post(server, "/v1/chat/completions", body)
    assert code == status and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and words in err["error"]["message"]


def test_malformed_json_a_missing_key_and_an_unknown_route(server, client):
    code, err, _ = post(server, "/v1/chat/completions", None, raw=b'{"model": "micro", "messages": [')
    assert code == 400 and "not valid JSON" in err["error"]["message"]
    code, err, _ = post(server, "/v1/chat/completions", {"model": "micro", "messages": []}, key=None)
    assert code == 401 and err["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    code, err, _ = post(server, "/v1/nothing", {})
    assert code == 404 and "no route" in err["error"]["message"]


def test_sixteen_concurrent_streams_match_alone_while_bad_requests_are_refused(server, client):
    prompts = [f"Story {i}: the {['cat', 'dog', 'owl', 'fox'][i % 4]} {'ran ' * (i % 5)}" for i in range(16)]

    def one(p, stream):
        kw = dict(max_tokens=24 + (len(p) % 3) * 8, temperature=0)
        if not stream:
            return chat(client, p, **kw).choices[0].message.content
        return "".join(ch.choices[0].delta.content or "" for ch in chat(client, p, stream=True, **kw) if ch.choices)

    alone = [one(p, False) for p in prompts]
    assert len(set(alone)) > 8
    with cf.ThreadPoolExecutor(20) as pool:
        streams = [pool.submit(one, p, True) for p in prompts]
        bad = [pool.submit(post, server, "/v1/chat/completions",
                           {"model": "micro", "messages": [{"role": "user", "content": "x " * 2000}]})
               for _ in range(4)]
        together = [f.result(timeout=120) for f in streams]
        refused = [f.result(timeout=60)[0] for f in bad]
    assert together == alone
    assert refused == [400] * 4
    assert metrics(server)["lmlab_active_sequences_peak"] >= 8  # they really were decoded together


def test_a_client_that_disconnects_frees_its_slot(server, client):
    before = metrics(server)["lmlab_generated_tokens_total"]
    stream = chat(client, "Talk for a long time.", max_tokens=900, temperature=0.8, stream=True,
                  extra_body={"ignore_eos": True})  # vLLM's extension: 900 tokens, whatever they are
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while metrics(server)["lmlab_active_sequences"] > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    m = metrics(server)
    assert m["lmlab_active_sequences"] == 0
    assert m["lmlab_generated_tokens_total"] - before < 600  # cancelled, not decoded to the end
    finished = chat(client, "Talk.", max_tokens=300, temperature=0.8, extra_body={"ignore_eos": True})
    assert finished.usage.completion_tokens == 300 and finished.choices[0].finish_reason == "length"
    # a plain (not streamed) request whose client gives up: cancelled too
    before = metrics(server)["lmlab_generated_tokens_total"]
    impatient = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        chat(impatient, "Talk.", max_tokens=1000, n=8, temperature=0.8, extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 10
    while metrics(server)["lmlab_active_sequences"] > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    m = metrics(server)
    assert m["lmlab_active_sequences"] == 0 and m["lmlab_generated_tokens_total"] - before < 6000
    assert chat(client, "Still there?", max_tokens=4).choices[0].message.content is not None
    assert "POST /v1/chat/completions" in server["log"].read_text()  # one access-log line per request


def test_a_full_queue_answers_429_and_a_slow_request_times_out(run_dir, tmp_path):
    with serving(run_dir, tmp_path / "s.log", "max_batch=1", "max_queue=1", "request_timeout=0.2") as srv:
        c = openai.OpenAI(base_url=srv["url"] + "/v1", api_key="x", max_retries=0, timeout=60)
        body = {"model": srv["model"], "messages": [{"role": "user", "content": "go"}], "max_tokens": 1000,
                "temperature": 0.8, "ignore_eos": True}  # 1000 tokens take far longer than 0.2 s on a CPU
        with cf.ThreadPoolExecutor(4) as pool:
            first = pool.submit(post, srv, "/v1/chat/completions", body, None)   # decoding
            time.sleep(0.05)
            second = pool.submit(post, srv, "/v1/chat/completions", body, None)  # waiting
            time.sleep(0.05)
            code, err, headers = post(srv, "/v1/chat/completions", body, None)   # no room
            assert code == 429 and headers.get("retry-after") == "1"
            assert err["error"]["code"] == "rate_limit_exceeded"
            timed_out = [f.result(60) for f in (first, second)]
        assert [r[0] for r in timed_out] == [408, 408] and "timed out" in timed_out[0][1]["error"]["message"]
        assert c.models.list().data[0].id == srv["model"]  # and it still serves (a completion could not
        # be asked for here: on a loaded machine even 3 tokens may take longer than this server's 0.2 s)


def test_truncate_sinks_reads_and_writes_past_the_context(tmp_path_factory, tmp_path):
    small = random_model_dir(tmp_path_factory.getbasetemp() / "serve-models", "transformer", context=64)
    long_message = [{"role": "user", "content": "the cat sat on the mat " * 40}]
    with serving(small, tmp_path / "s.log", "truncate=sinks") as srv:
        c = openai.OpenAI(base_url=srv["url"] + "/v1", api_key="x", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=srv["model"], messages=long_message, max_tokens=100,
                                      extra_body={"ignore_eos": True})
        assert r.usage.prompt_tokens > 64 and r.usage.completion_tokens == 100
    with serving(small, tmp_path / "r.log") as srv:  # the default refuses what does not fit
        code, err, _ = post(srv, "/v1/chat/completions", {"model": srv["model"], "messages": long_message}, None)
        assert code == 400 and err["error"]["code"] == "context_length_exceeded"


def test_cli_refusals_are_one_line_exit_2(run_dir, server, tmp_path, capsys):
    port = server["url"].rsplit(":", 1)[1]
    assert main(["serve", str(run_dir), f"port={port}"]) == 2
    assert "is in use" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "port=0"]) == 2
    assert "not a model run directory" in capsys.readouterr().err
    assert main(["serve", str(run_dir), "host=0.0.0.0", "port=0"]) == 2
    err = capsys.readouterr().err
    assert "api_key" in err and "Traceback" not in err


def test_a_model_without_a_chat_template_still_serves_completions(run_dir):
    """In process (Starlette's TestClient): with no template, chat is refused by name and
    completions work."""
    from fastapi.testclient import TestClient

    from lmlab.models import load_model
    from lmlab.serve.app import create_app
    from lmlab.serve.stage import Config

    model, tok, _ = load_model(run_dir)
    app = create_app(model.eval(), tok, None, "base", Config(model=str(run_dir)))
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
        r = http.post("/v1/completions", json={"model": "base", "prompt": "The cat", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
