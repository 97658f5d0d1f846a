"""The web view (vllm_pelrp/serving/webview.py and serving/static/).

Unit part: the bounded store of recent explanations and the routes on a bare FastAPI app. Browser
part: a real server (tests/_live_server.py) and Debian's Chromium (``/usr/bin/chromium``,
headless) driven by Playwright's Python package: type a prompt and two documents, submit, and
check the page against the explanation the server returned; reopen it by id; the page may make
no request to any other host. The screenshot goes to tests/artifacts/webview.png. And, without a
model, the page on a bare app drawing stored explanations: an encoder's similarity (two texts side
by side; tests/artifacts/webview_similarity.png), then a rotary decoder's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from vllm_pelrp.serving import webview
from vllm_pelrp.serving.webview import ID_PATTERN, STATIC_DIR, RecentExplanations

from _live_server import API_KEY, DOCUMENTS, OTHER_API_KEY, QUESTION, shared_server

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _explanation(text: str = "Hi there", tokens: int = 3, **extra) -> dict:
    return {"model": "m", "mode": "pa-lrp", "text": text, "prompt_length": 1,
            "target": {"description": "completion"},
            "tokens": [{"index": i, "id": i, "text": "x", "start": i, "end": i + 1,
                        "role": "prompt" if i == 0 else "completion"} for i in range(tokens)],
            **extra}


# --- unit: store ----------------------------------------------------------------------------------
def test_store_gives_ids_and_keeps_the_last_ones():
    store = RecentExplanations(capacity=3)
    ids = [store.add(_explanation()) for _ in range(5)]
    assert all(ID_PATTERN.match(i) for i in ids)
    assert len(set(ids)) == 5
    # newest first, the last 3
    assert [s["id"] for s in store.summaries(everyone=True)] == ids[:1:-1]
    assert store.get(ids[0]) is None
    assert json.loads(store.get(ids[-1]))["id"] == ids[-1]
    given = _explanation(id="expl-" + "a" * 32)
    assert store.add(given) == "expl-" + "a" * 32  # an id already set is kept
    compact = {"top_tokens": [], "num_tokens": 3}
    assert store.add(compact) is None and "id" not in compact


def test_store_is_bounded_in_bytes():
    one = len(json.dumps(_explanation(id="expl-" + "0" * 32), separators=(",", ":")))
    store = RecentExplanations(capacity=100, max_bytes=int(2.5 * one))
    for _ in range(6):
        store.add(_explanation())
    assert len(store) == 2
    assert store.bytes <= store.max_bytes


def test_summary_shows_prompt_completion_and_grounding():
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhich one?<|im_end|>\n"
            "<|im_start|>assistant\nThe first.")
    explanation = _explanation(text=text, tokens=3, grounding={
        "grounding_score": 0.4, "low_grounding": False, "sources": [{}, {}]})
    explanation["tokens"][1]["start"] = text.index("The")
    RecentExplanations().add(explanation)
    summary = webview.summarize(explanation, 0.0)
    assert summary["prompt"] == "Which one?"  # the last message, without template markers
    assert summary["completion"] == "The first."
    assert (summary["grounding_score"], summary["num_sources"]) == (0.4, 2)


# --- unit: routes -----------------------------------------------------------------------------------
@pytest.fixture
def app_client():
    app = FastAPI()
    store = RecentExplanations(capacity=4)
    webview.attach(app, store)
    return TestClient(app), store


def test_routes_serve_the_page_and_explanations(app_client):
    client, store = app_client
    for path in ("/pelrp", "/pelrp/"):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script src="/pelrp/static/pelrp.js">' in page.text
    assert client.get("/pelrp/static/pelrp.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/pelrp/static/pelrp.css").status_code == 200
    missing = client.get("/pelrp/static/webview.py")
    assert missing.status_code == 404 and "pelrp.css, pelrp.js" in missing.json()["error"]["message"]

    key = store.add(_explanation())
    other = store.add(_explanation())
    assert client.get(f"/v1/explanations/{key}").json()["id"] == key  # the id is the capability
    # ids are capabilities: the server lists only the ids it is given
    refused = client.get("/v1/explanations")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "ids"
    assert "lists only the ids you name" in refused.json()["error"]["message"]
    listed = client.get("/v1/explanations", params={"ids": f"{key},expl-{'e' * 32}"}).json()
    assert [item["id"] for item in listed["data"]] == [key] and other != key
    assert client.get("/v1/explanations", params={"ids": "nope"}).status_code == 400

    unknown = client.get("/v1/explanations/expl-" + "f" * 32)
    assert unknown.status_code == 404
    assert "keeps the last 4 explanations" in unknown.json()["error"]["message"]
    malformed = client.get("/v1/explanations/42")
    assert malformed.status_code == 404
    assert "not an explanation id" in malformed.json()["error"]["message"]


def test_store_keeps_each_explanation_for_its_api_key_and_forgets_it_after_the_ttl():
    """Finding 2 (explanations readable by every client), on the store: an explanation made
    with one API key is neither read nor listed with another key or without one."""
    store = RecentExplanations(capacity=8)
    mine = store.add(_explanation(), owner="key:a")
    theirs = store.add(_explanation(), owner="key:b")
    assert store.get(mine, "key:a") is not None
    assert store.get(mine, "key:b") is None and store.get(mine, None) is None
    assert store.summaries("key:a") == []  # nobody lists ids they did not name
    assert store.summaries(None, ids=[mine, theirs]) == []  # ids do not open owned ones
    assert store.summaries("key:a", ids=[mine, theirs])[0]["id"] == mine
    assert store.summaries("key:a", ids=[theirs]) == []
    assert len(store.summaries(everyone=True)) == 2

    short = RecentExplanations(capacity=8, ttl_seconds=0.05)
    gone = short.add(_explanation())
    assert short.get(gone) is not None
    import time
    time.sleep(0.1)
    assert short.get(gone) is None and len(short) == 0 and short.bytes == 0


def test_routes_scope_explanations_to_the_api_key_and_the_operator_listing(monkeypatch):
    """The routes behind vLLM's own --api-key middleware: 401 without a key; each key sees its
    own explanations only; the operator listing needs its own setting and key."""
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    monkeypatch.setenv("VLLM_PELRP_OPERATOR_KEY", "operator-secret")
    app = FastAPI()
    app.state.pelrp_api_keys = True
    store = RecentExplanations(capacity=8)
    webview.attach(app, store)
    app.add_middleware(AuthenticationMiddleware, tokens=["key-a", "key-b"])
    client = TestClient(app)
    a, b = ({"Authorization": f"Bearer {k}"} for k in ("key-a", "key-b"))
    mine = store.add(_explanation(), owner=webview.owner_of(_request_with(a)))
    assert client.get("/v1/explanations").status_code == 401
    assert client.get(f"/v1/explanations/{mine}").status_code == 401
    assert client.get(f"/v1/explanations/{mine}", headers=a).json()["id"] == mine
    assert client.get("/v1/explanations", headers=a).status_code == 400  # ids are named
    listed = client.get("/v1/explanations", params={"ids": mine}, headers=a).json()["data"]
    assert [i["id"] for i in listed] == [mine]
    hidden = client.get(f"/v1/explanations/{mine}", headers=b)
    assert hidden.status_code == 404 and "that you can read" in hidden.json()["error"]["message"]
    assert client.get("/v1/explanations", params={"ids": mine}, headers=b).json()["data"] == []
    everyone = client.get("/v1/explanations", params={"scope": "all"}, headers=b)
    assert everyone.status_code == 403 and "x-pelrp-operator-key" in everyone.text
    operator = client.get("/v1/explanations", params={"scope": "all"},
                          headers={**b, "x-pelrp-operator-key": "operator-secret"})
    assert [i["id"] for i in operator.json()["data"]] == [mine]
    assert client.get("/pelrp").status_code == 200  # the page itself holds no data


def _request_with(headers):
    from starlette.requests import Request

    app = FastAPI()
    app.state.pelrp_api_keys = True
    return Request({"type": "http", "app": app, "headers": [
        (k.lower().encode(), v.encode()) for k, v in headers.items()]})


def test_static_files_reference_no_other_host():
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        # the SVG namespace is a name, not a request
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}", text)) - {"http://www.w3.org"}
        assert not urls, (path.name, urls)
        assert "@import" not in text and "@font-face" not in text


# --- browser ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    return shared_server(request.config, tmp_path_factory)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run scripts/setup.sh"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.mark.slow
def test_page_explains_a_prompt_with_documents(server, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(server + "/pelrp")
    # the server runs with --api-key: the page is served, its data routes answer 401 and the
    # page asks for the key
    page.wait_for_selector("#key-form:not([hidden])")
    assert "needs an API key" in page.inner_text("#key-reason")
    page.fill("#api-key", API_KEY)
    page.click("#key-form button")
    page.wait_for_function("document.getElementById('model-name').textContent.length > 0")
    assert page.is_hidden("#key-form")

    page.fill("#prompt", QUESTION)
    for text in DOCUMENTS:
        page.click("#add-document")
        page.locator(".document textarea").last.fill(text)
    page.click("#add-document")  # one more, then removed again
    page.locator(".remove-document").last.click()
    assert page.locator(".document").count() == len(DOCUMENTS)
    page.click("#more summary")
    page.fill("#max-tokens", "16")
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions"),
                              timeout=600_000) as answer:
        page.click("#submit")
    body = answer.value.json()
    explanation = body["choices"][0]["explanation"]
    page.wait_for_selector("#result[data-state=done]", timeout=30_000)

    # the page shows exactly what the server returned
    assert page.locator("#heatmap .tok").count() == len(explanation["tokens"])
    assert page.locator("#heatmap [data-part=completion] .tok").count() == (
        len(explanation["tokens"]) - explanation["prompt_length"])
    grounding = explanation["grounding"]
    assert len(grounding["sources"]) == len(DOCUMENTS)
    assert page.locator(".source-bar").count() == len(DOCUMENTS)
    assert page.inner_text("#grounding-score") == f"{grounding['grounding_score']:.2f}"
    assert page.locator("#positional-plot svg .pos-bars rect").count() == len(explanation["tokens"])
    assert page.inner_text("#result-id") == explanation["id"]
    in_sources = sum(s["token_end"] - s["token_start"] for s in grounding["sources"])
    assert page.locator("#heatmap .tok.in-source").count() == in_sources

    # hover: the tooltip shows the token's values
    strongest = max(range(len(explanation["tokens"])),
                    key=lambda i: abs(explanation["combined_relevance"][i]))
    page.hover(f'#heatmap .tok[data-index="{strongest}"]')
    tip = page.inner_text("#tooltip")
    assert f"#{strongest}" in tip
    assert f"{explanation['token_relevance'][strongest]:.4f}" in tip
    assert f"{explanation['positional_relevance'][strongest]:.4f}" in tip

    # the screenshot shows the hover on the completion token with the largest |combined|
    answer = max(range(explanation["prompt_length"], len(explanation["tokens"])),
                 key=lambda i: abs(explanation["combined_relevance"][i]))
    page.hover(f'#heatmap .tok[data-index="{answer}"]')
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webview.png"), full_page=True)

    # reopen by id, as a link would; the recent list shows it
    page.goto(f"{server}/pelrp?id={explanation['id']}")
    page.wait_for_selector("#result[data-state=done]")
    assert page.inner_text("#result-id") == explanation["id"]
    assert page.locator("#heatmap .tok").count() == len(explanation["tokens"])
    page.wait_for_selector(f'#recent-list a:text("{explanation["id"]}")')

    # a given completion goes to /v1/explain (nothing generated), documents and all
    page.fill("#prompt", QUESTION)
    page.click("#add-document")
    page.locator(".document textarea").last.fill(DOCUMENTS[0])
    page.click("#more summary")
    page.fill("#completion", "gcal prints calendars.")
    with page.expect_response(lambda r: r.url.endswith("/v1/explain"), timeout=600_000) as given:
        page.click("#submit")
    given_explanation = given.value.json()
    page.wait_for_selector(f'#result-id:text("{given_explanation["id"]}")', timeout=30_000)
    assert page.locator("#heatmap .tok").count() == len(given_explanation["tokens"])
    assert page.locator(".source-bar").count() == 1
    assert given_explanation["text"].endswith("gcal prints calendars.")

    # an unknown id: the server's 404 message on the page
    page.fill("#open-id", "expl-" + "0" * 32)
    page.click("#open-form button")
    page.wait_for_selector("#status.error")
    assert "404" in page.inner_text("#status")

    origin = urlsplit(server)
    others = [url for url in requested if urlsplit(url)[:2] != origin[:2]]
    assert not others, others
    assert any(url.endswith("/pelrp/static/pelrp.js") for url in requested)
    page.close()

    # another client (its own browser context and API key) sees none of it
    context = browser.new_context()
    other = context.new_page()
    other.goto(f"{server}/pelrp?id={explanation['id']}")
    other.wait_for_selector("#key-form:not([hidden])")
    other.fill("#api-key", OTHER_API_KEY)
    other.click("#key-form button")
    other.wait_for_function("document.getElementById('status').textContent.includes('404')")
    assert "that you can read" in other.inner_text("#status")
    other.wait_for_selector("#recent-list li")
    assert explanation["id"] not in other.inner_text("#recent-list")
    assert given_explanation["id"] not in other.inner_text("#recent-list")
    context.close()


# --- encoders (wire format 2.1): a stored similarity explanation, no model --------------------------
def test_summary_of_an_encoder_explanation():
    from test_render import make_similarity

    wire = json.loads(make_similarity().model_dump_json())
    wire["text"] = "[CLS] the cat sits on the mat. [SEP]"
    wire["other"]["text"] = "[CLS] a feline rests on a rug. [SEP]"
    RecentExplanations().add(wire)
    summary = webview.summarize(wire, 0.0)
    assert summary["target_kind"] == "similarity" and summary["target_value"] == wire["target"]["value"]
    assert summary["prompt"] == "the cat sits on the mat." and summary["completion"] == ""
    assert summary["other"] == "a feline rests on a rug."
    assert webview.summarize(_explanation(id="expl-" + "b" * 32), 0.0)["other"] is None


@pytest.fixture(scope="module")
def page_only_server():
    """The page and its routes on a bare FastAPI app (uvicorn in a thread): no model, a store to
    put explanations in."""
    import socket
    import threading
    import time

    import uvicorn

    app = FastAPI()
    store = RecentExplanations(capacity=8)
    webview.attach(app, store)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", store
    server.should_exit = True
    thread.join(10)


def test_page_draws_a_similarity_side_by_side(page_only_server, browser):
    """A similarity explanation reopened by id: query and document side by side, each with its
    heatmap and its position-table plot; the tooltip gives the hovered side's numbers."""
    from test_render import make_explanation, make_similarity

    url, store = page_only_server
    explanation = make_similarity()
    other = explanation.other
    key = store.add(json.loads(explanation.model_dump_json()))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{url}/pelrp?id={key}")
    page.wait_for_selector("#result[data-state=done]")

    assert page.locator("#heatmap.pair .side").count() == 2
    assert page.locator("#heatmap [data-part=query] .tok").count() == len(explanation.tokens)
    assert page.locator("#heatmap [data-part=document] .tok").count() == len(other.tokens)
    assert page.locator("#heatmap [data-part=completion]").count() == 0
    plots = page.locator("#positional-plot svg")
    assert plots.count() == 2
    assert plots.nth(0).locator(".pos-bars rect").count() == len(explanation.tokens)
    assert plots.nth(1).locator(".pos-bars rect").count() == len(other.tokens)
    assert "learned position table" in page.inner_text("#positional-legend")
    assert "RoPE" not in page.inner_text("#positional-legend")
    assert f"cosine {explanation.target.value:.4f}" in page.inner_text("#result-meta")
    conservation = page.inner_text("#conservation")
    assert "query" in conservation and "document" in conservation
    assert "position_embedding (learned position table)" in conservation
    assert "Σ token-type relevance" in conservation

    page.hover('#heatmap .tok[data-side="other"][data-index="2"]')
    tip = page.inner_text("#tooltip")
    assert "document #2" in tip and f"{other.token_relevance[2]:.4f}" in tip
    assert f"{other.token_type_relevance[2]:.4f}" in tip
    assert page.locator('.tok.active[data-side="other"]').count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webview_similarity.png"), full_page=True)
    page.wait_for_selector("#recent-list li a")
    assert "≈" in page.inner_text("#recent-list")

    # then a rotary decoder's explanation on the same page: prompt and completion, one plot
    rotary = make_explanation()
    key = store.add(json.loads(rotary.model_dump_json()))
    page.fill("#open-id", key)
    page.click("#open-form button")
    page.wait_for_selector(f'#result-id:text("{key}")')
    assert page.locator("#heatmap.pair").count() == 0
    assert page.locator("#heatmap [data-part=prompt] .tok").count() == rotary.prompt_length
    assert page.locator("#heatmap [data-part=completion] .tok").count() == (
        len(rotary.tokens) - rotary.prompt_length)
    assert page.locator("#positional-plot svg").count() == 1
    assert "RoPE" in page.inner_text("#positional-legend")
    page.hover('#heatmap .tok[data-index="5"]')
    assert f"{rotary.token_relevance[5]:.4f}" in page.inner_text("#tooltip")
    assert errors == []
    page.close()


