"""Workflows for the headless runner: ComfyUI's UI format converted to the API format the executor runs,
`--set NODE.INPUT=VALUE` overrides, and the part of a graph that trains.

UI format (what the frontend saves: nodes with widgets_values, links, groups) is read against the node
schemas of a booted ComfyUI. Widget order is the frontend's: every input that is a widget (INT, FLOAT,
STRING, BOOLEAN, a combo), in the schema's input order (required, then optional), each in one
widgets_values slot. An INT with `control_after_generate`, or (frontend convention, ComfyUI_frontend
useIntWidget) an INT named `seed` or `noise_seed` without an explicit `control_after_generate`, has a
second slot right after it for the control value ("fixed", "increment", ...); it is not a node input.
As the frontend does when it queues a prompt: notes are dropped, links through Reroute nodes are
followed, a PrimitiveNode's value goes into the widget it feeds, muted nodes (mode 2) are left out
and bypassed ones (mode 4) pass their input of the same type through.

Nothing here imports ComfyUI: the schemas come from the booted `nodes` module passed in.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
TRAINING_NODES = {"DojoTrainLoRA": "Dojo Train LoRA", "DojoTrainTextualInversion": "Dojo Train Textual Inversion"}
MUTED, BYPASSED = 2, 4
EXPORT_HINT = "in ComfyUI, Workflow > Export (API) saves the API format, which this runner also reads"


class WorkflowError(ValueError):
    """The workflow file or an override cannot be used; the message says what to change."""


@dataclass
class Input:
    name: str
    type: str            # socket type, or "COMBO" for a combo
    optional: bool
    options: dict
    choices: list | None = None   # combo options

    @property
    def is_widget(self) -> bool:
        return (self.type in WIDGET_TYPES or self.choices is not None) and not self.options.get("forceInput")

    @property
    def has_control(self) -> bool:
        if not self.is_widget or self.type not in ("INT", "COMBO"):
            return False
        if "control_after_generate" in self.options and self.options["control_after_generate"] is not None:
            return bool(self.options["control_after_generate"])
        return self.type == "INT" and self.name in ("seed", "noise_seed")


@dataclass
class Schema:
    class_type: str
    inputs: list[Input] = field(default_factory=list)
    outputs: list[tuple[str, str]] = field(default_factory=list)   # (name, type)
    is_output: bool = False

    @property
    def sockets(self) -> list[Input]:
        return [i for i in self.inputs if not i.is_widget]

    @property
    def widgets(self) -> list[Input]:
        return [i for i in self.inputs if i.is_widget]

    def widget_slots(self) -> list[tuple[Input, bool]]:
        """(input, is_control_slot) for each widgets_values slot, in order."""
        slots = []
        for w in self.widgets:
            slots.append((w, False))
            if w.has_control:
                slots.append((w, True))
        return slots

    def input(self, name: str) -> Input:
        return next(i for i in self.inputs if i.name == name)

    def find(self, name: str) -> Input | None:
        return next((i for i in self.inputs if i.name == name), None)


def node_info(nodes_module, class_type: str) -> dict:
    """The node's V1 info ({input, input_order, output, output_name, output_node, ...}) as /object_info serves it."""
    cls = nodes_module.NODE_CLASS_MAPPINGS[class_type]
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    spec = cls.INPUT_TYPES()
    return {"input": spec, "input_order": {k: list(v) for k, v in spec.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}


def schema(nodes_module, class_type: str) -> Schema:
    info = node_info(nodes_module, class_type)
    out = Schema(class_type, is_output=bool(info.get("output_node")))
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in order.get(section, list(specs)):
            entry = specs[name]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            kind = entry[0]
            if isinstance(kind, (list, tuple)):
                out.inputs.append(Input(name, "COMBO", section == "optional", options, list(kind)))
            elif kind == "COMBO":
                out.inputs.append(Input(name, "COMBO", section == "optional", options, list(options.get("options", []))))
            else:
                out.inputs.append(Input(name, kind, section == "optional", options))
    types = list(info.get("output") or [])
    names = list(info.get("output_name") or types)
    out.outputs = [(n, t if isinstance(t, str) else "COMBO") for n, t in zip(names, types)]
    return out


def schema_reader(nodes_module):
    """`schema_of(class_type)` over a booted ComfyUI's nodes, cached; unknown classes get a clear error."""
    cache: dict[str, Schema] = {}

    def schema_of(class_type: str) -> Schema:
        if class_type not in cache:
            if class_type not in nodes_module.NODE_CLASS_MAPPINGS:
                raise WorkflowError(f"the workflow uses node type '{class_type}', which this ComfyUI does not have: "
                                    "install the custom node pack that provides it (or update ComfyUI)")
            cache[class_type] = schema(nodes_module, class_type)
        return cache[class_type]
    return schema_of


def widget_problems(sch: Schema, values: list) -> list[str]:
    """What is wrong with a node's widgets_values for this schema (empty when valid)."""
    slots = sch.widget_slots()
    if len(values) != len(slots):
        return [f"{sch.class_type}: {len(values)} widgets_values for {len(slots)} widget slots "
                f"({[w.name + (' control' if c else '') for w, c in slots]})"]
    problems = []
    for (w, control), value in zip(slots, values):
        where = f"{sch.class_type}.{w.name}{' (control_after_generate)' if control else ''} = {value!r}"
        if control:
            if value not in CONTROL_VALUES:
                problems.append(f"{where}: not one of {sorted(CONTROL_VALUES)}")
            continue
        if w.choices is not None:
            if value not in w.choices:
                problems.append(f"{where}: not among the options {w.choices[:12]}")
            continue
        if w.type == "BOOLEAN" and not isinstance(value, bool):
            problems.append(f"{where}: not a boolean")
        elif w.type == "STRING" and not isinstance(value, str):
            problems.append(f"{where}: not a string")
        elif w.type in ("INT", "FLOAT"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (w.type == "INT" and not isinstance(value, int) and not float(value).is_integer()):
                problems.append(f"{where}: not {w.type}")
                continue
            lo, hi = w.options.get("min"), w.options.get("max")
            if lo is not None and value < lo or hi is not None and value > hi:
                problems.append(f"{where}: outside [{lo}, {hi}]")
    return problems


def widget_inputs(sch: Schema, values) -> dict:
    """The API inputs a node's widgets_values stand for (control slots dropped)."""
    if isinstance(values, dict):  # some custom nodes save their widgets by name
        return {w.name: values[w.name] for w in sch.widgets if w.name in values}
    return {w.name: v for (w, control), v in zip(sch.widget_slots(), values) if not control}


# --- UI -> API ----------------------------------------------------------------------------------------

def is_api_format(data) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, dict) and "class_type" in v for v in data.values())


