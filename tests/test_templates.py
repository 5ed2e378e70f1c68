"""Templates: rendering by name, parameter errors, inferred parameters, versions, the CLI and the API."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.support.app import serving
from tests.support.cli import run
from tests.support.jobs import wait_until
from tests.support.tokens import make_tokens
from tests.workflows import img2img_workflow, nested_subgraphs
from zimage_serve import workflows
from zimage_serve.limits import Limits
from zimage_serve.templates import Template, TemplateError, TemplateLibrary, TemplateNotFound, TemplateParameterError
from zimage_serve.templates.builtin import builtin, builtin_names
from zimage_serve.templates.infer import infer_parameters
from zimage_serve.templates.source import template_from
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.ui_export import to_ui
from zimage_serve.workflow.ui_format import to_api


def nano() -> Template:
    found = builtin("zimage-nano")
    assert found is not None
    return found


def ui_to_api(data: Any) -> dict[str, Any]:
    return to_api(data, NODES)


def test_the_built_ins_are_one_per_model_and_render_their_shipped_workflow_unchanged() -> None:
    assert builtin_names() == ("zimage-nano", "z-image-turbo", "z-image", "z-image-distill")
    for name, path in (
        ("zimage-nano", workflows.NANO),
        ("z-image-turbo", workflows.TURBO),
        ("z-image", workflows.BASE),
        ("z-image-distill", workflows.DISTILL),
    ):
        template = builtin(name)
        assert template is not None and template.builtin and template.version == 1
        assert template.render() == workflows.load(path)  # the LoRA node is bypassed while unset
    assert "negative" in builtin("z-image").parameters  # type: ignore[union-attr]
    assert "negative" not in nano().parameters  # its negative is a ConditioningZeroOut: nothing to type
    assert nano().native_size == 128


def test_values_go_to_the_node_inputs_their_parameters_name() -> None:
    graph = nano().render(prompt="a blue square", seed=7, width=96, steps=3, sampler="dpmpp_2m", prefix="cats/x")
    assert graph["6"]["inputs"]["text"] == "a blue square"
    assert graph["3"]["inputs"] | {"seed": 7, "steps": 3, "sampler_name": "dpmpp_2m"} == graph["3"]["inputs"]
    assert graph["13"]["inputs"]["width"] == 96 and graph["13"]["inputs"]["height"] == 128
    assert graph["9"]["inputs"]["filename_prefix"] == "cats/x"
    assert nano().render()["6"]["inputs"]["text"] == "一个红色的圆形在蓝色背景上"  # the default stays
    assert workflows.load(workflows.NANO)["3"]["inputs"]["seed"] == 42  # rendering never edits the template


def test_an_optional_lora_node_is_in_the_graph_only_when_named() -> None:
    plain = nano().render()
    assert "40" not in plain and plain["11"]["inputs"]["model"] == ["28", 0]
    with_lora = nano().render(lora_name="style.safetensors", lora_strength=0.5)
    assert with_lora["11"]["inputs"]["model"] == ["40", 0]
    assert with_lora["40"]["inputs"] == {"lora_name": "style.safetensors", "strength_model": 0.5, "model": ["28", 0]}
    assert "40" not in nano().render(lora_name=None)


def test_text_values_from_a_csv_or_the_command_line_are_converted_by_type() -> None:
    graph = nano().render(seed="12", cfg="1.5", steps=" 4 ", width=64.0)
    assert graph["3"]["inputs"]["seed"] == 12 and graph["3"]["inputs"]["cfg"] == 1.5
    assert graph["3"]["inputs"]["steps"] == 4 and graph["13"]["inputs"]["width"] == 64
    assert isinstance(graph["13"]["inputs"]["width"], int)


@pytest.mark.parametrize(
    ("values", "parameter", "reason"),
    [
        ({"seed": "abc"}, "seed", "'abc' is not a whole number"),
        ({"seed": -1}, "seed", "-1 is below the minimum 0"),
        ({"seed": 2**64}, "seed", "is above the maximum"),
        ({"seed": True}, "seed", "True is not a whole number"),
        ({"steps": 2.5}, "steps", "2.5 is not a whole number"),
        ({"cfg": "nan"}, "cfg", "'nan' is not a finite number"),
        ({"cfg": float("inf")}, "cfg", "inf is not a finite number"),
        ({"cfg": [1]}, "cfg", "[1] is not a number"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": "   "}, "prompt", "must not be empty"),
        ({"prompt": 5}, "prompt", "5 is not text"),
        ({"sampler": "lms"}, "sampler", "'lms' is not one of euler, euler_ancestral, heun, dpm_2"),
        ({"stepz": 3}, "stepz", "no such parameter; zimage-nano has prompt, seed"),
        ({"prompt": None}, "prompt", "needs a value"),
    ],
)
def test_a_wrong_value_names_its_parameter_and_why(values: dict[str, Any], parameter: str, reason: str) -> None:
    with pytest.raises(TemplateParameterError) as caught:
        nano().render(values)
    assert list(caught.value.problems) == [parameter]
    assert reason in caught.value.problems[parameter]
    assert str(caught.value).startswith(f"template zimage-nano: {parameter}: ")


def test_every_wrong_value_is_reported_at_once() -> None:
    with pytest.raises(TemplateParameterError) as caught:
        nano().render(seed="x", prompt="", stepz=1, width=0)
    assert set(caught.value.problems) == {"seed", "prompt", "stepz", "width"}


# -- documents and inferred parameters ------------------------------------------------------------------
def test_parameters_are_found_in_a_workflow_that_declares_none() -> None:
    found = infer_parameters(img2img_workflow())
    assert list(found) == ["prompt", "seed", "steps", "cfg", "sampler", "scheduler", "lora_name", "lora_strength",
                           "image", "prefix"]  # fmt: skip
    assert [str(t) for t in found["image"].targets] == ["20.image"] and found["image"].type == "image"
    assert found["lora_name"].default == "style.safetensors" and found["lora_name"].bypass is not None
    assert found["lora_name"].bypass.through == {0: "model", 1: "clip"}
    template = template_from(img2img_workflow(), "img2img", to_api=ui_to_api)
    plain = template.render(lora_name=None)  # LoraLoader bypassed: both its outputs reconnected
    assert (
        "41" not in plain and plain["11"]["inputs"]["model"] == ["28", 0] and plain["6"]["inputs"]["clip"] == ["30", 0]
    )
    base = infer_parameters(workflows.load(workflows.BASE))
    assert [str(t) for t in base["negative"].targets] == ["7.text"] and base["cfg"].default == 4


def test_a_ui_format_workflow_becomes_a_template_of_its_api_graph() -> None:
    ui = to_ui(workflows.load(workflows.NANO), NODES)
    template = template_from(ui, "from-ui", to_api=ui_to_api)
    assert plain(template.workflow) == plain(workflows.load(workflows.NANO))
    assert set(template.parameters) >= {"prompt", "seed", "width", "height", "steps"}
    assert plain(template.render(seed=5))["3"]["inputs"]["seed"] == 5


def plain(prompt: dict[str, Any]) -> dict[str, Any]:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["parameters"]["seed"].update(targets=["99.seed"]), "the workflow has no node 99"),
        (lambda d: d["parameters"]["seed"].update(targets=["3"]), "must name a node input as NODE_ID.INPUT"),
        (lambda d: d["parameters"]["seed"].update(type="number"), "parameters.seed.type: 'number' is not one of"),
        (lambda d: d["parameters"]["seed"].update(default="x"), "parameters.seed.default: 'x' is not a whole number"),
        (lambda d: d["parameters"].update({"Bad-Name": d["parameters"]["seed"]}), "parameters.Bad-Name: a name is"),
        (lambda d: d.update(workflow={"1": {"inputs": {}}}), "workflow.1: a node needs a class_type"),
        (lambda d: d.update(name="Has Spaces"), "name: 'Has Spaces' must be"),
        (lambda d: d.update(format="other/2"), "format: 'other/2' is not zimage-template/1"),
    ],
)
def test_a_broken_template_document_names_the_field(change: Any, message: str) -> None:
    document = nano().to_json()
    change(document)
    with pytest.raises(TemplateError, match=message.replace("(", r"\(")):
        Template.from_json(document)


def test_a_document_round_trips_through_json() -> None:
    document = json.loads(json.dumps(nano().to_json()))
    again = Template.from_json(document)
    assert again.to_json() == nano().to_json() and again.render(seed=3) == nano().render(seed=3)


# -- the library ---------------------------------------------------------------------------------------
def test_adding_makes_versions_and_old_versions_stay_reachable(tmp_path: Path) -> None:
    library = TemplateLibrary(tmp_path / "templates")
    first = library.add(template_from(workflows.load(workflows.NANO), "shapes", to_api=ui_to_api))
    assert first.created and first.template.version == 1 and first.template.created > 0
    again = library.add(template_from(workflows.load(workflows.NANO), "shapes", to_api=ui_to_api))
    assert not again.created and again.template.version == 1  # the same content is not a new version
    changed = workflows.load(workflows.NANO)
    changed["3"]["inputs"]["steps"] = 4
    second = library.add(template_from(changed, "shapes", to_api=ui_to_api))
    assert second.created and second.template.version == 2
    assert library.versions("shapes") == [1, 2]
    assert library.get("shapes").parameters["steps"].default == 4
    assert library.get("shapes", 1).parameters["steps"].default == 8
    with pytest.raises(TemplateNotFound, match="template shapes has no version 3; it has 1, 2"):
        library.get("shapes", 3)
    with pytest.raises(TemplateNotFound, match="template 'nope' does not exist; there are shapes, zimage-nano"):
        library.get("nope")
    assert sorted(p.name for p in (tmp_path / "templates" / "shapes").iterdir()) == ["v1.json", "v2.json"]


def test_built_in_names_are_taken_and_users_see_their_own_then_the_shared_ones(tmp_path: Path) -> None:
    library = TemplateLibrary(tmp_path / "templates")
    with pytest.raises(TemplateError, match="zimage-nano is built in"):
        library.add(template_from(workflows.load(workflows.NANO), "zimage-nano", to_api=ui_to_api))
    library.add(template_from(workflows.load(workflows.NANO), "shared-one", to_api=ui_to_api))
    library.add(template_from(workflows.load(workflows.NANO), "mine", to_api=ui_to_api), user="alice")
    assert "mine" in library.names("alice") and "shared-one" in library.names("alice")
    assert "mine" not in library.names("bob") and "mine" not in library.names()
    with pytest.raises(TemplateNotFound):
        library.get("mine", user="bob")


def test_writers_adding_at_once_each_get_a_version_of_their_own(tmp_path: Path) -> None:
    library = TemplateLibrary(tmp_path / "templates")
    made: list[int] = []

    def add(steps: int) -> None:
        workflow = workflows.load(workflows.NANO)
        workflow["3"]["inputs"]["steps"] = steps
        made.append(library.add(template_from(workflow, "busy", to_api=ui_to_api)).template.version)

    threads = [threading.Thread(target=add, args=(steps,)) for steps in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(made) == list(range(1, 9)) == library.versions("busy")
    assert sorted({library.get("busy", v).parameters["steps"].default for v in made}) == list(range(1, 9))
    assert not [p for p in (tmp_path / "templates" / "busy").iterdir() if p.name.startswith(".")]


# -- the command line ----------------------------------------------------------------------------------
def test_templates_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    workflow = tmp_path / "flow.json"
    workflow.write_text(json.dumps(to_ui(workflows.load(workflows.NANO), NODES)))

    def zimage(*args: str) -> tuple[int, str, str]:
        return run([*args, "--data-dir", str(data)], capsys)

    code, out, err = zimage("templates", "add", str(workflow), "--name", "shapes", "--title", "Shapes")
    assert code == 0 and out.strip() == "shapes v1", err
    _, out, err = zimage("templates", "add", str(workflow), "--name", "shapes")
    assert out.strip() == "shapes v1" and "nothing added" in err
    changed = workflows.load(workflows.NANO)
    changed["3"]["inputs"]["seed"] = 5
    workflow.write_text(json.dumps(changed))
    assert zimage("templates", "add", str(workflow), "--name", "shapes")[1].strip() == "shapes v2"
    listed = zimage("templates", "list")[1]
    assert "shapes" in listed and "zimage-nano" in listed and "built in" in listed
    shown = zimage("templates", "show", "shapes", "--version", "1", "--json")[1]
    assert json.loads(shown)["parameters"]["seed"]["default"] == 42
    table = zimage("templates", "show", "zimage-nano")[1]
    assert "6.text" in table and "unset: node bypassed" in table
    code, _, err = zimage("templates", "show", "nope")
    assert code == 2 and "template 'nope' does not exist" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": 1}')
    code, _, err = zimage("templates", "add", str(bad), "--name", "x")
    assert code == 2 and "neither a template, nor an API-format or UI-format workflow" in err
    code, _, err = zimage("templates", "add", str(workflow), "--name", "z-image")
    assert code == 2 and "z-image is built in" in err


# -- the API -------------------------------------------------------------------------------------------
def test_templates_behind_the_api_add_versions_and_queue_by_name(tmp_path: Path) -> None:
    with serving(tmp_path / "data") as server:
        status, listed = server.json("GET", "/api/zimage/templates")
        assert status == 200 and [t["name"] for t in listed["templates"]] == list(builtin_names())
        ui = to_ui(workflows.load(workflows.NANO), NODES)
        status, added = server.json("POST", "/api/zimage/templates", {"name": "shapes", "workflow": ui})
        assert status == 201 and added["version"] == 1 and added["created"] and "prompt" in added["parameters"]
        status, again = server.json("POST", "/api/zimage/templates", {"name": "shapes", "workflow": ui})
        assert status == 200 and again == {**added, "created": False}
        document = nano().to_json() | {"name": "shapes"}
        document["parameters"]["seed"]["default"] = 9
        status, second = server.json("POST", "/api/zimage/templates", document)
        assert status == 201 and second["version"] == 2
        status, old = server.json("GET", "/api/zimage/templates/shapes?version=1")
        assert status == 200 and old["version"] == 1 and old["versions"] == [1, 2]
        assert old["parameters"]["seed"]["default"] == 42
        assert server.json("GET", "/api/zimage/templates/shapes")[1]["parameters"]["seed"]["default"] == 9
        assert server.json("GET", "/api/zimage/templates/shapes?version=7")[0] == 404
        assert server.json("GET", "/api/zimage/templates/nope")[0] == 404
        assert server.json("GET", "/api/zimage/templates/shapes?version=x")[0] == 400
        status, refused = server.json("POST", "/api/zimage/templates", {"name": "zimage-nano", "workflow": ui})
        assert status == 400 and "built in" in refused["error"]["details"]
        status, refused = server.json("POST", "/api/zimage/templates", {"name": "x", "workflow": {"1": {}}})
        assert status == 400 and refused["error"]["type"] == "invalid_template"

        status, queued = server.json(
            "POST", "/api/zimage/templates/shapes/prompt", {"params": {"prompt": "a green triangle", "seed": 3}}
        )
        assert status == 200 and set(queued) == {"prompt_id", "number", "node_errors"}
        prompt_id = queued["prompt_id"]
        wait_until(lambda: server.json("GET", f"/history/{prompt_id}")[1] != {})
        entry = server.json("GET", f"/history/{prompt_id}")[1][prompt_id]
        assert entry["status"]["status_str"] == "success"
        prompt = entry["prompt"][2]
        assert prompt["6"]["inputs"]["text"] == "a green triangle" and prompt["3"]["inputs"]["seed"] == 3
        assert entry["prompt"][3]["template"] == {"name": "shapes", "version": 2}

        status, wrong = server.json("POST", "/api/zimage/templates/shapes/prompt", {"params": {"seed": "x", "nope": 1}})
        assert status == 400 and wrong["error"]["type"] == "invalid_template_parameters"
        assert set(wrong["error"]["extra_info"]["parameters"]) == {"seed", "nope"}
        assert server.json("POST", "/api/zimage/templates/nope/prompt", {})[0] == 404
        assert server.json("POST", "/api/zimage/templates/shapes/prompt", {"params": []})[0] == 400
        assert server.json("POST", "/api/zimage/templates/shapes/prompt", {"version": 0})[0] == 400


def test_a_ui_workflow_whose_subgraphs_multiply_is_refused_naming_the_node_limit(tmp_path: Path) -> None:
    """Ten levels of subgraphs, each holding four instances of the next: 2.6 KB that flattened to a million
    nodes, for a minute, on the event loop."""
    bomb = nested_subgraphs(10, 4)
    with serving(tmp_path / "data", preload=False, limits=Limits(nodes=300)) as server:
        status, refused = server.json("POST", "/api/zimage/templates", {"name": "bomb", "workflow": bomb})
        assert status == 400 and refused["error"]["type"] == "invalid_template", refused
        assert "1,048,576 nodes in a graph is more than the 300 this server allows (--max-nodes)" in str(refused)
        assert server.json("GET", "/api/zimage/templates/bomb")[0] == 404


def test_each_user_adds_and_sees_their_own_templates(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on", preload=False) as server:
        alice, bob, root = (server.as_token(tokens[k]) for k in ("user", "other", "admin"))
        workflow = workflows.load(workflows.NANO)
        assert alice.json("POST", "/api/zimage/templates", {"name": "mine", "workflow": workflow})[0] == 201
        assert root.json("POST", "/api/zimage/templates", {"name": "team", "workflow": workflow})[0] == 201
        names = {user: [t["name"] for t in s.json("GET", "/api/zimage/templates")[1]["templates"]]
                 for user, s in (("alice", alice), ("bob", bob), ("root", root))}  # fmt: skip
        assert "mine" in names["alice"] and "team" in names["alice"]
        assert "mine" not in names["bob"] and "team" in names["bob"] and "mine" not in names["root"]
        assert bob.json("GET", "/api/zimage/templates/mine")[0] == 404
        assert bob.json("POST", "/api/zimage/templates/mine/prompt", {})[0] == 404
        assert server.json("GET", "/api/zimage/templates")[0] == 401
        assert (data / "templates" / "users" / "alice" / "mine" / "v1.json").is_file()


HOSTILE_TEMPLATES: list[Any] = [
    [],
    "text",
    {"name": 5, "workflow": {}},
    {"name": "x"},
    {"name": "x", "workflow": {"1": {"class_type": "KSampler", "inputs": 5}}},
    {"name": "x", "workflow": {"1": {"class_type": 7}}},
    {"name": "x", "workflow": {"nodes": "many", "links": []}},
    {"name": "x", "workflow": {"nodes": [{"id": 1, "type": "NoSuchNode", "widgets_values": []}], "links": []}},
    {"name": "x", "workflow": {"1": {"class_type": "KSampler", "inputs": {}}}, "parameters": []},
    {"name": "x", "workflow": {"1": {"class_type": "KSampler", "inputs": {}}},
     "parameters": {"seed": {"type": "int", "targets": ["1.seed"], "choices": 5}}},
    {"name": "x", "workflow": {"1": {"class_type": "KSampler", "inputs": {}}},
     "parameters": {"seed": {"type": "int", "targets": ["1.seed"], "min": "low"}}},
    {"name": "x", "workflow": {"1": {"class_type": "KSampler", "inputs": {}}},
     "parameters": {"s": {"type": "string", "targets": ["1.seed"], "bypass": {"node": "1", "through": {"a": 1}}}}},
    {"name": "../../etc", "workflow": workflows.load(workflows.NANO)},
    {"name": "users", "workflow": workflows.load(workflows.NANO)},
    {"name": "x", "workflow": workflows.load(workflows.NANO), "title": ["list"]},
]  # fmt: skip
HOSTILE_VALUES: list[Any] = [
    {"params": {"seed": 10**18 * 100}},
    {"params": {"cfg": 1e308}},
    {"params": {"prompt": {"nested": ["deep"]}}},
    {"params": {"width": -16, "height": "tall"}},
    {"params": {"lora_name": ""}},
    {"params": {}, "version": "2"},
    {"params": {}, "client_id": ["x"]},
    {"params": {}, "extra_data": "x"},
]


def test_hostile_template_bodies_get_a_4xx_naming_the_field(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 4xx for each, never a 500 (the test client would also raise what the application let through)."""
    with serving(tmp_path / "data", preload=False) as server:
        for body in HOSTILE_TEMPLATES:
            status, answer = server.json("POST", "/api/zimage/templates", body)
            assert 400 <= status < 500, (body, status, answer)
        for body in HOSTILE_VALUES:
            status, answer = server.json("POST", "/api/zimage/templates/zimage-nano/prompt", body)
            assert 400 <= status < 500, (body, status, answer)
        for path in ("/api/zimage/templates/..%2F..%2Fetc", "/api/zimage/templates/Bad%20Name/prompt"):
            assert 400 <= server.request("GET" if "prompt" not in path else "POST", path)[0] < 500
        assert not list((tmp_path / "data").glob("etc*"))
    assert not [r for r in caplog.records if r.exc_info], "an error was logged with its traceback"
