"""Running a validated prompt: topological order, cached outputs, progress, interrupt, errors.

Events are ComfyUI's WebSocket messages (type and data), handed to an `emit` callback in ComfyUI's
order: execution_start, execution_cached, then per node executing / progress / executed, then
execution_success, execution_error or execution_interrupted. The caller (the queue, or `zimage run`)
stores history and sends the closing `executing` with node null.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from zimage_serve.engine.devices import device_stats
from zimage_serve.engine.placement import Placement
from zimage_serve.errors import ZImageError
from zimage_serve.identity import LOCAL, Identity
from zimage_serve.limits import Limits
from zimage_serve.workflow.cache import DEFAULT_CACHE_BYTES, CacheEntry, OutputCache, signature
from zimage_serve.workflow.context import Interrupted, NodeContext, Stop
from zimage_serve.workflow.events import CLOSING, execution_error, now_ms
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.naming import RunOutputs
from zimage_serve.workflow.output_journal import OutputJournal
from zimage_serve.workflow.previews import PreviewSettings, RunPreviews
from zimage_serve.workflow.spec import Link, Node
from zimage_serve.workflow.validate import is_link, link_source

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any]], None]


@dataclass
class RunResult:
    prompt_id: str
    status: str  # "success", "error" or "interrupted"
    outputs: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # node id → ui (history "outputs")
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # history "status.messages"
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def closing(self) -> tuple[str, dict[str, Any]] | None:
        """The run's closing event (`execution_success`, `_error` or `_interrupted`), which it does not emit."""
        last = self.messages[-1] if self.messages else None
        return last if last is not None and last[0] in CLOSING else None


class RunTimedOut(ZImageError):
    """A run stopped by its time limit: reported as an error (type `Timeout`) with the limit named."""


