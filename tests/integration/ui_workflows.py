"""ComfyUI's UI workflow format (what the frontend saves and loads: nodes with widgets_values, links,
groups, version 0.4) read against the node schemas of a booted ComfyUI, and converted to the API format
({id: {class_type, inputs}}) that the executor runs.

Widget order is the frontend's: every input that is a widget (INT, FLOAT, STRING, BOOLEAN, a combo), in
the schema's input order (required, then optional), each in one widgets_values slot. An INT with
`control_after_generate`, or (frontend convention, ComfyUI_frontend useIntWidget) an INT named `seed` or
`noise_seed` without an explicit `control_after_generate`, has a second slot right after it for the
control value ("fixed", "increment", "decrement", "randomize"); it is not a node input.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Nodes that live only in the frontend: never sent to the server.
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


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


def node_info(nodes_module, class_type: str) -> dict:
    """The node's V1 info ({input, input_order, output, output_name, ...}) as /object_info serves it."""
    cls = nodes_module.NODE_CLASS_MAPPINGS[class_type]
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    spec = cls.INPUT_TYPES()
    return {"input": spec, "input_order": {k: list(v) for k, v in spec.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)}


def schema(nodes_module, class_type: str) -> Schema:
    info = node_info(nodes_module, class_type)
    out = Schema(class_type)
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


def widget_inputs(sch: Schema, values: list) -> dict:
    """The API inputs a node's widgets_values stand for (control slots dropped)."""
    return {w.name: v for (w, control), v in zip(sch.widget_slots(), values) if not control}


def to_api(workflow: dict, schema_of) -> dict:
    """UI workflow -> API prompt. `schema_of(class_type)` gives a Schema. Frontend-only notes are left out;
    muted (mode 2) and bypassed (mode 4) nodes are not supported here."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):
            continue
        if node["type"] in FRONTEND_ONLY:
            raise NotImplementedError(f"{node['type']} nodes are not converted")
        if node.get("mode", 0) != 0:
            raise NotImplementedError(f"node {node['id']} has mode {node['mode']}")
        sch = schema_of(node["type"])
        inputs = widget_inputs(sch, node.get("widgets_values") or [])
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            _, origin, origin_slot, _, _, _ = links[slot["link"]]
            inputs[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
