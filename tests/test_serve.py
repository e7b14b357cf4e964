"""`blockdraft serve`: the real openai client against a server on a free loopback port (tiny model),
the same text as generate, streamed or not; OpenAI-shaped 4xx errors; the server survives them."""
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import openai
import pytest
import torch

from blockdraft import Decoder
from blockdraft.serve import BackgroundServer, Service, create_app
from blockdraft.testing import random_heads, tiny_llama, tiny_tokenizer

PROMPT = "write a short poem about the sky"


@pytest.fixture(scope="module")
def decoder():
    model = tiny_llama(2, dtype=torch.float32)
    return Decoder.from_model(model, tiny_tokenizer(64), heads=random_heads(model, 3, seed=2).float())


@pytest.fixture(scope="module")
def server(decoder):
    with BackgroundServer(create_app(Service(decoder, "tiny", method="bpd-full", max_new_tokens=24))) as url:
        yield url


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=120)


def _post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_lists_the_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_text_equals_generate_streamed_or_not(client, decoder):
    expected = decoder.generate(PROMPT, method="bpd-full", max_new_tokens=24, system="be brief")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    out = client.chat.completions.create(model="tiny", messages=messages)
    assert out.choices[0].message.content == expected.text and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == len(expected.ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == len(expected.ids)


def test_completions_and_stop_strings_equal_generate(client, decoder):
    full = decoder.generate(PROMPT, method="ar", max_new_tokens=12, raw=True)
    stop = full.text.split()[3]
    expected = decoder.generate(PROMPT, method="ar", max_new_tokens=12, raw=True, stop=(stop,))
    assert expected.stop_reason == "stop_string"
    for method in ("ar", "bpd-full"):
        out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, stop=[stop],
                                        temperature=0, extra_body={"method": method})
        assert out.choices[0].text == expected.text and out.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=12, stop=stop, stream=True, extra_body={"method": method}))
        assert streamed == expected.text


def test_sampled_requests_equal_generate_with_the_same_seed(client, decoder):
    """temperature/top_p/seed (and top_k) reach the sampler: a seed repeats generate's answer."""
    expected = decoder.generate(PROMPT, method="bpd-full", max_new_tokens=24, temperature=0.8, top_p=0.9, top_k=20,
                                seed=5)
    messages = [{"role": "user", "content": PROMPT}]
    settings = dict(model="tiny", messages=messages, temperature=0.8, top_p=0.9, seed=5, extra_body={"top_k": 20})
    out = client.chat.completions.create(**settings)
    assert out.choices[0].message.content == expected.text
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**settings, stream=True)
                       if c.choices)
    assert streamed == expected.text
    greedy = decoder.generate(PROMPT, method="bpd-full", max_new_tokens=24).text
    answers = {client.chat.completions.create(model="tiny", messages=messages, temperature=1.0, seed=s)
               .choices[0].message.content for s in range(4)}
    assert len(answers) > 1 and expected.text != greedy


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny"}, 400, "messages"),                                                   # schema
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),     # unknown model
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi " * 400}]}, 400, "messages"),  # too long
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_k": -1}, 400, "top_k"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, "seed"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": "x"}, 400, "seed"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "method": "bpd-nope"}, 400, "method"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    code, reply = _post(server + "/chat/completions", body)
    assert code == status and set(reply) == {"error"} and reply["error"]["param"] == param
    assert reply["error"]["message"] and reply["error"]["type"]


def test_bad_json_unknown_route_and_the_server_lives_on(server, client):
    code, reply = _post(server + "/chat/completions", b"{not json")
    assert code == 400 and "error" in reply
    code, reply = _post(server + "/nothing", {})
    assert code == 404 and "error" in reply
    with pytest.raises(openai.BadRequestError, match="too_long|context|tokens"):
        client.completions.create(model="tiny", prompt="hi " * 400)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3).choices[0].text


def test_requests_queue_one_at_a_time(server, decoder):
    """Concurrent requests are served one after another: each gets its own full answer."""
    expected = decoder.generate(PROMPT, method="bpd-full", max_new_tokens=24).text
    results = []

    def ask():
        c = openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=300)
        results.append(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}])
                       .choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3


def _serve(*args: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "blockdraft.cli", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _url_of(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    assert " at http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return line.split(" at ", 1)[1].split(";")[0].strip()


def test_cli_serve_a_saved_model(tmp_path):
    folder = tmp_path / "tiny"
    tiny_llama(2, dtype=torch.float32).save_pretrained(folder)
    tiny_tokenizer(64).save_pretrained(folder)
    proc = _serve("--model", str(folder), "--method", "ar", "--log-level", "warning")
    try:
        url = _url_of(proc)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [str(folder)]
        got = client.chat.completions.create(model=str(folder), messages=[{"role": "user", "content": PROMPT}],
                                             max_tokens=8).choices[0].message.content
        import blockdraft
        assert got == blockdraft.load(str(folder)).generate(PROMPT, method="ar", max_new_tokens=8).text
    finally:
        proc.terminate()
        proc.wait(30)
    bad = subprocess.run([sys.executable, "-m", "blockdraft.cli", "serve", "--port", "0", "--model", str(folder),
                          "--method", "bpd"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--heads" in bad.stderr


@pytest.mark.slow
def test_real_model_server_equals_generate():
    """The default model and method: `generate`'s text, then the server's (streamed and not)."""
    prompt = "Name three rivers."
    gen = subprocess.run([sys.executable, "-m", "blockdraft.cli", "generate", "--prompt", prompt, "--system",
                          "You answer in one line.", "--max-new-tokens", "32", "--json"],
                         check=False, capture_output=True, text=True, timeout=1800)
    assert gen.returncode == 0, gen.stderr
    expected = json.loads(gen.stdout)["text"]
    proc = _serve("--log-level", "warning", env={**os.environ})
    try:
        client = openai.OpenAI(base_url=_url_of(proc), api_key="none", max_retries=0, timeout=1800)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
        messages = [{"role": "system", "content": "You answer in one line."}, {"role": "user", "content": prompt}]
        out = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=32)
        assert out.choices[0].message.content == expected
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2-135m", messages=messages, max_tokens=32, stream=True) if c.choices)
        assert streamed == expected
    finally:
        proc.terminate()
        proc.wait(60)