def _image_explanation():
    """A CLIP image–text explanation (random weights: test_engine_clip's model), as served."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from vllm_pelrp.image_pipeline import ImageJob, ImageModel, explain_image
    from vllm_pelrp.pipeline import Float32Array

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, vocab_size=50, max_position_embeddings=16,
                         eos_token_id=9, bos_token_id=1, pad_token_id=0),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, image_size=16, patch_size=4),
        projection_dim=8)).eval()
    ids = [1, 12, 30, 9]
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))
    job = ImageJob(pixels=Float32Array.from_tensor(image), target={"similarity": ids},
                   text_tokens=["<|startoftext|>", "red</w>", "cat</w>", "<|endoftext|>"])
    explanation = explain_image(ImageModel.from_hf(model), job, model_name="clip")
    from PIL import Image

    from vllm_pelrp.image_pipeline import processed_image_url

    class Identity:  # the picture is already the model's size
        def __call__(self, picture, **_):
            import numpy as np

            return {"pixel_values": np.asarray(picture).transpose(2, 0, 1)[None]}

    picture = Image.fromarray((image.permute(1, 2, 0).clamp(-1, 1) * 100 + 128).byte().numpy())
    explanation.image = processed_image_url(picture, Identity())
    return explanation


def test_store_keeps_and_summarizes_an_image_explanation():
    wire = _image_explanation().model_dump(mode="json")
    store = RecentExplanations()
    key = store.add(wire, owner="key:a")
    assert ID_PATTERN.match(key) and wire["id"] == key
    assert json.loads(store.get(key, "key:a"))["patch_relevance"] == wire["patch_relevance"]
    assert store.get(key, "key:b") is None  # another key's explanation stays unseen
    summary = store.summaries("key:a", ids=[key])[0]
    assert summary["kind"] == "image" and summary["num_tokens"] == 16
    assert summary["prompt"] == "image 16×16" and summary["other"] == "red cat"
    assert summary["target_kind"] == "similarity"


def test_page_draws_an_image_explanation(page_only_server, browser):
    """An image explanation reopened by id: the patches', positions' and pixels' grids as
    canvases coloured by sign, the text's tokens, both sides' conservation; then a text
    explanation on the same page shows the token view again."""
    from test_render import make_explanation

    url, store = page_only_server
    explanation = _image_explanation()
    key = store.add(explanation.model_dump(mode="json"))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{url}/pelrp?id={key}")
    page.wait_for_selector("#result[data-state=done]")
    assert page.is_visible("#image-view") and not page.is_visible("#text-view")
    sizes = page.evaluate("""() => Array.from(document.querySelectorAll('#image-grids figure'),
        f => [f.dataset.grid, f.querySelector('canvas').width, f.querySelector('canvas').height])""")
    assert sizes == [["patches", 4, 4], ["positions", 4, 4], ["pixels", 16, 16]]
    # the patches over the image the model saw (its PNG decoded by the browser)
    assert page.evaluate("""() => { const img = document.querySelector(
        '[data-grid=patches] .overlay img'); return img.complete && img.naturalWidth; }""") == 16
    values = explanation.patch_relevance.values
    r, c = max(((r, c) for r in range(4) for c in range(4)), key=lambda rc: abs(values[rc[0]][rc[1]]))
    red, _, blue = page.evaluate(
        """([r, c]) => Array.from(document.querySelector('[data-grid=patches] canvas')
        .getContext('2d').getImageData(c, r, 1, 1).data).slice(0, 3)""", [r, c])
    assert (red > blue) == (values[r][c] > 0)  # the strongest patch in its sign's colour
    assert page.locator("#image-text-tokens .chip").count() == 4
    assert "cat" in page.inner_text("#image-text-tokens")
    conservation = page.inner_text("#conservation")
    assert "image" in conservation and "text" in conservation
    assert f"{explanation.conservation.explained:.6f}" in conservation
    assert f"cosine similarity {explanation.target.value:.4f}" in page.inner_text("#result-meta")
    assert "class token" in page.inner_text("#image-prefix")
    page.wait_for_selector("#recent-list li a")
    assert "image 16×16 ≈ red cat" in page.inner_text("#recent-list")
    assert "16 patches" in page.inner_text("#recent-list")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webview_image.png"), full_page=True)

    rotary = make_explanation()
    other = store.add(json.loads(rotary.model_dump_json()))
    page.fill("#open-id", other)
    page.click("#open-form button")
    page.wait_for_selector(f'#result-id:text("{other}")')
    assert page.is_visible("#text-view") and not page.is_visible("#image-view")
    assert page.locator("#heatmap [data-part=prompt] .tok").count() == rotary.prompt_length
    assert errors == []
    page.close()


# --- the HTML file (Explanation.to_html): the same script, offline, no server ----------------------
def _open_file(browser, tmp_path, explanation, name, top_k=10):
    """Open ``explanation.to_html()`` from disk in a context with the network off; every request
    the page makes is recorded (only the file itself may be one)."""
    path = tmp_path / f"{name}.html"
    path.write_text(explanation.to_html(top_k=top_k), encoding="utf-8")
    context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
    context.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:")
                  else route.continue_())
    page = context.new_page()
    requested, errors = [], []
    page.on("request", lambda r: requested.append(r.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.as_uri())
    page.wait_for_selector("#result[data-state=done]")
    return context, page, requested, errors, path


def _texts(page, selector):
    return page.evaluate("(s) => Array.from(document.querySelectorAll(s), n => n.textContent)",
                         selector)


def test_html_file_draws_offline_what_the_web_view_draws(browser, tmp_path):
    """A grounded rotary explanation with per-layer relevance, opened as a file with the network
    off: heatmap, positional plot, per-layer plot, source bars, sentences, top tokens and
    conservation are drawn from the embedded JSON; the view and a per-token row recolour the
    tokens; nothing is requested. Screenshot: /tmp/render_offline.png."""
    from test_render import make_explanation, make_grounded

    from vllm_pelrp.terminal import display_token

    explanation = make_grounded()
    context, page, requested, errors, path = _open_file(browser, tmp_path, explanation, "grounded")
    tokens, n = explanation.tokens, len(explanation.tokens)
    assert page.is_hidden("#ask") and page.is_hidden("#recent") and page.is_hidden("#key-form")
    assert page.inner_text("#model-name") == explanation.model
    # the heatmap: every token, its text as the terminal shows it, prompt and completion
    assert _texts(page, "#heatmap .tok") == [display_token(t.text) for t in tokens]
    assert page.locator("#heatmap [data-part=completion] .tok").count() == n - explanation.prompt_length
    in_sources = sum(s.token_end - s.token_start for s in explanation.grounding.sources)
    assert page.locator("#heatmap .tok.in-source").count() == in_sources
    # the positional plot, one bar per position; the per-layer plot and its sums
    assert page.locator("#positional-plot svg .pos-bars rect").count() == n
    assert "RoPE" in page.inner_text("#positional-legend")
    layers = explanation.positional_relevance_per_layer
    assert page.is_visible("#layer-plot svg")
    assert page.locator("#layer-plot rect.layer-cell").count() == sum(
        1 for layer in layers for c, s in zip(layer.cos, layer.sin) if c + s != 0)
    assert page.locator("#layer-sums tr").count() == len(layers) + 1
    # grounding: the score, one bar per source, the outside shares, the sentence
    grounding = explanation.grounding
    assert page.inner_text("#grounding-score") == f"{grounding.grounding_score:.2f}"
    assert page.locator(".source-bar").count() == len(grounding.sources) == 2
    assert page.locator("#source-bars .bar-label").count() == len(grounding.sources) + 2
    assert "document 1 · document · tokens 1–3" in page.get_attribute(
        "#source-bars .bar-label >> nth=0", "title")
    assert "Paris <b>bold</b>" in page.inner_text("#sentences")
    # the top tokens by |combined|, the conservation numbers
    top = explanation.top_tokens(10)
    assert page.locator("#top-tokens tr").count() == len(top) + 1
    first = _texts(page, "#top-tokens tr:nth-child(2) td")
    assert first[1] == str(top[0][0].index) and first[4] == f"{top[0][1]:.4f}"
    conservation = page.inner_text("#conservation")
    assert f"{explanation.conservation.token_sum:.4f}" in conservation
    assert f"{100 * explanation.positional_share:.1f} %" in conservation
    assert "7 prompt + 4 completion" in conservation
    # hover: the token's numbers
    page.hover('#heatmap .tok[data-index="5"]')
    tip = page.inner_text("#tooltip")
    assert "105" in tip and f"{explanation.token_relevance[5]:.4f}" in tip
    assert f"{explanation.positional_parts[0].relevance[5]:.4f}" in tip
    page.mouse.move(0, 0)
    # the token view: its scale and its top token
    page.click("#view-select label:has-text('token') >> nth=0")
    assert page.inner_text("#view-name") == "token"
    assert page.inner_text("#max-abs") == f"{max(map(abs, explanation.token_relevance)):.4f}"
    assert _texts(page, "#top-tokens tr:nth-child(2) td")[1] == "5"  # "</script>": 2.0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path="/tmp/render_offline.png", full_page=True)
    assert errors == [] and set(requested) <= {path.as_uri()}, (errors, requested)
    context.close()

    # per-token rows: a click recolours the tokens by that row (inputs after it: no relevance)
    explanation = make_explanation()
    context, page, requested, errors, path = _open_file(browser, tmp_path, explanation, "rows")
    assert page.locator("#rows tr.row").count() == len(explanation.rows)
    assert page.is_hidden("#row-shown") and page.is_hidden("#grounding")
    last = f'#heatmap .tok[data-index="{n - 1}"]'
    background = "getComputedStyle(document.querySelector(s)).backgroundColor"
    assert not page.evaluate(f"(s) => {background}", last).endswith(", 0)")
    page.click('#rows tr.row[data-row="1"]')
    assert page.is_visible("#row-shown")
    assert explanation.rows[1].target.description in page.inner_text("#row-label")
    assert page.evaluate(f"(s) => {background}", last).endswith(", 0)")
    page.click("#row-reset")
    assert page.is_hidden("#row-shown")
    assert not page.evaluate(f"(s) => {background}", last).endswith(", 0)")
    assert errors == [] and set(requested) <= {path.as_uri()}, (errors, requested)
    context.close()


def test_html_file_of_encoder_explanations(browser, tmp_path):
    """A similarity (two texts side by side, token types, a learned position table) and a
    dimension target, as files, offline; top_k from to_html."""
    from test_render import QUERY_PIECES, make_additive_explanation, make_gpt2, make_similarity

    from vllm_pelrp.explanation import ResolvedTarget

    explanation = make_similarity()
    other = explanation.other
    context, page, requested, errors, path = _open_file(browser, tmp_path, explanation, "similarity",
                                                        top_k=3)
    assert page.locator("#heatmap.pair .side").count() == 2
    assert page.locator("#heatmap [data-part=query] .tok").count() == len(explanation.tokens)
    assert page.locator("#heatmap [data-part=document] .tok").count() == len(other.tokens)
    assert page.locator("#positional-plot svg").count() == 2
    assert "learned position table" in page.inner_text("#positional-legend")
    assert page.locator("#top-tokens .side table").count() == 2
    assert page.locator("#top-tokens .side tr").count() == 2 * (3 + 1)
    assert "token type" in page.inner_text("#view-select")
    assert page.is_hidden("#layers") and page.is_hidden("#rows-section")
    page.click("#view-select label:has-text('token type')")
    assert page.inner_text("#max-abs") == "{:.4f}".format(max(
        map(abs, explanation.token_type_relevance + other.token_type_relevance)))
    assert errors == [] and set(requested) <= {path.as_uri()}, (errors, requested)
    context.close()

    target = ResolvedTarget(kind="dimension", positions=[], token_ids=[], dimension=3, value=0.2431,
                            description="dimension 3 of the pooled embedding: 0.2431")
    for name, explanation in (("dimension", make_additive_explanation(QUERY_PIECES, target,
                                                                       logit=0.2431)),
                              ("gpt2", make_gpt2())):
        context, page, requested, errors, path = _open_file(browser, tmp_path, explanation, name)
        if name == "dimension":
            assert page.locator("#heatmap [data-part=input] .tok").count() == len(explanation.tokens)
            assert "target value" in page.inner_text("#conservation")
            assert "token type" in page.inner_text("#view-select")
        else:
            assert page.locator("#heatmap [data-part=prompt] .tok").count() == 5
            assert page.locator("#heatmap [data-part=completion] .tok").count() == 2
            assert "token type" not in page.inner_text("#view-select")
        assert "learned position table" in page.inner_text("#positional-legend")
        assert "RoPE" not in page.inner_text("#positional-legend")
        assert errors == [] and set(requested) <= {path.as_uri()}, (errors, requested)
        context.close()
