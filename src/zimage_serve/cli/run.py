"""`zimage run WORKFLOW.json`: run a ComfyUI workflow (API or UI format) here, without a server."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from zimage_serve.cli.common import (
    AttentionOption,
    CompileOption,
    Int8MatmulOption,
    ModelsRootOption,
    console,
    console_err,
    fast_path,
    models_roots,
)
from zimage_serve.errors import ZImageError


class WorkflowInvalid(ZImageError):
    """A workflow that fails validation; the message lists every error by node and input."""


def load_workflow(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ZImageError(f"{path}: file not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ZImageError(f"{path}: not a JSON workflow ({exc})") from exc


def run(
    workflow: Annotated[Path, typer.Argument(help="Workflow JSON: API format, or UI format as ComfyUI saves it")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help='Change an input: NODE_ID.INPUT=VALUE, e.g. 6.text="a cat" or 3.seed=42'),
    ] = None,
    models: ModelsRootOption = None,
    output_dir: Annotated[Path, typer.Option(help="Where SaveImage writes")] = Path("outputs"),
    input_dir: Annotated[Path, typer.Option(help="Where LoadImage reads")] = Path("input"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32")] = "auto",
    attention: AttentionOption = "auto",
    compile: CompileOption = "auto",
    int8_matmul: Int8MatmulOption = "auto",
) -> None:
    """Run a workflow and write its outputs; the built-in zimage-nano is listed as a model."""
    # Here, not at the top: `zimage --help` and the other commands do not load the node set (PIL, numpy).
    from zimage_serve.workflow.folders import Folders, builtin_models
    from zimage_serve.workflow.nodes import NODES
    from zimage_serve.workflow.overrides import apply_overrides
    from zimage_serve.workflow.ui_format import is_api_format, to_api
    from zimage_serve.workflow.validate import Validator

    fast = fast_path(attention, compile, device, int8_matmul)
    roots = models_roots(models)
    folders = Folders(roots, input_dir, output_dir, output_dir / "temp", builtin_models())

    data = load_workflow(workflow)
    prompt = to_api(data, NODES)
    # A UI-format file goes into the PNGs as ComfyUI's frontend puts it, so dropping one reopens the graph.
    extra = {} if is_api_format(data) else {"extra_pnginfo": {"workflow": data}}
    apply_overrides(prompt, set_ or [], NODES)
    checked = Validator(NODES, folders).validate(prompt)
    if not checked.ok:
        raise WorkflowInvalid(f"{workflow}: {checked.describe()}")
    if checked.node_errors:
        console_err.print(f"[yellow]warning:[/] {checked.describe()}", highlight=False)

    from zimage_serve.engine.placement import Placement
    from zimage_serve.workflow.execute import Executor

    executor = Executor(NODES, folders, Placement.choose(device, dtype, fast))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console_err, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def on_event(event: str, data: dict[str, Any]) -> None:
            if event == "executing":
                node = checked.prompt[data["node"]]
                bar.update(task, description=f"{data['node']} {node['class_type']}", total=None, completed=0)
            elif event == "progress":
                bar.update(task, total=data["max"], completed=data["value"])

        result = executor.run(uuid.uuid4().hex, checked.prompt, checked.outputs, extra, on_event)
    if result.status == "interrupted":
        raise ZImageError("interrupted")
    if result.error is not None:
        raise ZImageError(
            f"node {result.error['node_id']} ({result.error['node_type']}) failed: {result.error['exception_message']}"
        )
    for ui in result.outputs.values():
        for image in ui.get("images", []):
            folder = folders.output if image["type"] == "output" else folders.temp
            console.print(str(folder / image["subfolder"] / image["filename"]), highlight=False)
