"""The package's layering as a contract (grimp reads every import statement, at module level or inside a
function): each package imports only the layers below it, the encoder folders are independent of each other, no
module imports itself back through others, and no private name crosses a module. A wrong arrow fails here with
the chain that makes it.

An import inside a function is counted like any other, so no function-level import can hide a cycle; those that
remain are there for the command's start-up time or an optional dependency (transformers, torch, matplotlib).
The public import paths (README.md, "Public import paths") are what `flaxclf`, `flaxclf.models.*`, `flaxclf.hf.*`
and the rest export without a leading underscore."""

import ast
from pathlib import Path

import grimp
import pytest

from tests.helpers import ROOT

# Top to bottom; a layer may import any layer below it, never one above. Modules in a set are independent
# siblings: neither imports the other.
LAYERS = (
    {"flaxclf.cli", "flaxclf.nnx"},  # the command; the NNX face
    "flaxclf.inference",  # loading a run, predict, inspect's measurement
    "flaxclf.training",  # state, steps, losses, optimizer, metrics, the loop, checkpoints, the run directory
    {"flaxclf.data", "flaxclf.hf"},  # files -> tokens -> batches; config.json, weights in and out, export
    "flaxclf.models",  # the encoders, their families and the registry
    "flaxclf.nn",  # family-agnostic layers
    "flaxclf.runtime",  # sharding, distributed, compilation cache, host memory, timing, output folders
    "flaxclf.config",  # the run config
    {"flaxclf.assets", "flaxclf.options"},  # packaged assets; option values
)
# Inside flaxclf.models: the registry and the classifier config above the encoder folders, which know nothing of
# each other, above the interface every folder implements.
MODELS_LAYERS = (
    "flaxclf.models.classifier",
    "flaxclf.models.registry",
    {"flaxclf.models.bert", "flaxclf.models.deberta", "flaxclf.models.modernbert"},
    "flaxclf.models.interface",
    "flaxclf.models.family",
)


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # TYPE_CHECKING imports are annotations, not arrows: a module may name a type from a layer above it.
    return grimp.build_graph("flaxclf", exclude_type_checking_imports=True, cache_dir=None)


def _layers(spec) -> list[grimp.Layer]:
    return [grimp.Layer(*(sorted(x) if isinstance(x, set) else [x]), independent=True) for x in spec]


def _violations(graph: grimp.ImportGraph) -> list[str]:
    out = []
    for layers in (LAYERS, MODELS_LAYERS):
        for dep in graph.find_illegal_dependencies_for_layers(layers=_layers(layers)):
            for route in dep.routes:
                out.append(" -> ".join([*route.heads, *route.middle, *route.tails]) if not route.middle else
                           f"{sorted(route.heads)} -> {' -> '.join(route.middle)} -> {sorted(route.tails)}")
    return sorted(out)


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            child = next(it, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on.add(child)
                work.append((child, iter(edges[child])))
            elif child in on:
                low[node] = min(low[node], index[child])
    return out


def test_every_package_and_top_level_module_has_a_layer(graph):
    placed = {m for layer in LAYERS for m in (layer if isinstance(layer, set) else {layer})}
    top = {m for m in graph.modules if m.count(".") == 1}
    assert top <= placed, f"{sorted(top - placed)} belong to no layer: add them to LAYERS"
    in_models = {m for m in graph.modules if m.count(".") == 2 and m.startswith("flaxclf.models.")}
    placed_models = {m for layer in MODELS_LAYERS for m in (layer if isinstance(layer, set) else {layer})}
    assert in_models <= placed_models, f"{sorted(in_models - placed_models)} belong to no layer of flaxclf.models"


def test_layers_import_only_downward(graph):
    assert _violations(graph) == []


def test_no_import_cycle_counting_function_level_imports(graph):
    assert _cycles(graph) == []


def test_a_wrong_arrow_fails_the_contract():
    """The checks bite: one upward import (a layer importing training code) and one cycle are each caught."""
    upward = grimp.build_graph("flaxclf", exclude_type_checking_imports=True, cache_dir=None)
    upward.add_import(importer="flaxclf.nn.dense", imported="flaxclf.training.loop")
    assert any(v.startswith("flaxclf.nn.dense -> flaxclf.training.loop") for v in _violations(upward))
    cycle = grimp.build_graph("flaxclf", exclude_type_checking_imports=True, cache_dir=None)
    cycle.add_import(importer="flaxclf.models.bert.spec", imported="flaxclf.models.bert.encoder")
    assert ["flaxclf.models.bert.encoder", "flaxclf.models.bert.spec"] in _cycles(cycle)


def _imported_private_names(path: Path) -> list[str]:
    """`from flaxclf.x import _name` and `flaxclf_module._name` where the module is another flaxclf module."""
    tree = ast.parse(path.read_text(), str(path))
    out, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flaxclf"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {alias.name}")
                else:
                    modules.add(alias.asname or alias.name)  # may be a module (from flaxclf import data)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
    return out


def test_no_private_name_crosses_a_module():
    found = [line for path in sorted((ROOT / "flaxclf").rglob("*.py")) for line in _imported_private_names(path)]
    assert found == []