def is_ui_format(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def _links(workflow: dict) -> dict:
    """link id -> (origin node id, origin slot); both the array (0.4) and the object (1.0) layouts."""
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            out[link[0]] = (link[1], link[2])
    return out


def to_api(workflow: dict, schema_of) -> dict:
    """UI workflow -> API prompt ({id: {class_type, inputs, _meta: {title}}}), as the frontend queues it.
    `schema_of(class_type)` gives a Schema."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError(f"this workflow contains subgraphs, which this runner does not expand; {EXPORT_HINT}")
    links = _links(workflow)
    nodes = {n["id"]: n for n in workflow["nodes"]}

    def source(link_id, out_type=None, seen=()):
        """The (node id, slot) a link really comes from, through reroutes and bypassed nodes; None if
        it comes from a muted node or nowhere."""
        if link_id is None or link_id not in links:
            return None
        origin, slot = links[link_id]
        node = nodes.get(origin)
        if node is None or origin in seen:
            return None
        seen = (*seen, origin)
        mode = node.get("mode", 0)
        if node["type"] == "Reroute":
            ins = node.get("inputs") or []
            return source(ins[0].get("link"), out_type, seen) if ins else None
        if node["type"] == "PrimitiveNode":
            return ("value", (node.get("widgets_values") or [None])[0])
        if mode == MUTED:
            return None
        if mode == BYPASSED:
            outs = node.get("outputs") or []
            kind = out_type or (outs[slot]["type"] if slot < len(outs) else None)
            ins = node.get("inputs") or []
            ordered = ([ins[slot]] if slot < len(ins) else []) + ins
            for candidate in ordered:
                if candidate.get("type") == kind and candidate.get("link") is not None:
                    return source(candidate["link"], kind, seen)
            return None
        return (str(origin), slot)

    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        sch = schema_of(node["type"])
        inputs = widget_inputs(sch, node.get("widgets_values") or [])
        for slot in node.get("inputs") or []:
            origin = source(slot.get("link"), slot.get("type"))
            if origin is None:
                continue
            if origin[0] == "value":
                inputs[slot["name"]] = origin[1]
            else:
                inputs[slot["name"]] = [origin[0], origin[1]]
        entry = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node["id"])] = entry
    return prompt


def load_workflow(path: Path, schema_of) -> tuple[dict, dict | None]:
    """(API prompt, UI workflow or None) from a workflow file in either format."""
    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except OSError as e:
        raise WorkflowError(f"cannot read the workflow {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise WorkflowError(f"the workflow {path} is not JSON: {e}") from e
    if is_api_format(data):
        return data, None
    if isinstance(data, dict) and is_api_format(data.get("prompt")):  # a /prompt request body
        return data["prompt"], (data.get("extra_data") or {}).get("extra_pnginfo", {}).get("workflow")
    if is_ui_format(data):
        return to_api(data, schema_of), data
    raise WorkflowError(f"{path} is neither a ComfyUI workflow (UI format: nodes and links) nor an API-format "
                        f"prompt ({{id: {{class_type, inputs}}}}); {EXPORT_HINT}")


def title(prompt: dict, node_id: str) -> str:
    node = prompt[node_id]
    name = node.get("_meta", {}).get("title") or node["class_type"]
    return f"#{node_id} {name}" if name == node["class_type"] else f"#{node_id} '{name}' ({node['class_type']})"


# --- overrides ----------------------------------------------------------------------------------------

def find_nodes(prompt: dict, ref: str) -> list[str]:
    """Node ids a `--set` reference names: an id, else a title, else a class type."""
    if ref in prompt:
        return [ref]
    by_title = [i for i, n in prompt.items() if n.get("_meta", {}).get("title") == ref]
    return by_title or [i for i, n in prompt.items() if n["class_type"] == ref]


def parse_value(inp: Input, text: str, where: str):
    if inp.choices is not None:
        matches = [c for c in inp.choices if str(c) == text]
        if not matches:
            raise WorkflowError(f"{where}: '{text}' is not one of the options {inp.choices[:20]}"
                                f"{' ...' if len(inp.choices) > 20 else ''}")
        return matches[0]
    try:
        if inp.type == "INT":
            value = int(text)
        elif inp.type == "FLOAT":
            value = float(text)
        elif inp.type == "BOOLEAN":
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        else:
            return text
    except ValueError:
        raise WorkflowError(f"{where}: '{text}' is not a{'n' if inp.type == 'INT' else ''} {inp.type} value") from None
    lo, hi = inp.options.get("min"), inp.options.get("max")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise WorkflowError(f"{where}: {value} is outside the input's range [{lo}, {hi}]")
    return value


def apply_overrides(prompt: dict, overrides: list[str], schema_of) -> list[str]:
    """Apply `NODE.INPUT=VALUE` texts to `prompt` in place; returns what was set, for the log."""
    done = []
    for text in overrides:
        lhs, eq, value = text.partition("=")
        ref, dot, name = lhs.rpartition(".")
        if not eq or not dot or not ref or not name:
            raise WorkflowError(f"--set '{text}': write NODE.INPUT=VALUE, e.g. --set DojoTrainLoRA.steps=500 "
                                "(NODE is a node id, title or type)")
        ids = find_nodes(prompt, ref)
        if not ids:
            known = ", ".join(title(prompt, i) for i in sorted(prompt, key=lambda k: (len(k), k)))
            raise WorkflowError(f"--set '{text}': no node has the id, title or type '{ref}'; the nodes are: {known}")
        if len(ids) > 1:
            raise WorkflowError(f"--set '{text}': '{ref}' names {len(ids)} nodes ({', '.join(title(prompt, i) for i in ids)}); "
                                "use the node id")
        node = prompt[ids[0]]
        sch = schema_of(node["class_type"])
        inp = sch.find(name)
        where = f"--set '{text}' ({title(prompt, ids[0])}.{name})"
        if inp is None or not inp.is_widget:
            widgets = ", ".join(w.name for w in sch.widgets)
            kind = "is a connection, not a widget" if inp is not None else "is not an input of this node"
            raise WorkflowError(f"{where}: '{name}' {kind}; its widgets are: {widgets}")
        if isinstance(node["inputs"].get(name), list):
            raise WorkflowError(f"{where}: this widget is fed by a link in the workflow; set the node it comes from")
        node["inputs"][name] = parse_value(inp, value, where)
        done.append(f"{title(prompt, ids[0])}.{name} = {node['inputs'][name]!r}")
    return done


# --- the part that trains -----------------------------------------------------------------------------

def ancestors(prompt: dict, ids) -> set[str]:
    """Every node the given nodes need (their inputs' sources, transitively), not including them."""
    seen, todo = set(), list(ids)
    while todo:
        for value in prompt[todo.pop()]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt and str(value[0]) not in seen:
                seen.add(str(value[0]))
                todo.append(str(value[0]))
    return seen


@dataclass
class TrainingPart:
    trainers: list[str]      # the Dojo training nodes
    savers: list[str]        # output nodes that need nothing but the trainers and what they need
    needed: set[str]         # every node that runs

    @property
    def outputs(self) -> list[str]:
        return self.trainers + self.savers


def training_part(prompt: dict, schema_of) -> TrainingPart:
    """The graph up to and including its Dojo training nodes, plus the output nodes that follow from
    training alone (Save LoRA / Save Embedding, loss previews): not sampling, decoding or image saving."""
    trainers = sorted((i for i, n in prompt.items() if n["class_type"] in TRAINING_NODES), key=lambda k: (len(k), k))
    if not trainers:
        raise WorkflowError("this workflow has no Dojo training node (" + " or ".join(TRAINING_NODES.values()) +
                            "): the headless runner runs a workflow's training; queue other workflows in ComfyUI")
    needed = ancestors(prompt, trainers) | set(trainers)
    savers = []
    for node_id, node in sorted(prompt.items(), key=lambda kv: (len(kv[0]), kv[0])):
        if node_id in needed or not schema_of(node["class_type"]).is_output:
            continue
        before = ancestors(prompt, [node_id])
        if before <= needed and before & set(trainers):
            savers.append(node_id)
    needed |= set(savers)
    return TrainingPart(trainers, savers, needed)
