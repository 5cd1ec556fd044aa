"""The web demo (npm_hf.web_demo): its HTML, its input checks, and the real thing: `npm-hf gradio` on a loopback
port, driven by headless Chromium over the DevTools protocol (typing a query, reading the page, a screenshot)."""

import base64
import html
import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from npm_hf.cli import main
from npm_hf.web_demo import MAX_TOP_K, WebDemo, WebDemoArguments, build_demo, highlight, load_fill_mask, render_answers


ROOT = Path(__file__).resolve().parents[1]
NPM_HF = str(Path(sys.executable).parent / "npm-hf")


# ------------------------------------------------------------------------------------------------ HTML and checks
def test_answers_render_as_bars_with_the_answer_marked_in_its_passage():
    answers = [
        {"score": 0.625, "phrase": "Kentucky", "evidence": {"doc_id": "ky", "title": "Abraham Lincoln",
                                                            "text": "Lincoln was born in Kentucky.", "start": 20,
                                                            "end": 28}},
        {"score": 0.25, "phrase": "<b>", "evidence": {"doc_id": "x", "title": "", "text": "a <b> tag", "start": 2,
                                                      "end": 5}},
    ]
    page = render_answers(answers)
    assert page.count('class="npm-answer"') == 2
    assert '<span class="npm-phrase">Kentucky</span><span class="npm-score">0.6250</span>' in page
    assert 'style="width: 62.5%"' in page and 'style="width: 25.0%"' in page
    assert 'from <span class="npm-title">Abraham Lincoln</span>' in page
    assert 'Lincoln was born in <mark class="npm-evidence">Kentucky</mark>.' in page
    assert 'from <span class="npm-title">x</span>' in page  # no title: the document id
    assert 'a <mark class="npm-evidence">&lt;b&gt;</mark> tag' in page and "<b>" not in page  # corpus text escaped
    assert "No answer" in render_answers([])


def test_long_passages_are_cut_around_the_answer():
    text = "x" * 500 + "ANSWER" + "y" * 500
    shown = highlight(text, 500, 506, context=10)
    assert shown == "…" + "x" * 10 + '<mark class="npm-evidence">ANSWER</mark>' + "y" * 10 + "…"
    with pytest.raises(ValueError, match="outside its passage of 6 characters"):
        highlight("abcdef", 4, 9)


@pytest.mark.parametrize("kwargs, message", [
    ({"port": 0}, "--port must be an integer in 1-65535, got 0"),
    ({"port": 70000}, "--port must be an integer in 1-65535"),
    ({"top_k": 0}, f"--top-k must be an integer in 1-{MAX_TOP_K}, got 0"),
    ({"host": " "}, "--host is empty"),
    ({"model": ""}, "--model is empty"),
])
def test_demo_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WebDemoArguments(**{"model": "m", **kwargs})


