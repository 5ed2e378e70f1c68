"""The web UI in a real browser (Playwright driving Debian's headless Chromium) against a real server:
the official ComfyUI frontend and the sign-in page. Screenshots go to test-artifacts/."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.browser import browser_page
from tests.server import Listening
from tests.support.jobs import history, wait_until
from tests.support.threaded import threaded_server
from tests.support.tokens import make_tokens

# Files the frontend asks for on every start and does without (ComfyUI answers 404 for them too).
TOLERATED_404 = ("/api/userdata/comfy.templates.json", "/api/userdata/workflows%2F.index.json")
OUR_NODES = {"UNETLoader", "CLIPLoader", "VAELoader", "CLIPTextEncode", "KSampler", "EmptySD3LatentImage", "SaveImage"}


def open_frontend(server: Listening, page: Any) -> None:
    page.goto(server.url + "/", wait_until="networkidle", timeout=90_000)
    page.wait_for_function("() => Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > 10")
    page.wait_for_timeout(1500)  # the idle-time fetches (system stats, templates, models)


def untolerated(bad: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return [(status, url) for status, url in bad if not (status == 404 and url.endswith(TOLERATED_404))]


def error_dialogs(page: Any) -> list[str]:
    texts: list[str] = page.evaluate(
        "() => [...document.querySelectorAll('[role=dialog], [role=alertdialog]')].map(d => d.innerText)"
    )
    return [t for t in texts if "error" in t.lower()]


def test_the_frontend_loads_cleanly_and_lists_our_nodes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with threaded_server(data) as server, browser_page() as watched:
        page = watched.page
        open_frontend(server, page)  # a first visit: the frontend stores its new user's settings
        watched.screenshot("frontend-first-visit")
        assert untolerated(watched.bad) == []
        settings = json.loads((data / "userdata" / "default" / "comfy.settings.json").read_text())
        for url, failure in watched.failed:  # requests the page dropped while it set itself up
            assert "ERR_ABORTED" in failure and "/api/settings/" in url, (url, failure)
            assert url.rsplit("/", 1)[1] in settings, url  # ... and that the server had stored
        watched.bad.clear(), watched.failed.clear(), watched.errors.clear()
        page.reload(wait_until="networkidle")
        page.wait_for_function("() => Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > 10")
        page.wait_for_timeout(1500)
        watched.screenshot("frontend")
        assert untolerated(watched.bad) == []
        # The page may cancel a fetch of its own assets it no longer needs (more often on a busy machine);
        # any other dropped request, or a static file dropped by the server, is a failure.
        assert [(u, f) for u, f in watched.failed if not ("/assets/" in u and "ERR_ABORTED" in f)] == []
        tolerated = sum(1 for status, url in watched.bad if status == 404)
        loading = [e for e in watched.errors if e.startswith("Failed to load resource")]
        assert len(loading) == tolerated, watched.errors  # one per tolerated 404, nothing else
        assert [e for e in watched.errors if not e.startswith("Failed to load resource")] == []
        assert error_dialogs(page) == []
        nodes = set(page.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)"))
        assert nodes >= OUR_NODES, OUR_NODES - nodes
        stats = page.evaluate("() => fetch('/api/system_stats').then(r => r.json())")
        assert stats["system"]["required_frontend_version"] == "1.58.1"


def test_the_sign_in_page_sets_a_session_cookie_and_refuses_a_bad_token(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with threaded_server(data, auth="on") as server, browser_page() as watched:
        page = watched.page
        page.goto(server.url + "/", wait_until="networkidle")
        assert page.url.startswith(server.url + "/login")
        page.fill("#token", "zis_not-a-token")
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        assert "not valid" in page.inner_text("[role=alert]")
        watched.screenshot("sign-in-refused")
        page.fill("#token", tokens["user"])
        page.click("button[type=submit]")
        page.wait_for_function("() => Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > 10")
        watched.screenshot("signed-in")
        cookie = next(c for c in page.context.cookies() if c["name"] == "zimage_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["value"].startswith("zis_")
        assert page.evaluate("() => fetch('/api/zimage/usage').then(r => r.json())")["user"] == "alice"
        assert page.evaluate("() => document.cookie") == ""  # not readable by scripts
        # The frontend's WebSocket and /view work with the cookie too.
        status = page.evaluate(
            """() => new Promise(done => {
                const ws = new WebSocket(`ws://${location.host}/ws?clientId=cookie`);
                ws.onmessage = m => { done(JSON.parse(m.data).type); ws.close() };
                ws.onerror = () => done('error') })"""
        )
        assert status == "status"
        # An API client's Bearer token works beside the cookie, and another user's is its own.
        assert server.as_token(tokens["other"]).json("GET", "/api/zimage/usage")[1]["user"] == "bob"
        page.evaluate("() => fetch('/logout', {method: 'POST'})")
        page.goto(server.url + "/", wait_until="networkidle")
        assert page.url.startswith(server.url + "/login")
        assert page.evaluate("() => fetch('/api/queue').then(r => r.status)") == 401
        watched.screenshot("signed-out")


@pytest.mark.parametrize("path", ["/", "/index.html"])
def test_pages_send_a_browser_without_a_credential_to_sign_in(tmp_path: Path, path: str) -> None:
    data = tmp_path / "data"
    make_tokens(data)
    with threaded_server(data, auth="on") as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("GET", path)
        answer = connection.getresponse()
        assert answer.status == 303 and answer.getheader("location") == "/login?" + urlencode({"next": path})
        connection.close()
        assert server.request("GET", "/login")[0] == 200
        assert server.request("GET", "/assets/nothing.js")[0] == 401  # files need a credential too
        status, _, body = server.request(
            "POST",
            "/login",
            raw=b"token=bad&next=//evil.example",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert status == 401 and b'value="/"' in body  # never sends the browser to another site


def test_the_template_browser_offers_ours_and_a_template_runs_from_the_frontend(tmp_path: Path) -> None:
    with threaded_server(tmp_path / "data") as server, browser_page() as watched:
        page = watched.page
        open_frontend(server, page)  # a first visit opens the template browser by itself
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("zimage-nano: shapes in a second").wait_for(timeout=30_000)
        assert dialog.get_by_text("Z-Image-Turbo text to image", exact=True).is_visible()
        assert dialog.get_by_text("Z-Image text to image", exact=True).is_visible()
        titles = page.evaluate("() => document.querySelector('[role=dialog]').innerText")
        start = "Z-Image-Turbo text to image, 4 steps (ComfyUI's first template)"
        assert titles.index(start) < titles.index("Z-Image-Turbo text to image\n")  # the 4-step start first
        assert "Z-Image-Turbo INT8 text to image" in titles and "Z-Image INT8 text to image" in titles
        watched.screenshot("templates")
        page.wait_for_function("() => [...document.querySelectorAll('[role=dialog] img')].every(i => i.complete)")
        sizes = page.evaluate("() => [...document.querySelectorAll('[role=dialog] img')].map(i => i.naturalWidth)")
        assert sizes == [256] * 7, sizes  # every thumbnail, as shipped
        dialog.get_by_text("zimage-nano: shapes in a second").click()
        page.wait_for_function("() => (window.app?.graph?._nodes?.length ?? 0) >= 10", timeout=30_000)
        types = set(page.evaluate("() => window.app.graph._nodes.map(n => n.type)"))
        assert {"UNETLoader", "KSampler", "SaveImage"} <= types
        with page.expect_response(lambda r: "/api/view?" in r.url and r.status == 200, timeout=120_000):
            page.evaluate("() => window.app.queuePrompt(0, 1)")
        page.wait_for_timeout(1000)
        watched.screenshot("frontend-ran-a-template")
        assert untolerated(watched.bad) == [] and error_dialogs(page) == []
        jobs = server.json("GET", "/api/jobs?status=completed")[1]["jobs"]
        assert len(jobs) == 1 and jobs[0]["preview_output"]["filename"].startswith("zimage-nano")

        # A longer run: the sampler node shows the live preview while it samples, as in ComfyUI.
        page.evaluate(
            """() => {
                window.previewsSeen = 0;
                for (const kind of ['b_preview', 'b_preview_with_metadata'])
                    window.app.api.addEventListener(kind, () => { window.previewsSeen += 1; });
                const sampler = window.app.graph._nodes.find(n => n.type === 'KSampler');
                sampler.widgets.find(w => w.name === 'steps').value = 12;
                sampler.widgets.find(w => w.name === 'seed').value = 7;
                const latent = window.app.graph._nodes.find(n => /^Empty.*Latent/.test(n.type));
                for (const name of ['width', 'height']) latent.widgets.find(w => w.name === name).value = 256;
            }"""
        )
        with page.expect_response(lambda r: "/api/view?" in r.url and r.status == 200, timeout=300_000):
            page.evaluate("() => window.app.queuePrompt(0, 1)")
            page.wait_for_function("() => window.previewsSeen > 0", timeout=120_000)
            page.wait_for_timeout(300)  # the frontend draws it on the node
            watched.screenshot("frontend-live-preview")
        assert untolerated(watched.bad) == [] and error_dialogs(page) == []


def test_comfyuis_int8_template_and_v3_nodes_built_in_the_frontend_run(tmp_path: Path) -> None:
    from PIL import Image

    data = tmp_path / "data"
    (data / "input").mkdir(parents=True)
    Image.new("RGB", (32, 24), (200, 40, 90)).save(data / "input" / "red.png")
    with threaded_server(data) as server, browser_page() as watched:
        page = watched.page
        open_frontend(server, page)
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Z-Image INT8 text to image", exact=True).click(timeout=30_000)
        page.wait_for_function(
            "() => window.app.graph._nodes.some(n => n.type === 'SaveImageAdvanced')", timeout=30_000
        )
        sent = page.evaluate("() => window.app.graphToPrompt().then(p => p.output)")
        [saver] = [node for node in sent.values() if node["class_type"] == "SaveImageAdvanced"]
        assert saver["inputs"]["format"] == "png" and saver["inputs"]["format.bit_depth"] == "8-bit"
        assert any(node["class_type"] == "ResolutionSelector" for node in sent.values())
        watched.screenshot("frontend-int8-template")

        # Built by hand: the format's options follow the choice, and the dotted inputs reach the server.
        names = page.evaluate(
            """() => {
                const graph = window.app.graph; graph.clear();
                const load = LiteGraph.createNode('LoadImage'); graph.add(load);
                load.widgets.find(w => w.name === 'image').value = 'red.png';
                const save = LiteGraph.createNode('SaveImageAdvanced'); graph.add(save);
                save.pos = [400, 100];
                load.connect(0, save, 0);
                save.widgets.find(w => w.name === 'filename_prefix').value = 'from-frontend';
                const before = save.widgets.map(w => w.name);
                const format = save.widgets.find(w => w.name === 'format');
                format.value = 'exr'; format.callback?.('exr');
                save.widgets.find(w => w.name === 'format.input_color_space').value = 'linear';
                return {before, after: save.widgets.map(w => w.name)};
            }"""
        )
        assert names["before"] == ["filename_prefix", "format", "format.bit_depth", "format.input_color_space"]
        assert names["after"] == names["before"]
        page.evaluate("() => window.app.queuePrompt(0, 1)")
        wait_until(lambda: "from-frontend" in json.dumps(history(server)))
        [entry] = [e for e in history(server).values() if "from-frontend" in json.dumps(e["outputs"])]
        [(_, outputs)] = [(k, v) for k, v in entry["outputs"].items() if "images" in v]
        assert outputs["images"][0]["filename"] == "from-frontend_00001.exr"
        inputs = next(n for n in entry["prompt"][2].values() if n["class_type"] == "SaveImageAdvanced")["inputs"]
        assert inputs["format"] == "exr" and inputs["format.input_color_space"] == "linear"
        assert (data / "output" / "from-frontend_00001.exr").is_file()

        # An Autogrow input: each connection adds the next numbered input, sent under its dotted name.
        grown = page.evaluate(
            """async () => {
                const graph = window.app.graph; graph.clear();
                const loads = [0, 1].map(() => {
                    const n = LiteGraph.createNode('LoadImage'); graph.add(n);
                    n.widgets.find(w => w.name === 'image').value = 'red.png'; return n;
                });
                const batch = LiteGraph.createNode('BatchImagesNode'); graph.add(batch);
                const save = LiteGraph.createNode('SaveImage'); graph.add(save);
                loads[0].connect(0, batch, batch.inputs.findIndex(i => i.name === 'images.image0'));
                loads[1].connect(0, batch, batch.inputs.findIndex(i => i.name === 'images.image1'));
                batch.connect(0, save, 0);
                save.widgets.find(w => w.name === 'filename_prefix').value = 'grown';
                const sent = (await window.app.graphToPrompt()).output;
                return {inputs: batch.inputs.map(i => i.name), sent: sent[String(batch.id)].inputs};
            }"""
        )
        assert grown["inputs"][:3] == ["images.image0", "images.image1", "images.image2"], grown
        assert set(grown["sent"]) == {"images.image0", "images.image1"}
        page.evaluate("() => window.app.queuePrompt(0, 1)")
        wait_until(lambda: (data / "output" / "grown_00002_.png").is_file())
        assert untolerated(watched.bad) == [] and error_dialogs(page) == []


@pytest.mark.parametrize(("locale", "words"), [("en-US", ("Generate", "Your images")), ("zh-CN", ("生成", "我的图片"))])
def test_the_simple_page_generates_with_progress_and_lists_its_images(
    tmp_path: Path, locale: str, words: tuple[str, str]
) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with threaded_server(data, auth="on") as server, browser_page(locale) as watched:
        page = watched.page
        page.goto(server.url + "/simple", wait_until="networkidle")
        page.fill("#token", tokens["user"])  # sent to sign in first, then back to the page
        page.click("button[type=submit]")
        page.wait_for_url("**/simple")
        page.wait_for_function("() => document.querySelector('#model').options.length > 0")
        assert page.inner_text("#generate") == words[0] and words[1] in page.inner_text("main")
        page.fill(
            "#prompt", "一个红色的圆形在蓝色背景上" if locale.startswith("zh") else "a red circle on a blue background"
        )
        page.select_option("#size", "64x64")
        page.fill("#steps", "3")
        progress: list[float] = []
        page.expose_function("noteProgress", lambda value: progress.append(value))
        page.evaluate(  # every value the page gives the bar, as it gives it
            """() => {
                const bar = document.querySelector('#progress');
                const own = Object.getOwnPropertyDescriptor(HTMLProgressElement.prototype, 'value');
                Object.defineProperty(bar, 'value', {
                    set(v) { own.set.call(this, v); window.noteProgress(v) }, get() { return own.get.call(this) } });
            }"""
        )
        page.click("#generate")
        page.wait_for_selector("#gallery figure img", timeout=120_000)
        page.wait_for_function("() => document.querySelector('#gallery img').complete")
        watched.screenshot(f"simple-{locale}")
        assert any(0 < value < 3 for value in progress), progress  # the bar moved during the steps
        assert page.evaluate("() => document.querySelector('#gallery img').naturalWidth") == 64
        # The job is on the same queue as everything else: the user's jobs list it, another user's do not.
        jobs = server.as_token(tokens["user"]).json("GET", "/api/jobs?status=completed")[1]["jobs"]
        assert len(jobs) == 1
        assert server.as_token(tokens["other"]).json("GET", "/api/jobs")[1]["jobs"] == []
        # Reuse puts the image's settings back in the form.
        page.fill("#steps", "7")
        page.click("#gallery figure button")
        assert page.input_value("#steps") == "3" and page.input_value("#size") == "64x64"
        assert not page.is_checked("#random")
        page.click("#language")  # the switch shows the other language
        assert page.inner_text("#generate") == ("Generate" if locale.startswith("zh") else "生成")
        assert untolerated(watched.bad) == [] and watched.errors == []


def test_the_simple_page_shows_events_that_come_before_its_prompt_is_answered(tmp_path: Path) -> None:
    """A short prompt on a busy machine: every event, its end included, reaches the page before the POST's
    answer does (held back here until the job is in the history)."""
    with threaded_server(tmp_path / "data") as server, browser_page() as watched:
        page = watched.page
        page.goto(server.url + "/simple", wait_until="networkidle")
        page.wait_for_function("() => document.querySelector('#model').options.length > 0")
        page.fill("#prompt", "a red circle on a blue background")
        page.select_option("#size", "64x64")
        page.fill("#steps", "3")
        progress: list[float] = []
        page.expose_function("noteProgress", lambda value: progress.append(value))
        page.evaluate(
            """() => {
                const bar = document.querySelector('#progress');
                const own = Object.getOwnPropertyDescriptor(HTMLProgressElement.prototype, 'value');
                Object.defineProperty(bar, 'value', {
                    set(v) { own.set.call(this, v); window.noteProgress(v) }, get() { return own.get.call(this) } });
            }"""
        )

        def answered_late(route: Any) -> None:
            response = route.fetch()
            prompt_id = response.json()["prompt_id"]
            wait_until(lambda: prompt_id in history(server))
            route.fulfill(response=response)

        page.route("**/api/prompt", answered_late)
        page.click("#generate")
        page.wait_for_selector("#gallery figure img", timeout=120_000)
        page.wait_for_function("() => !document.querySelector('#generate').disabled")
        assert page.inner_text("#status") == "Done"
        assert any(0 < value < 3 for value in progress), progress
        assert untolerated(watched.bad) == [] and watched.errors == []


def test_a_workflow_saved_through_the_ui_is_there_after_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with threaded_server(data) as server, browser_page() as watched:
        page = watched.page
        open_frontend(server, page)
        page.get_by_role("dialog").get_by_text("zimage-nano: shapes in a second").click()
        page.wait_for_function("() => (window.app?.graph?._nodes?.length ?? 0) >= 10")
        page.evaluate("() => { window.app.extensionManager.command.execute('Comfy.SaveWorkflow') }")
        name = page.get_by_role("dialog").locator("input")
        name.fill("kept nano")  # the frontend's own "Save workflow" dialog
        name.press("Enter")
        page.wait_for_function("() => !document.querySelector('[role=dialog] input')")
    assert (data / "userdata" / "default" / "workflows" / "kept nano.json").is_file()
    with threaded_server(data) as server, browser_page() as watched:
        page = watched.page
        open_frontend(server, page)
        page.evaluate("() => { window.app.extensionManager.command.execute('Workspace.ToggleSidebarTab.workflows') }")
        page.get_by_text("kept nano").first.wait_for(timeout=30_000)
        watched.screenshot("saved-workflow-after-restart")
        page.get_by_text("kept nano").first.click()
        page.wait_for_function("() => (window.app?.graph?._nodes?.length ?? 0) >= 10")
        assert "KSampler" in page.evaluate("() => window.app.graph._nodes.map(n => n.type)")
        assert untolerated(watched.bad) == []
