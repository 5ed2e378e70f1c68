"""How many images a prompt will make, read from its graph before it runs: what a daily image quota
checks at submission.

Every sampler run makes as many images as the latent it denoises holds, so one latent sampled by six
samplers is six images, and a latent repeated sixteen times is sixteen. A batch follows the graph from
node to node (`Node.batch`: EmptyLatentImage's batch_size, RepeatLatentBatch's amount, two batches
joined ...). What only the run knows (an animated upload's frames, a batch size that comes by a link)
counts as one here; the run counts again as each sampler starts (`NodeContext.count_images`), and that
count is the one a quota enforces.
"""

from __future__ import annotations

from collections.abc import Mapping
from graphlib import TopologicalSorter
from typing import Any

from zimage_serve.workflow.spec import Node
from zimage_serve.workflow.validate import is_link, link_source


def estimated_images(prompt: dict[str, Any], nodes: Mapping[str, type[Node]]) -> int:
    """The images a validated prompt's samplers will make (its graph has no cycle and knows every node)."""
    if all(nodes[node["class_type"]].denoises is None for node in prompt.values()):
        return 0  # no sampler: nothing to follow
    links: dict[str, dict[str, str]] = {}
    for node_id, node in prompt.items():
        declared = nodes[node["class_type"]].inputs_for(node["inputs"])  # keys the node does not have are no links
        links[node_id] = {
            name: source[0]
            for name, value in node["inputs"].items()
            if name in declared and is_link(value) and (source := link_source(value)) is not None
            if source[0] in prompt
        }
    batches: dict[str, int] = {}
    images = 0
    for node_id in TopologicalSorter({n: set(found.values()) for n, found in links.items()}).static_order():
        node = prompt[node_id]
        node_class = nodes[node["class_type"]]
        linked = {name: batches[source] for name, source in links[node_id].items()}
        constants = {k: v for k, v in node["inputs"].items() if k not in links[node_id] and not is_link(v)}
        batches[node_id] = max(1, node_class.batch(constants, linked))
        if node_class.denoises is not None:
            images += linked.get(node_class.denoises, 1)
    return images