def test_cli_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    assert main(["gradio", "--model", "m", "--port", "0"]) == 2
    assert capsys.readouterr().err == "npm-hf gradio: error: --port must be an integer in 1-65535, got 0.\n"
    assert main(["gradio", "--model", str(tmp_path / "missing"), "--port", "7999"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"npm-hf gradio: error: Cannot load the NPM '{tmp_path / 'missing'}'")
    assert error.count("\n") == 1


def test_without_gradio_the_demo_says_which_extra_to_install(npm_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed: `import gradio` raises ImportError
    with pytest.raises(ImportError, match=r'The web demo needs Gradio: pip install "npm-hf\[gradio\]"'):
        build_demo(WebDemo(load_fill_mask(str(npm_dir))))


def test_bad_queries_get_a_message_not_an_error(npm_dir, mask):
    demo = WebDemo(load_fill_mask(str(npm_dir)))
    assert "has no mask: put " + html.escape(mask) in demo.answer("no mask here")
    assert "Type a text with one" in demo.answer("   ")
    assert "top-k must be a whole number 1-20, got 0" in demo.answer(f"born in {mask}.", top_k=0)
    assert "k must be a whole number &gt;= 1, got -3" in demo.answer(f"born in {mask}.", k=-3)
    assert "pre-filter must be one of none, bm25, dense, got &#x27;tfidf&#x27;" in demo.answer(
        f"born in {mask}.", prefilter="tfidf")


def test_the_page_shows_what_the_pipeline_answers(npm_dir, mask):
    fill = load_fill_mask(str(npm_dir))
    demo = WebDemo(fill)
    query = f"Abraham Lincoln was born in {mask}."
    for prefilter, k in (("none", None), ("bm25", 64)):
        expected = fill(query, top_k=4, prefilter=prefilter, **({"k": k} if k else {}))
        assert demo.answer(query, top_k=4, prefilter=prefilter, k=k) == render_answers(expected)
    assert demo.answer(query, top_k=4.0) == render_answers(fill(query, top_k=4))  # Gradio's numbers are floats


def test_the_space_app_builds_the_demo_from_its_environment(npm_dir, monkeypatch):
    import gradio

    monkeypatch.setenv("NPM_MODEL", str(npm_dir))
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    app = runpy.run_path(str(ROOT / "spaces" / "npm-demo" / "app.py"), run_name="space")  # not __main__: no launch
    args = app["demo_arguments"]()
    assert (args.model, args.index, args.host, args.port) == (str(npm_dir), None, "0.0.0.0", 7861)
    blocks = build_demo(WebDemo(load_fill_mask(args.model)))
    assert isinstance(blocks, gradio.Blocks)


# --------------------------------------------------------------------------------------------- the real browser
def _chromium() -> str:
    """Debian's chromium, installed with apt-get where missing (this machine runs as root); skips with the reason
    when it cannot be had."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and apt-get (as root) is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"{' '.join(command)} did not finish within 15 minutes")
        if result.returncode != 0:
            pytest.skip(f"could not install chromium ({' '.join(command)}): {result.stderr.strip()[-300:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed chromium but no chromium executable is on PATH")
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_http(url: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the process serving {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.time() < deadline, f"{url} did not answer within {seconds:.0f} s"
        time.sleep(0.25)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


class DevTools:
    """A headless Chromium page driven over the DevTools protocol (websocket-client); every wait is bounded."""

    def __init__(self, executable: str, profile: Path, timeout: float = 30.0):
        import websocket

        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--window-size=1280,1400",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.timeout = timeout
        try:
            port_file = profile / "DevToolsActivePort"
            deadline = time.time() + timeout
            while not (port_file.exists() and port_file.read_text().strip()):
                assert self.process.poll() is None, self.process.stderr.read().decode()[-2000:]
                assert time.time() < deadline, f"chromium did not open its DevTools port within {timeout:.0f} s"
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as response:
                page = next(t for t in json.loads(response.read()) if t["type"] == "page")
            self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout,
                                                      suppress_origin=True)
        except BaseException:
            self.close()
            raise
        self.next_id = 0

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]
        raise AssertionError(f"no DevTools answer to {method} within {self.timeout:.0f} s")

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, seconds: float, what: str):
        deadline = time.time() + seconds
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            assert time.time() < deadline, f"{what} did not appear within {seconds:.0f} s"
            time.sleep(0.2)

    def type_into(self, selector: str, text: str) -> None:
        """Focus the field, select what it holds and type `text` over it (real input events)."""
        found = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return "
                              "false; e.focus(); e.select(); return true; })()")
        assert found, f"no {selector} in the page"
        self.send("Input.insertText", text=text)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        _stop(self.process)


@pytest.fixture
def served_demo(npm_dir, tmp_path):
    """`npm-hf gradio --model npm_dir` on a free loopback port, answering 3 answers at first; stopped afterwards."""
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([NPM_HF, "gradio", "--model", str(npm_dir), "--host", "127.0.0.1", "--port", str(port),
                               "--top-k", "3"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for_http(f"http://127.0.0.1:{port}/", server, seconds=120)
        yield f"http://127.0.0.1:{port}/"
    except AssertionError as error:
        log.flush()
        raise AssertionError(f"{error}\n{(tmp_path / 'server.log').read_text()[-3000:]}") from None
    finally:
        _stop(server)
        log.close()


@pytest.mark.slow  # ~25 s a tokenizer here, most of it starting the server (imports, model and index loading)
def test_the_demo_in_a_real_browser(served_demo, npm_dir, mask, tmp_path):
    """Type a query, press the button: the page shows the pipeline's answers, each with its score bar, title and
    highlighted evidence; then the top-k and k controls change the answers as they change the pipeline's."""
    chromium = _chromium()
    query = f"Abraham Lincoln was born in {mask}."
    fill = load_fill_mask(str(npm_dir))
    expected = fill(query, top_k=3)
    controlled = fill(query, top_k=2, k=8, prefilter="none")  # after setting the top-k and k controls
    assert controlled and len(expected) == 3
    assert [a["score"] for a in controlled] != [a["score"] for a in expected[:2]]  # k=8 does change the answers
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        browser.send("Page.enable")
        browser.send("Page.navigate", url=served_demo)
        field = "#npm-text textarea, #npm-text input"
        # the page renders in parts: the text box can be there before the button beside it
        browser.wait_for(f"!!document.querySelector({json.dumps(field)}) && !!document.querySelector('#npm-submit')",
                         60, "the text box and its button")
        browser.type_into(field, query)
        assert browser.evaluate(f"document.querySelector({json.dumps(field)}).value") == query
        browser.evaluate("document.querySelector('#npm-submit').click()")
        shown = browser.wait_for(f"document.querySelectorAll('#npm-answers .npm-answer').length === {len(expected)} "
                                 "&& document.querySelector('#npm-answers .npm-answers').outerHTML", 60, "the answers")
        page = browser.evaluate("document.querySelector('#npm-answers').innerText")
        marks = browser.evaluate("[...document.querySelectorAll('#npm-answers mark')].map(m => m.textContent)")
        titles = browser.evaluate("[...document.querySelectorAll('#npm-answers .npm-title')].map(t => t.textContent)")
        widths = browser.evaluate("[...document.querySelectorAll('#npm-answers .npm-bar-fill')]"
                                  ".map(b => b.style.width)")
        browser.screenshot(tmp_path / "web_demo.png")
        browser.type_into("#npm-top-k input[type=number]", "2")
        browser.type_into("#npm-k input", "8")
        browser.evaluate("document.activeElement.blur()")
        browser.evaluate("document.querySelector('#npm-submit').click()")
        # k=8 neighbours may form fewer than 2 answers (the tiny vocabulary differs per session): wait for the
        # pipeline's own number, on a page that no longer shows the first answers
        with_controls = browser.wait_for(
            f"document.querySelectorAll('#npm-answers .npm-answer').length === {len(controlled)} && "
            f"document.querySelector('#npm-answers .npm-answers').outerHTML !== {json.dumps(shown)} && "
            "document.querySelector('#npm-answers .npm-answers').outerHTML", 60, "the answers with top-k 2, k 8")
    finally:
        browser.close()
    phrases = [answer["phrase"] for answer in expected]
    evidence = [answer["evidence"] for answer in expected]
    assert phrases[0] in page and f"{expected[0]['score']:.4f}" in page
    assert marks == [e["text"][e["start"] : e["end"]] for e in evidence]  # each answer highlighted in its passage
    assert titles == [e["title"] or e["doc_id"] for e in evidence]
    assert [float(w.rstrip("%")) for w in widths] == [round(100 * a["score"], 1) for a in expected]  # the bars
    assert shown == render_answers(expected)  # exactly what the pipeline answers, nothing else
    assert with_controls == render_answers(controlled)
    png = (tmp_path / "web_demo.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