class Executor:
    """Runs prompts, several at once from several threads if asked; `interrupt` and `free` may be called
    from any thread.

    Concurrent runs share the cache: a node another run is computing right now (loading the same
    model, say) is waited for, not computed twice. Runs that patch a model's weights (LoRA) take those
    weights alone for their sampling (`engine.weight_lock`).
    """

    def __init__(
        self,
        nodes: Mapping[str, type[Node]],
        folders: Folders,
        placement: Placement | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        limits: Limits | None = None,
        journal: OutputJournal | None = None,
        previews: PreviewSettings | None = None,
    ) -> None:
        self.nodes, self.folders = nodes, folders
        self.previews = previews or PreviewSettings()
        self.limits = limits or Limits()
        self.journal = journal  # where runs note the files they write (None: not noted, as for `zimage run`)
        self.placement = placement or Placement.choose()
        self.cache = OutputCache(cache_bytes)
        self._lock = threading.Lock()
        self._active: dict[str, _Run] = {}  # prompt id → its run
        self._computing: set[str] = set()  # signatures of the nodes some run is computing now
        self._computed = threading.Condition(self._lock)  # notified when one of them is done
        self._waiting = 0  # runs waiting on _computed: most releases have none to wake

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Stop `prompt_id` (or every running prompt) before its next node or sampling step."""
        with self._lock:
            runs = [r for i, r in self._active.items() if prompt_id is None or i == prompt_id]
        for run in runs:
            run.interrupted.set()
        return bool(runs)

    def free(self, caches: bool = True) -> None:
        """ComfyUI's POST /free: drop every cached output (models included; the next run loads again), or,
        without `caches` and under smart memory, only move the models out of the card (the next run brings
        them back from host memory). With everything kept on the card, unloading a model means dropping it."""
        if caches or self.placement.residency is None:
            self.cache.clear()
        else:
            self.placement.residency.free()

    # -- the files runs write (see workflow/output_journal.py) -----------------------------------------
    def discard_outputs(self, prompt_id: str) -> int:
        """Remove the files an unfinished run of the prompt wrote (before it runs again); how many."""
        return self.journal.undo(prompt_id) if self.journal is not None else 0

    def settle_outputs(self, prompt_id: str) -> None:
        """The prompt's end is recorded: its files are its own for good."""
        if self.journal is not None:
            self.journal.settle(prompt_id)

    def unsettled(self) -> list[str]:
        """Prompts whose files are noted but whose end was never settled (a crash came between)."""
        return self.journal.journaled() if self.journal is not None else []

    def settle_left_over(self, prompt_id: str) -> None:
        """As `settle_outputs`, for a journal a crashed worker left after the prompt's end was recorded."""
        if self.journal is not None:
            self.journal.settle_left_over(prompt_id)

    def device_stats(self) -> dict[str, object]:
        # ComfyUI's entry, plus our own keys (new names; clients that do not know them ignore them).
        stats = {
            **device_stats(self.placement.device),
            "zimage_memory_mode": str(self.placement.memory_mode),
            "zimage_attention": self.placement.fast.attention,
        }
        if self.placement.residency is not None:  # smart memory: what of each loaded component is on the card now
            stats["zimage_resident_gib"] = {
                name: round(gib, 3) for name, gib in self.placement.residency.resident().items()
            }
        return stats

    # -- one run -------------------------------------------------------------------------------------
    def run(
        self,
        prompt_id: str,
        prompt: dict[str, Any],
        outputs: list[str],
        extra_data: dict[str, Any] | None = None,
        emit: Emit | None = None,
        identity: Identity = LOCAL,
        still_held: Callable[[], bool] | None = None,
        count_images: Callable[[int], None] | None = None,
        stop: Stop | None = None,
        watched: Callable[[], bool] | None = None,
    ) -> RunResult:
        """Run a validated prompt for `identity`: its files are that user's, its limits theirs.
        `still_held`: asked before each output takes its final name; False stops the run there (a worker
        that lost its prompt to another writes nothing more). `count_images`: told the images each sampler
        is about to make; what it raises fails the run at that node (a daily quota reached). `stop`: the run's
        stop request, made by the caller (already set: the run stops before its first node). `watched`: whether
        anyone would see a live preview now (None: always made)."""
        run = _Run(
            self, prompt_id, prompt, outputs, extra_data or {}, emit, identity, still_held, count_images, stop, watched
        )
        with self._lock:
            if prompt_id in self._active:
                raise ZImageError(f"prompt {prompt_id} is already running")
            self._active[prompt_id] = run
        try:
            return run.execute()
        finally:
            with self._lock:
                del self._active[prompt_id]
                keep = {s for r in self._active.values() for s in r.signatures.values()}
            self.cache.trim(keep=keep | set(run.signatures.values()))

    # -- shared between runs ---------------------------------------------------------------------------
    def _claim(self, key: str) -> bool:
        """True: this caller computes `key` (then calls `_release`). False: another run was computing it and
        is done now, so the caller looks in the cache again (it finds nothing if that run failed)."""
        with self._lock:
            if key not in self._computing:
                self._computing.add(key)
                return True
            self._waiting += 1
            try:
                while key in self._computing:
                    self._computed.wait()
            finally:
                self._waiting -= 1
            return False

    def _release(self, key: str) -> None:
        with self._lock:
            self._computing.discard(key)
            if self._waiting:
                self._computed.notify_all()


class _Run:
    def __init__(
        self,
        executor: Executor,
        prompt_id: str,
        prompt: dict[str, Any],
        outputs: list[str],
        extra_data: dict[str, Any],
        emit: Emit | None,
        identity: Identity,
        still_held: Callable[[], bool] | None = None,
        count_images: Callable[[int], None] | None = None,
        stop: Stop | None = None,
        watched: Callable[[], bool] | None = None,
    ) -> None:
        self.ex, self.prompt_id, self.prompt, self.outputs = executor, prompt_id, prompt, outputs
        self.identity = identity
        self.folders = executor.folders.space(identity.space)
        self.limits = identity.limits or executor.limits
        self.extra_data = extra_data
        self._emit = emit
        self.result = RunResult(prompt_id, "success")
        self.values: dict[str, tuple[Any, ...]] = {}
        self.signatures: dict[str, str] = {}
        self._links: dict[str, dict[str, tuple[str, int]]] = {}
        self.current_inputs: dict[str, Any] = {}
        self.interrupted = stop if stop is not None else Stop()
        self.files = RunOutputs(prompt_id, executor.journal, still_held) if executor.journal is not None else None
        self.count_images = count_images
        self.previews = RunPreviews(executor.previews, extra_data, prompt_id, self.emit, watched)

    def emit(self, event: str, data: dict[str, Any], record: bool = False) -> None:
        if record:
            self.result.messages.append((event, data))
        if self._emit is not None and event not in CLOSING:  # the closing one is returned (RunResult.closing)
            try:
                self._emit(event, data)
            except Exception:  # a listener's failure (a closed socket, say) must not fail the run
                log.exception("event listener failed on %s", event)

    def execute(self) -> RunResult:
        self.emit("execution_start", {"prompt_id": self.prompt_id, "timestamp": now_ms()}, record=True)
        current = None
        try:
            order = self._order()
            for node_id in order:
                self.signatures[node_id] = self._signature(node_id)
            cached = [n for n in order if self.signatures[n] in self.ex.cache]
            self.result.cached = cached
            self.emit(
                "execution_cached", {"nodes": cached, "prompt_id": self.prompt_id, "timestamp": now_ms()}, record=True
            )
            for node_id in order:
                current = node_id
                self._execute_node(node_id)
        except Interrupted:
            if self.interrupted.timeout is not None:
                self._failed(current, RunTimedOut(self.interrupted.timeout))
            else:
                self._interrupted(current)
        except Exception as exc:
            self._failed(current, exc)
        else:
            self.emit("execution_success", {"prompt_id": self.prompt_id, "timestamp": now_ms()}, record=True)
        return self.result

    # -- ordering and signatures -----------------------------------------------------------------------
    def _sources(self, node_id: str) -> dict[str, tuple[str, int]]:
        """The node's linked inputs (input name → source node, output index); read once per run."""
        found = self._links.get(node_id)
        if found is None:
            node_class = self.ex.nodes[self.prompt[node_id]["class_type"]]
            found = {}
            given = self.prompt[node_id]["inputs"]
            for name in node_class.inputs_for(given):
                value = given.get(name)
                if is_link(value) and (source := link_source(value)) is not None:
                    found[name] = source
            self._links[node_id] = found
        return found

    def _order(self) -> list[str]:
        """Dependencies before dependents, outputs in prompt order; a cycle is an error here too."""
        order: list[str] = []
        state: dict[str, int] = {}
        for output in self.outputs:
            stack: list[tuple[str, list[str]]] = [(output, [s for s, _ in self._sources(output).values()])]
            if output in state:
                continue
            state[output] = 1
            while stack:
                node, pending = stack[-1]
                if not pending:
                    stack.pop()
                    state[node] = 2
                    order.append(node)
                    continue
                source = pending.pop(0)
                if state.get(source) == 1:
                    raise ZImageError(f"dependency cycle through node {source}")
                if source not in state:
                    state[source] = 1
                    stack.append((source, [s for s, _ in self._sources(source).values()]))
        return order

    def _signature(self, node_id: str) -> str:
        node = self.prompt[node_id]
        node_class = self.ex.nodes[node["class_type"]]
        links = {name: (self.signatures[s], i) for name, (s, i) in self._sources(node_id).items()}
        declared = node_class.inputs_for(node["inputs"])
        constants = {k: v for k, v in node["inputs"].items() if k in declared and k not in links}
        try:
            fingerprint = node_class.fingerprint(self.folders, **constants)
        except Exception:  # a fingerprint that fails means "always re-run", as ComfyUI's NaN
            fingerprint = f"unstable-{time.monotonic_ns()}"
        if node_class.output_node or node_class.owned:
            # Files are a user's own: two users never share a saved image (or one read from their uploads);
            # models and text embeddings, whose signatures leave the owner out, stay shared.
            fingerprint = (self.identity.user, fingerprint)
        return signature(node["class_type"], fingerprint, constants, links)

    # -- running nodes -----------------------------------------------------------------------------------
    def _execute_node(self, node_id: str) -> None:
        node = self.prompt[node_id]
        class_type = node["class_type"]
        node_class = self.ex.nodes[class_type]
        key = self.signatures[node_id]
        while True:
            entry = self.ex.cache.get(key)
            if entry is not None:
                self.values[node_id] = entry.outputs
                if node_class.output_node:
                    self._report_ui(node_id, entry.ui)
                return
            if self.ex._claim(key):  # else another run computed this very node: use its result (or retry)
                break
        try:
            self._compute(node_id, class_type, node_class, key)
        finally:
            self.ex._release(key)

    def _compute(self, node_id: str, class_type: str, node_class: type[Node], key: str) -> None:
        if self.interrupted.is_set():
            raise Interrupted(f"interrupted before node {node_id}")
        self.emit("executing", {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id})
        self.current_inputs = {}
        inputs = self._inputs(node_id, node_class)
        ctx = NodeContext(
            folders=self.folders,
            placement=self.ex.placement,
            node_id=node_id,
            prompt=self.prompt,
            extra_pnginfo=self.extra_data.get("extra_pnginfo"),
            on_progress=lambda value, total: self.emit(
                "progress", {"value": value, "max": total, "prompt_id": self.prompt_id, "node": node_id}
            ),
            interrupted=self.interrupted.is_set,
            limits=self.limits,
            outputs=self.files,
            identity=self.identity,
            on_preview=self.previews.for_node(node_id),
        )
        if self.count_images is not None:
            ctx.count_images = self.count_images
        self.current_inputs = inputs
        result = node_class().run(ctx, **node_class.arguments(inputs))
        self.values[node_id] = result.outputs
        self.result.executed.append(node_id)
        self.ex.cache.put(key, CacheEntry(result.outputs, result.ui))
        if result.ui is not None:
            self._report_ui(node_id, result.ui)

    def _report_ui(self, node_id: str, ui: dict[str, list[Any]] | None) -> None:
        if ui is not None:
            self.result.outputs[node_id] = ui
        self.emit("executed", {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": self.prompt_id})

    def _inputs(self, node_id: str, node_class: type[Node]) -> dict[str, Any]:
        raw = self.prompt[node_id]["inputs"]
        inputs: dict[str, Any] = {}
        sources = self._sources(node_id)
        for name, declared in node_class.inputs_for(raw).items():
            if name in sources:
                source, index = sources[name]
                inputs[name] = self.values[source][index]
            elif name in raw and not isinstance(declared, Link):
                inputs[name] = raw[name]
        return inputs

    # -- endings ---------------------------------------------------------------------------------------
    def _base(self, node_id: str | None) -> dict[str, Any]:
        class_type = self.prompt[node_id]["class_type"] if node_id is not None else None
        return {
            "prompt_id": self.prompt_id,
            "node_id": node_id,
            "node_type": class_type,
            "executed": list(self.result.executed),
        }

    def _interrupted(self, node_id: str | None) -> None:
        self.result.status = "interrupted"
        self.emit("execution_interrupted", {**self._base(node_id), "timestamp": now_ms()}, record=True)

    def _failed(self, node_id: str | None, exc: Exception) -> None:
        self.result.status = "error"
        expected = isinstance(exc, ZImageError | ValueError)
        if not expected:
            log.error("node %s failed:\n%s", node_id, "".join(traceback.format_exception(exc)))
        inputs = self.current_inputs if node_id is not None else {}
        base = self._base(node_id)
        kind = "Timeout" if isinstance(exc, RunTimedOut) else f"{type(exc).__module__}.{type(exc).__qualname__}"
        data = execution_error(
            self.prompt_id,
            str(exc) or type(exc).__name__,
            kind,
            node_id=node_id,
            node_type=base["node_type"],
            executed=base["executed"],
            current_inputs={k: [_formatted(v)] for k, v in inputs.items()},
            current_outputs=[n for n in self.values if n != node_id],
        )
        self.result.error = data
        self.emit("execution_error", data, record=True)


def _formatted(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    text = str(value)
    return text if len(text) <= 200 else text[:200] + "…"
