"""Offline checks of infra/terraform and infra/observability (no terraform binary, no cloud).

- Every .tf file parses (python-hcl2's grammar: a syntax error fails).
- Every reference in a module resolves: var.X, local.X, module.X (and its outputs), data.T.N,
  resources T.N; each.* only under for_each, count.* only under count; module calls pass only
  declared variables and every required one.
- Every variable and output has a description; every provider used is pinned in versions.tf.
- The kafka-topics module is evaluated (a small HCL expression evaluator below): it reads
  infra/topics.json, and the topics it would create have the names the Rust code uses and the
  partitions and config of topics.json, plus the cluster's replication settings.
- The deploy stack exposes only the NLB to the internet, keeps Kafka and Postgres private, and
  gives the processes only environment variables their config.rs reads.
- The shards' parameter group plans and commits as the local stack's Postgres does
  (random_page_cost, commit_delay, commit_siblings).
- The Grafana dashboard and the Prometheus rules parse (real PromQL parser), and every metric
  they use is emitted by the code, or listed as planned (then marked as such), or a standard
  series of Prometheus or the blackbox exporter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import hcl2
import lark
import promql_parser
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TF_ROOT = ROOT / "infra" / "terraform"
TOPICS_JSON = ROOT / "infra" / "topics.json"
TOPICS_MODULE = TF_ROOT / "modules" / "kafka-topics"
DEPLOY = TF_ROOT / "deploy"
OBSERVABILITY = ROOT / "infra" / "observability"
DASHBOARD = OBSERVABILITY / "grafana" / "chat-pipeline.json"
ALERTS = OBSERVABILITY / "prometheus" / "alerts.yml"
PROMETHEUS_YML = OBSERVABILITY / "prometheus" / "prometheus.yml"

# ---------------------------------------------------------------------------------------------
# Metric catalogue
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    kind: str  # counter | gauge | histogram
    labels: frozenset[str] = frozenset()
    # Known values of enumerated labels; a matcher on such a label must use one of them.
    values: tuple[tuple[str, frozenset[str]], ...] = ()


def _m(metric_type: str, /, **labels: set[str] | None) -> Metric:
    return Metric(
        metric_type,
        frozenset(labels),
        tuple((k, frozenset(v)) for k, v in labels.items() if v),
    )


# Emitted by the code today: infra/observability/metrics.json, the catalogue that
# e2e/tests/metrics.rs checks against a scrape of each service (every family there, with each
# listed label value from the start). Histograms are in seconds.
METRICS_JSON = OBSERVABILITY / "metrics.json"
_FAMILIES: dict[str, dict[str, Any]] = json.loads(METRICS_JSON.read_text())["families"]
CURRENT: dict[str, Metric] = {
    name: _m(f["type"], **{k: (set(v) if v else None) for k, v in f.get("labels", {}).items()})
    for name, f in _FAMILIES.items()
}
# Recorded by a library (the process metrics), not by a macro call the code scan below finds.
FROM_LIBRARIES = {name for name, f in _FAMILIES.items() if "from" in f}

# Not emitted yet. Dashboards and alerts may use them, marked as planned.
PLANNED: dict[str, Metric] = {}

# Series that Prometheus itself (up) or the blackbox exporter (probe_success) produce.
EXTERNAL: dict[str, Metric] = {
    "up": _m("gauge"),
    "probe_success": _m("gauge"),
}

CATALOGUE = {**CURRENT, **PLANNED, **EXTERNAL}

# Labels Prometheus attaches to every scraped series (prometheus.yml adds "gateway").
TARGET_LABELS = frozenset({"job", "instance", "gateway"})

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# ---------------------------------------------------------------------------------------------
# HCL: parsing into blocks
# ---------------------------------------------------------------------------------------------

Tree = lark.Tree
Token = lark.Token


def _trees(node: Tree) -> list[Tree]:
    """Children that are trees, without comments and newlines."""
    return [c for c in node.children if isinstance(c, Tree) and c.data != "new_line_or_comment"]


def _name(node: Tree) -> str:
    """The text of an identifier, keyword or literal_value node (attribute and block names)."""
    tok = node.children[0]
    assert isinstance(tok, Token), node
    return str(tok)


def _unescape(s: str) -> str:
    out, i = [], 0
    simple = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in simple:
            out.append(simple[s[i + 1]])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _label(node: Tree) -> str:
    if node.data == "string":
        parts = [c for c in node.children if isinstance(c, Tree)]
        text = ""
        for p in parts:
            (inner,) = p.children
            if not isinstance(inner, Token):
                raise ValueError("interpolation in a block label")
            text += _unescape(str(inner))
        return text
    return _name(node)


@dataclass
class Block:
    type: str
    labels: list[str]
    attrs: dict[str, Tree]
    blocks: list["Block"]
    file: Path
    line: int

    def sub(self, type_: str) -> list["Block"]:
        return [b for b in self.blocks if b.type == type_]

    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line} {self.type} {' '.join(self.labels)}"


def _body(body: Tree, file: Path) -> tuple[dict[str, Tree], list[Block]]:
    attrs: dict[str, Tree] = {}
    blocks: list[Block] = []
    for node in _trees(body):
        if node.data == "attribute":
            name_node, expr = _trees(node)
            name = _name(name_node)
            if name in attrs:
                raise ValueError(f"{file}: attribute {name} set twice")
            attrs[name] = expr
        elif node.data == "block":
            parts = _trees(node)
            inner = parts[-1]
            assert inner.data == "body"
            type_, *labels = [_label(p) for p in parts[:-1]]
            a, b = _body(inner, file)
            blocks.append(Block(type_, labels, a, b, file, node.meta.line if not node.meta.empty else 0))
        else:
            raise ValueError(f"{file}: unexpected {node.data}")
    return attrs, blocks


_TREE_CACHE: dict[Path, Tree] = {}


def parse_tree(path: Path) -> Tree:
    if path not in _TREE_CACHE:
        _TREE_CACHE[path] = hcl2.parses_to_tree(path.read_text())
    return _TREE_CACHE[path]


@dataclass
class Module:
    dir: Path
    blocks: list[Block] = field(default_factory=list)

    def of(self, type_: str) -> list[Block]:
        return [b for b in self.blocks if b.type == type_]

    @property
    def variables(self) -> dict[str, Block]:
        return {b.labels[0]: b for b in self.of("variable")}

    @property
    def outputs(self) -> dict[str, Block]:
        return {b.labels[0]: b for b in self.of("output")}

    @property
    def locals(self) -> dict[str, Tree]:
        out: dict[str, Tree] = {}
        for b in self.of("locals"):
            for k, v in b.attrs.items():
                assert k not in out, f"local.{k} defined twice in {self.dir}"
                out[k] = v
        return out

    @property
    def resources(self) -> dict[tuple[str, str], Block]:
        return {(b.labels[0], b.labels[1]): b for b in self.of("resource")}

    @property
    def data(self) -> dict[tuple[str, str], Block]:
        return {(b.labels[0], b.labels[1]): b for b in self.of("data")}

    @property
    def module_calls(self) -> dict[str, Block]:
        return {b.labels[0]: b for b in self.of("module")}


def tf_files() -> list[Path]:
    return sorted(TF_ROOT.rglob("*.tf"))


def module_dirs() -> list[Path]:
    return sorted({p.parent for p in tf_files()})


def load_module(d: Path) -> Module:
    m = Module(d)
    for f in sorted(d.glob("*.tf")):
        tree = parse_tree(f)
        (body,) = _trees(tree)
        attrs, blocks = _body(body, f)
        assert not attrs, f"{f}: top-level attributes {sorted(attrs)}"
        m.blocks.extend(blocks)
    return m


# ---------------------------------------------------------------------------------------------
# HCL: references
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    root: str
    path: tuple[str, ...]  # attribute names (and literal string/int indexes) after the root


def _traversal(node: Tree) -> tuple[Tree, list[Any]] | None:
    """Splits `a.b["c"][x].d` into its root expr_term and steps ("attr"/"index"/"splat", arg)."""
    steps: list[Any] = []
    cur = node
    while True:
        if cur.data == "expr_term":
            kids = _trees(cur)
            if len(kids) == 1 and kids[0].data in (
                "get_attr_expr_term",
                "index_expr_term",
                "full_splat_expr_term",
                "attr_splat_expr_term",
            ):
                cur = kids[0]
                continue
            if len(kids) == 1 and kids[0].data == "identifier":
                return cur, list(reversed(steps))
            return None
        if cur.data == "get_attr_expr_term":
            base, ga = _trees(cur)
            steps.append(("attr", _name(_trees(ga)[0])))
            cur = base
        elif cur.data == "index_expr_term":
            base, idx = _trees(cur)
            if idx.data == "short_index":
                steps.append(("index_lit", int(str(idx.children[-1]))))
            else:
                steps.append(("index", _trees(idx)[0]))
            cur = base
        elif cur.data in ("full_splat_expr_term", "attr_splat_expr_term"):
            base, splat = _trees(cur)
            for s in reversed(_trees(splat)):
                if s.data == "get_attr":
                    steps.append(("attr", _name(_trees(s)[0])))
                else:
                    steps.append(("index", _trees(s)[0]) if s.data == "braces_index" else ("index_lit", 0))
            steps.append(("splat", None))
            cur = base
        else:
            return None


def _static_key(step: Any) -> str | None:
    kind, arg = step
    if kind == "attr":
        return arg
    if kind == "index" and isinstance(arg, Tree):
        lit = _string_literal(arg)
        return lit
    return None


def references(expr: Tree, bound: frozenset[str] = frozenset()) -> list[Ref]:
    """Every variable-rooted traversal in an expression (for-expression variables excluded)."""
    out: list[Ref] = []

    def visit(node: Tree, bound: frozenset[str]) -> None:
        if node.data in ("get_attr_expr_term", "index_expr_term", "full_splat_expr_term", "attr_splat_expr_term", "expr_term"):
            tr = _traversal(node) if node.data != "expr_term" else None
            if node.data == "expr_term":
                kids = _trees(node)
                if len(kids) == 1 and kids[0].data == "identifier":
                    name = _name(kids[0])
                    if name not in bound:
                        out.append(Ref(name, ()))
                    return
            if tr is not None:
                root, steps = tr
                name = _name(_trees(root)[0])
                if name not in bound:
                    path: list[str] = []
                    for st in steps:
                        key = _static_key(st)
                        if key is None:
                            break
                        path.append(key)
                    out.append(Ref(name, tuple(path)))
                for kind, arg in steps:
                    if kind == "index" and isinstance(arg, Tree):
                        visit(arg, bound)
                return
        if node.data in ("for_tuple_expr", "for_object_expr"):
            parts = _trees(node)
            intro = parts[0]
            names = frozenset(_name(c) for c in _trees(intro) if c.data == "identifier")
            visit(_trees(intro)[-1], bound)
            for p in parts[1:]:
                visit(p, bound | names)
            return
        if node.data == "object_elem_key":
            kids = _trees(node)
            # `{ name = ... }`: a bare identifier key is a literal, not a reference.
            if len(kids) == 1 and kids[0].data == "expr_term":
                inner = _trees(kids[0])
                if len(inner) == 1 and inner[0].data == "identifier":
                    return
        if node.data == "function_call":
            for c in _trees(node)[1:]:
                visit(c, bound)
            return
        for c in _trees(node):
            visit(c, bound)

    visit(expr, bound)
    return out


# Attributes that hold type constraints or attribute names, not expressions.
NOT_EXPRESSIONS = {("variable", "type"), ("lifecycle", "ignore_changes")}


def block_exprs(block: Block) -> list[Tree]:
    exprs = [v for k, v in block.attrs.items() if (block.type, k) not in NOT_EXPRESSIONS]
    for b in block.blocks:
        exprs.extend(block_exprs(b))
    return exprs


def _string_literal(expr: Tree) -> str | None:
    """The value of a string literal without interpolation, else None."""
    node = expr
    while node.data == "expr_term" and len(_trees(node)) == 1:
        node = _trees(node)[0]
    if node.data != "string":
        return None
    text = ""
    for part in _trees(node):
        (inner,) = part.children
        if not isinstance(inner, Token) or inner.type != "STRING_CHARS":
            return None
        text += _unescape(str(inner))
    return text


# ---------------------------------------------------------------------------------------------
# HCL: a small evaluator (enough for the kafka-topics module and validations)
# ---------------------------------------------------------------------------------------------


class EvalError(Exception):
    pass


class Unsupported(EvalError):
    pass


class TfSet(list):
    """A Terraform set of strings: sorted, distinct."""

    def __init__(self, items: Any) -> None:
        super().__init__(sorted(set(items)))


def _tostring(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (int, float, str)):
        return str(v)
    raise EvalError(f"cannot convert {v!r} to string")


def _regex(pattern: str, s: str) -> Any:
    m = re.search(pattern, s)
    if not m:
        raise EvalError(f"regex {pattern!r} does not match {s!r}")
    return m.group(0)


def _coalesce(*args: Any) -> Any:
    for a in args:
        if a is not None and a != "":
            return a
    raise EvalError("coalesce: no non-null argument")


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "jsondecode": json.loads,
    "file": lambda p: Path(p).read_text(),
    "merge": lambda *ms: {k: v for m in ms for k, v in m.items()},
    "tostring": _tostring,
    "tonumber": lambda v: float(v) if "." in str(v) else int(v),
    "toset": TfSet,
    "tolist": list,
    "concat": lambda *ls: [x for l in ls for x in l],
    "keys": lambda m: sorted(m),
    "values": lambda m: [m[k] for k in sorted(m)],
    "sort": lambda l: sorted(l),
    "join": lambda sep, l: sep.join(_tostring(x) for x in l),
    "length": len,
    "startswith": lambda s, p: s.startswith(p),
    "endswith": lambda s, p: s.endswith(p),
    "contains": lambda l, v: v in l,
    "distinct": lambda l: list(dict.fromkeys(l)),
    "alltrue": lambda l: all(l),
    "anytrue": lambda l: any(l),
    "floor": lambda n: int(n // 1),
    "regex": _regex,
    "coalesce": _coalesce,
    "lookup": lambda m, k, *d: m[k] if k in m else (d[0] if d else (_ for _ in ()).throw(EvalError(k))),
}


@dataclass
class Scope:
    module: Module
    vars: dict[str, Any]
    path_module: str
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    bound: dict[str, Any] = field(default_factory=dict)
    each: dict[str, Any] | None = None
    count: int | None = None
    _locals: dict[str, Any] = field(default_factory=dict)
    _evaluating: set[str] = field(default_factory=set)

    def child(self, **bound: Any) -> "Scope":
        s = Scope(self.module, self.vars, self.path_module, self.resources, {**self.bound, **bound}, self.each, self.count)
        s._locals, s._evaluating = self._locals, self._evaluating
        return s

    def local(self, name: str) -> Any:
        if name not in self._locals:
            exprs = self.module.locals
            if name not in exprs:
                raise EvalError(f"local.{name} is not defined")
            if name in self._evaluating:
                raise EvalError(f"local.{name} depends on itself")
            self._evaluating.add(name)
            base = Scope(self.module, self.vars, self.path_module, self.resources)
            base._locals, base._evaluating = self._locals, self._evaluating
            self._locals[name] = evaluate(exprs[name], base)
            self._evaluating.discard(name)
        return self._locals[name]


def _apply(value: Any, step: Any, scope: Scope) -> Any:
    kind, arg = step
    if kind == "attr":
        if not isinstance(value, dict) or arg not in value:
            raise EvalError(f"no attribute {arg!r} in {value!r:.80}")
        return value[arg]
    if kind in ("index", "index_lit"):
        key = evaluate(arg, scope) if kind == "index" else arg
        try:
            return value[key]
        except (KeyError, IndexError, TypeError) as e:
            raise EvalError(f"no element {key!r} in {value!r:.80}") from e
    raise Unsupported(f"step {kind}")


def _resolve(root: str, steps: list[Any], scope: Scope) -> Any:
    def take() -> str:
        if not steps or steps[0][0] != "attr":
            raise EvalError(f"{root} needs an attribute")
        return steps.pop(0)[1]

    steps = list(steps)
    if root in scope.bound:
        value = scope.bound[root]
    elif root == "var":
        name = take()
        if name not in scope.vars:
            raise EvalError(f"var.{name} is not declared")
        value = scope.vars[name]
    elif root == "local":
        value = scope.local(take())
    elif root == "path":
        what = take()
        if what != "module":
            raise Unsupported(f"path.{what}")
        value = scope.path_module
    elif root == "each":
        if scope.each is None:
            raise EvalError("each outside for_each")
        value = scope.each
    elif root == "count":
        if scope.count is None:
            raise EvalError("count outside count")
        value = {"index": scope.count}
    elif root in scope.resources:
        value = scope.resources[root]
    else:
        raise Unsupported(f"reference root {root}")
    for st in steps:
        if st[0] == "splat":
            raise Unsupported("splat")
        value = _apply(value, st, scope)
    return value


def _binary(op: str, a: Any, b: Any) -> Any:
    ops: dict[str, Callable[[Any, Any], Any]] = {
        "==": lambda x, y: x == y,
        "!=": lambda x, y: x != y,
        "<": lambda x, y: x < y,
        ">": lambda x, y: x > y,
        "<=": lambda x, y: x <= y,
        ">=": lambda x, y: x >= y,
        "+": lambda x, y: x + y,
        "-": lambda x, y: x - y,
        "*": lambda x, y: x * y,
        "/": lambda x, y: x / y,
        "%": lambda x, y: x % y,
        "&&": lambda x, y: bool(x) and bool(y),
        "||": lambda x, y: bool(x) or bool(y),
    }
    if op in ("+", "-", "*", "/", "%", "<", ">", "<=", ">=") and not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)
    ):
        raise EvalError(f"{op} needs numbers, got {a!r} and {b!r}")
    return ops[op](a, b)


def _iterate(coll: Any) -> list[tuple[Any, Any]]:
    if isinstance(coll, TfSet):
        return [(v, v) for v in coll]
    if isinstance(coll, dict):
        return [(k, coll[k]) for k in sorted(coll)]
    if isinstance(coll, list):
        return list(enumerate(coll))
    raise EvalError(f"cannot iterate over {coll!r}")


def evaluate(node: Tree, scope: Scope) -> Any:
    d = node.data
    kids = _trees(node)
    if d == "expr_term":
        if len(kids) != 1:
            raise Unsupported(f"expr_term with {len(kids)} parts")
        (k,) = kids
        if k.data == "identifier":
            return _resolve(_name(k), [], scope)
        return evaluate(k, scope)
    if d in ("get_attr_expr_term", "index_expr_term", "full_splat_expr_term", "attr_splat_expr_term"):
        tr = _traversal(node)
        if tr is None:
            base, step = kids
            if d == "get_attr_expr_term":
                return _apply(evaluate(base, scope), ("attr", _name(_trees(step)[0])), scope)
            if d == "index_expr_term":
                if step.data == "short_index":
                    return _apply(evaluate(base, scope), ("index_lit", int(str(step.children[-1]))), scope)
                return _apply(evaluate(base, scope), ("index", _trees(step)[0]), scope)
            raise Unsupported("splat")
        root, steps = tr
        return _resolve(_name(_trees(root)[0]), steps, scope)
    if d == "int_lit":
        return int(str(node.children[0]))
    if d == "float_lit":
        return float(str(node.children[0]))
    if d == "literal_value":
        return {"true": True, "false": False, "null": None}[str(node.children[0])]
    if d == "string":
        out = ""
        for part in kids:
            (inner,) = part.children
            if isinstance(inner, Token):
                if inner.type != "STRING_CHARS":
                    raise Unsupported(inner.type)
                out += _unescape(str(inner))
            elif inner.data == "interpolation":
                out += _tostring(evaluate(_trees(inner)[0], scope))
            else:
                raise Unsupported(inner.data)
        return out
    if d == "tuple":
        return [evaluate(k, scope) for k in kids]
    if d == "object":
        obj: dict[str, Any] = {}
        for elem in kids:
            key_node, val = _trees(elem)
            kk = _trees(key_node)
            inner = _trees(kk[0]) if kk and kk[0].data == "expr_term" else []
            if len(inner) == 1 and inner[0].data == "identifier":
                key = _name(inner[0])
            elif kk and kk[0].data == "keyword":
                key = _name(kk[0])
            else:
                key = _tostring(evaluate(kk[0], scope))
            obj[key] = evaluate(val, scope)
        return obj
    if d == "function_call":
        name = _name(kids[0])
        args = _trees(kids[1]) if len(kids) > 1 else []
        if any(isinstance(c, Token) and c.type == "ELLIPSIS" for c in (kids[1].children if len(kids) > 1 else [])):
            raise Unsupported("argument expansion")
        if name == "can":
            try:
                evaluate(args[0], scope)
                return True
            except Unsupported:
                raise
            except EvalError:
                return False
        if name not in FUNCTIONS:
            raise Unsupported(f"function {name}")
        try:
            return FUNCTIONS[name](*[evaluate(a, scope) for a in args])
        except EvalError:
            raise
        except Exception as e:  # a Terraform function error
            raise EvalError(f"{name}: {e}") from e
    if d == "conditional":
        cond, yes, no = kids
        return evaluate(yes if evaluate(cond, scope) else no, scope)
    if d == "binary_op":
        lhs, term = kids
        op_node, rhs = _trees(term)
        op = str(op_node.children[0])
        a = evaluate(lhs, scope)
        if op == "&&" and not a:
            return False
        if op == "||" and a:
            return True
        return _binary(op, a, evaluate(rhs, scope))
    if d == "unary_op":
        op = str(node.children[0])
        v = evaluate(kids[0], scope)
        return (not v) if op == "!" else -v
    if d in ("for_object_expr", "for_tuple_expr"):
        if any(isinstance(c, Token) and c.type == "ELLIPSIS" for c in node.children):
            raise Unsupported("grouping for-expression")
        intro, *rest = kids
        cond = rest.pop() if rest and rest[-1].data == "for_cond" else None
        names = [_name(c) for c in _trees(intro) if c.data == "identifier"]
        coll = evaluate(_trees(intro)[-1], scope)
        obj_out: dict[Any, Any] = {}
        list_out: list[Any] = []
        for k, v in _iterate(coll):
            inner_scope = scope.child(**({names[0]: k, names[1]: v} if len(names) == 2 else {names[0]: v}))
            if cond is not None and not evaluate(_trees(cond)[0], inner_scope):
                continue
            if d == "for_object_expr":
                key = evaluate(rest[0], inner_scope)
                if key in obj_out:
                    raise EvalError(f"duplicate key {key!r} in for-expression")
                obj_out[key] = evaluate(rest[1], inner_scope)
            else:
                list_out.append(evaluate(rest[0], inner_scope))
        return obj_out if d == "for_object_expr" else list_out
    raise Unsupported(d)


class PreconditionFailed(EvalError):
    pass


class ValidationFailed(EvalError):
    pass


META_ARGS = {"count", "for_each", "depends_on", "provider", "providers", "source", "version"}


def _evaluate_instance(block: Block, scope: Scope) -> dict[str, Any]:
    values = {k: evaluate(v, scope) for k, v in block.attrs.items() if k not in META_ARGS}
    for lc in block.sub("lifecycle"):
        for pre in lc.sub("precondition"):
            if not evaluate(pre.attrs["condition"], scope):
                raise PreconditionFailed(evaluate(pre.attrs["error_message"], scope))
    return values


def evaluate_module(d: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    """Evaluates a module whose resource arguments are all known without a provider.

    Returns {"resources": {type: {name: instance(s)}}, "instances": {address: attributes},
    "outputs": {name: value}, "scope": the module's scope}.
    """
    module = load_module(d)
    scope0 = Scope(module, {}, str(d))
    values: dict[str, Any] = {}
    for name, var in module.variables.items():
        if name in inputs:
            values[name] = inputs[name]
        elif "default" in var.attrs:
            values[name] = evaluate(var.attrs["default"], scope0)
        else:
            raise EvalError(f"variable {name} is required")
    unknown = set(inputs) - set(module.variables)
    if unknown:
        raise EvalError(f"not variables of {d.name}: {sorted(unknown)}")
    scope = Scope(module, values, str(d))
    for name, var in module.variables.items():
        for val in var.sub("validation"):
            if not evaluate(val.attrs["condition"], scope):
                raise ValidationFailed(f"var.{name}: {evaluate(val.attrs['error_message'], scope)}")

    resources: dict[str, dict[str, Any]] = {}
    instances: dict[str, dict[str, Any]] = {}  # address -> attributes
    for (type_, name), block in module.resources.items():
        if "for_each" in block.attrs:
            coll = evaluate(block.attrs["for_each"], scope)
            if not isinstance(coll, (dict, TfSet)):
                raise EvalError(f"{type_}.{name}: for_each needs a map or a set")
            inst = {}
            for k, v in _iterate(coll):
                s = scope.child()
                s.each = {"key": k, "value": v}
                inst[k] = instances[f'{type_}.{name}["{k}"]'] = _evaluate_instance(block, s)
        elif "count" in block.attrs:
            inst = []
            for i in range(evaluate(block.attrs["count"], scope)):
                s = scope.child()
                s.count = i
                inst.append(_evaluate_instance(block, s))
                instances[f"{type_}.{name}[{i}]"] = inst[-1]
        else:
            inst = instances[f"{type_}.{name}"] = _evaluate_instance(block, scope)
        resources.setdefault(type_, {})[name] = inst
    scope.resources = resources
    outputs = {name: evaluate(o.attrs["value"], scope) for name, o in module.outputs.items()}
    return {"resources": resources, "instances": instances, "outputs": outputs, "scope": scope}


# ---------------------------------------------------------------------------------------------
# Terraform tests
# ---------------------------------------------------------------------------------------------


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_terraform_tree_is_there() -> None:
    dirs = {_rel(d) for d in module_dirs()}
    assert {"infra/terraform/modules/kafka-topics", "infra/terraform/deploy"} <= dirs
    assert (DEPLOY / "terraform.tfvars.example").is_file()
    assert (TF_ROOT / "README.md").is_file()


@pytest.mark.parametrize("path", tf_files(), ids=_rel)
def test_tf_file_parses(path: Path) -> None:
    # Both the raw grammar and the full python-hcl2 pipeline must accept the file.
    parse_tree(path)
    with path.open() as f:
        hcl2.load(f)


def test_tfvars_example_parses_and_sets_declared_variables() -> None:
    text = (DEPLOY / "terraform.tfvars.example").read_text()
    tree = hcl2.parses_to_tree(text)
    (body,) = _trees(tree)
    attrs, blocks = _body(body, DEPLOY / "terraform.tfvars.example")
    assert not blocks
    declared = load_module(DEPLOY).variables
    assert set(attrs) - set(declared) == set(), "tfvars sets undeclared variables"
    required = {n for n, v in declared.items() if "default" not in v.attrs}
    assert required - set(attrs) == set(), "tfvars example misses required variables"


@pytest.mark.parametrize("d", module_dirs(), ids=_rel)
def test_every_variable_and_output_has_a_description(d: Path) -> None:
    m = load_module(d)
    missing = []
    for kind, items in (("variable", m.variables), ("output", m.outputs)):
        for name, b in items.items():
            desc = _string_literal(b.attrs["description"]) if "description" in b.attrs else None
            if not desc or not desc.strip():
                missing.append(f"{kind} {name} ({b.where()})")
    assert not missing, "no description: " + ", ".join(missing)


def _check_refs(m: Module) -> list[str]:
    problems: list[str] = []
    variables, locals_, calls = m.variables, m.locals, m.module_calls
    resources, data = m.resources, m.data
    for block in m.blocks:
        if block.type == "terraform":
            continue
        if block.type == "moved":
            # `from` names an address that no longer exists (that is the point); `to` must.
            for side, must_exist in (("from", False), ("to", True)):
                (ref,) = references(block.attrs[side])
                exists = bool(ref.path) and (ref.root, ref.path[0]) in resources
                if exists != must_exist:
                    problems.append(f"{block.where()}: moved.{side} {ref.root}.{'.'.join(ref.path)}")
            continue
        iterated = "for_each" in block.attrs
        counted = "count" in block.attrs
        exprs = block_exprs(block) if block.type != "locals" else list(block.attrs.values())
        for expr in exprs:
            for ref in references(expr):
                where = block.where()
                r, p = ref.root, ref.path
                if r == "var":
                    if not p or p[0] not in variables:
                        problems.append(f"{where}: var.{'.'.join(p)} is not declared")
                elif r == "local":
                    if not p or p[0] not in locals_:
                        problems.append(f"{where}: local.{'.'.join(p)} is not defined")
                elif r == "module":
                    if not p or p[0] not in calls:
                        problems.append(f"{where}: module.{'.'.join(p)} is not declared")
                    elif len(p) > 1:
                        src = _string_literal(calls[p[0]].attrs["source"])
                        child = load_module((m.dir / src).resolve()) if src and src.startswith(".") else None
                        if child is not None and p[1] not in child.outputs:
                            problems.append(f"{where}: module.{p[0]} has no output {p[1]}")
                elif r == "data":
                    if len(p) < 2 or (p[0], p[1]) not in data:
                        problems.append(f"{where}: data.{'.'.join(p)} is not declared")
                elif r == "each":
                    if not iterated:
                        problems.append(f"{where}: each.* without for_each")
                elif r == "count":
                    if not counted:
                        problems.append(f"{where}: count.* without count")
                elif r in ("path", "terraform", "self"):
                    pass
                elif "_" in r:
                    if not p or (r, p[0]) not in resources:
                        problems.append(f"{where}: resource {r}.{'.'.join(p)} is not declared")
                else:
                    problems.append(f"{where}: unknown reference {r}")
    return problems


@pytest.mark.parametrize("d", module_dirs(), ids=_rel)
def test_every_reference_resolves(d: Path) -> None:
    problems = _check_refs(load_module(d))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("d", module_dirs(), ids=_rel)
def test_outputs_reference_existing_objects(d: Path) -> None:
    # Covered by test_every_reference_resolves too; kept separate so a broken output is named.
    m = load_module(d)
    bad = []
    for name, out in m.outputs.items():
        assert "value" in out.attrs, f"output {name} has no value"
        refs = references(out.attrs["value"])
        assert refs or _string_literal(out.attrs["value"]) is not None, f"output {name} refers to nothing"
        for ref in refs:
            if ref.root == "module" and ref.path and ref.path[0] not in m.module_calls:
                bad.append(f"output {name}: module.{ref.path[0]}")
            elif "_" in ref.root and ref.root not in ("each", "count") and (ref.root, (ref.path or ("",))[0]) not in m.resources:
                bad.append(f"output {name}: {ref.root}.{'.'.join(ref.path)}")
    assert not bad, bad


@pytest.mark.parametrize("d", module_dirs(), ids=_rel)
def test_module_calls_pass_declared_variables(d: Path) -> None:
    m = load_module(d)
    for name, call in m.module_calls.items():
        src = _string_literal(call.attrs["source"])
        assert src is not None and src.startswith(("./", "../")), f"module {name}: local source expected"
        child_dir = (d / src).resolve()
        assert child_dir.is_dir(), f"module {name}: {src} does not exist"
        child = load_module(child_dir)
        passed = set(call.attrs) - META_ARGS
        assert passed - set(child.variables) == set(), f"module {name} passes undeclared {passed - set(child.variables)}"
        required = {n for n, v in child.variables.items() if "default" not in v.attrs}
        assert required - passed == set(), f"module {name} misses required {required - passed}"


@pytest.mark.parametrize("d", module_dirs(), ids=_rel)
def test_providers_are_pinned(d: Path) -> None:
    m = load_module(d)
    versions = d / "versions.tf"
    assert versions.is_file(), f"{_rel(d)} has no versions.tf"
    pinned: dict[str, str] = {}
    required_version = None
    for tf in m.of("terraform"):
        if tf.file == versions and "required_version" in tf.attrs:
            required_version = _string_literal(tf.attrs["required_version"])
        for rp in tf.sub("required_providers"):
            for local_name, expr in rp.attrs.items():
                spec = evaluate(expr, Scope(m, {}, str(d)))
                assert re.fullmatch(r"[\w-]+/[\w-]+", spec.get("source", "")), f"{local_name}: source"
                assert re.search(r"\d", spec.get("version", "")), f"{local_name}: no version constraint"
                pinned[local_name] = spec["source"]
    assert required_version, f"{_rel(d)}: no required_version"
    # terraform_data comes with Terraform itself (the built-in provider, >= 1.4): nothing to pin.
    used = {t.split("_")[0] for t, _ in list(m.resources) + list(m.data)} - {"terraform"}
    assert used - set(pinned) == set(), f"providers used but not pinned: {used - set(pinned)}"
    if "kafka" in pinned:
        assert pinned["kafka"] == "Mongey/kafka"


# --- kafka-topics module against topics.json and the Rust naming ------------------------------


def _topics_json() -> dict[str, Any]:
    return {k: v for k, v in json.loads(TOPICS_JSON.read_text()).items() if not k.startswith("_")}


def _rust_names() -> dict[str, str]:
    """Name templates of chat_common::topics::TopicNames, e.g. {"outbound": "{}outbound-{}"}."""
    src = (ROOT / "common" / "src" / "topics.rs").read_text()
    found = dict(re.findall(r'pub fn (\w+)\(&self(?:, \w+: &GatewayId)?\) -> String \{\s*format!\("([^"]*)"', src))
    assert {"inbound", "inbound_dlq", "presence", "outbound"} <= set(found), found
    return found


def _expected_topics(prefix: str, gateway_ids: list[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """What chat_common::topics::standard_topics would create: name -> (kind, spec)."""
    specs, names = _topics_json(), _rust_names()
    out = {
        names["inbound"].replace("{}", prefix, 1): ("inbound", specs["inbound"]),
        names["inbound_dlq"].replace("{}", prefix, 1): ("inbound-dlq", specs["inbound-dlq"]),
        names["presence"].replace("{}", prefix, 1): ("presence", specs["presence"]),
    }
    for gw in gateway_ids:
        out[names["outbound"].replace("{}", prefix, 1).replace("{}", gw, 1)] = ("outbound", specs["outbound"])
    return out


def _created_topics(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    topics: dict[str, dict[str, Any]] = {}
    for address, t in result["instances"].items():
        if address.startswith("kafka_topic."):
            assert t["name"] not in topics, f"topic {t['name']} declared twice"
            topics[t["name"]] = t
    return topics


def test_kafka_topics_module_reads_topics_json() -> None:
    m = load_module(TOPICS_MODULE)
    refs_file = [
        r for e in m.locals.values() for r in references(e)
    ]
    text = "".join(p.read_text() for p in TOPICS_MODULE.glob("*.tf"))
    assert "jsondecode(file(" in text.replace(" ", ""), "the module must jsondecode(file(...)) the settings"
    assert "topics_file" in m.variables, "the path must be a variable"
    assert any(r.root == "var" and r.path[:1] == ("topics_file",) for r in refs_file)
    # With the default, the module reads infra/topics.json itself.
    result = evaluate_module(TOPICS_MODULE, {"gateway_ids": ["gw1"]})
    path = Path(result["scope"].local("topics_file")).resolve()
    assert path == TOPICS_JSON.resolve(), f"default topics file is {path}"
    # And no partition count or setting is copied into the module: every topic's partitions and
    # config come from the file (a file with other numbers changes the result).
    for name, block in m.resources.items():
        if name[0] == "kafka_topic":
            for attr in ("partitions", "config"):
                roots = {r.root for r in references(block.attrs[attr])}
                assert "local" in roots, f"kafka_topic.{name[1]}.{attr} does not come from topics.json"


@pytest.mark.parametrize(
    "prefix,gateways,retired",
    [("", ["gw1", "gw2"], []), ("t1-", ["gw-2"], ["gw.old"])],
)
def test_kafka_topics_module_creates_topics_json(prefix: str, gateways: list[str], retired: list[str]) -> None:
    result = evaluate_module(
        TOPICS_MODULE,
        {"gateway_ids": gateways, "retired_gateway_ids": retired, "topic_prefix": prefix},
    )
    created = _created_topics(result)
    expected = _expected_topics(prefix, gateways + retired)
    assert set(created) == set(expected)
    for name, (kind, spec) in expected.items():
        t = created[name]
        assert t["partitions"] == spec["partitions"], f"{name}: partitions"
        assert t["replication_factor"] == 3, f"{name}: replication factor"
        assert set(t["config"]) == set(spec["config"]) | {"min.insync.replicas"}, f"{name}: config keys"
        for key, value in spec["config"].items():
            assert t["config"][key] == value, f"{name}: {key}"
        assert t["config"]["min.insync.replicas"] == "2", f"{name}: min.insync.replicas"
    outputs = result["outputs"]
    assert outputs["topic_names"] == sorted(expected)
    assert outputs["inbound_topic"] == f"{prefix}inbound"
    assert outputs["inbound_dlq_topic"] == f"{prefix}inbound-dlq"
    assert outputs["presence_topic"] == f"{prefix}presence"
    assert set(outputs["outbound_topics"]) == set(gateways + retired)
    assert outputs["inbound_partitions"] == _topics_json()["inbound"]["partitions"]


def test_kafka_topics_module_follows_another_topics_file(tmp_path: Path) -> None:
    doc = json.loads(TOPICS_JSON.read_text())
    doc["inbound"]["partitions"] = 7
    doc["presence"]["config"]["segment.ms"] = "123"
    other = tmp_path / "topics.json"
    other.write_text(json.dumps(doc))
    result = evaluate_module(
        TOPICS_MODULE,
        {"gateway_ids": ["gw1"], "topics_file": str(other), "replication_factor": 1, "min_insync_replicas": 1},
    )
    topics = _created_topics(result)
    assert topics["inbound"]["partitions"] == 7
    assert topics["presence"]["config"]["segment.ms"] == "123"
    assert topics["inbound"]["replication_factor"] == 1
    assert topics["outbound-gw1"]["config"]["min.insync.replicas"] == "1"


def test_kafka_topics_module_refuses_bad_input(tmp_path: Path) -> None:
    doc = json.loads(TOPICS_JSON.read_text())
    doc["unknown_kind"] = {"partitions": 1, "config": {}}
    other = tmp_path / "topics.json"
    other.write_text(json.dumps(doc))
    with pytest.raises(PreconditionFailed):
        evaluate_module(TOPICS_MODULE, {"gateway_ids": ["gw1"], "topics_file": str(other)})
    with pytest.raises(PreconditionFailed):
        evaluate_module(TOPICS_MODULE, {"gateway_ids": ["gw1"], "min_insync_replicas": 4})
    for bad in ([], ["gw 1"], ["x" * 65]):
        with pytest.raises(ValidationFailed):
            evaluate_module(TOPICS_MODULE, {"gateway_ids": bad})


# --- deploy stack -------------------------------------------------------------------------------


def _deploy() -> Module:
    return load_module(DEPLOY)


def _ref_targets(expr: Tree) -> set[str]:
    return {".".join((r.root,) + r.path[:1]) for r in references(expr)}


def test_deploy_uses_the_topics_module_with_production_replication() -> None:
    m = _deploy()
    calls = [c for c in m.module_calls.values() if _string_literal(c.attrs["source"]) == "../modules/kafka-topics"]
    assert len(calls) == 1
    call = calls[0]
    scope = Scope(m, {}, str(DEPLOY))
    assert evaluate(call.attrs["replication_factor"], scope) == 3
    assert evaluate(call.attrs["min_insync_replicas"], scope) == 2
    assert "var.gateway_ids" in _ref_targets(call.attrs["gateway_ids"])
    msk = m.resources[("aws_msk_cluster", "this")]
    assert evaluate(msk.attrs["number_of_broker_nodes"], scope) == 3


def test_only_the_nlb_is_exposed_to_the_internet() -> None:
    m = _deploy()
    scope = Scope(m, {}, str(DEPLOY))
    for (type_, name), sg in m.resources.items():
        if type_ == "aws_security_group":
            assert not sg.sub("ingress"), f"{name}: use aws_vpc_security_group_ingress_rule, not inline ingress"
    internet_sgs = set()
    for (type_, name), rule in m.resources.items():
        if type_ != "aws_vpc_security_group_ingress_rule":
            continue
        target = _ref_targets(rule.attrs["security_group_id"])
        assert len(target) == 1, f"{name}: security_group_id"
        (target,) = target
        cidr_sources = set()
        for attr in ("cidr_ipv4", "cidr_ipv6", "for_each"):
            if attr in rule.attrs:
                lit = _string_literal(rule.attrs[attr])
                if lit is not None:
                    cidr_sources.add(lit)
                cidr_sources |= _ref_targets(rule.attrs[attr])
        from_internet = bool({"0.0.0.0/0", "::/0", "var.client_cidr_blocks"} & cidr_sources)
        if from_internet:
            internet_sgs.add(target)
        if target in ("aws_security_group.kafka", "aws_security_group.db"):
            peers = set()
            if "referenced_security_group_id" in rule.attrs:
                peers = _ref_targets(rule.attrs["referenced_security_group_id"])
                if "for_each" in rule.attrs:
                    peers = {t for t in _ref_targets(rule.attrs["for_each"])}
            allowed = {"aws_security_group.gateway", "aws_security_group.multiplexer", target}
            if peers:
                assert peers <= allowed, f"{name}: {target} reachable from {peers}"
            else:
                assert target == "aws_security_group.kafka" and cidr_sources <= {"each.value", "var.kafka_admin_cidr_blocks"}, (
                    f"{name}: {target} reachable from {cidr_sources}"
                )
    assert internet_sgs == {"aws_security_group.nlb"}, internet_sgs
    for (type_, name), db in m.resources.items():
        if type_ == "aws_db_instance":
            assert evaluate(db.attrs["publicly_accessible"], scope) is False
            assert _ref_targets(db.attrs["vpc_security_group_ids"]) == {"aws_security_group.db"}
    msk = m.resources[("aws_msk_cluster", "this")]
    (bngi,) = msk.sub("broker_node_group_info")
    assert _ref_targets(bngi.attrs["security_groups"]) == {"aws_security_group.kafka"}
    assert _ref_targets(bngi.attrs["client_subnets"]) == {"aws_subnet.private"}
    (ci,) = bngi.sub("connectivity_info")
    (pa,) = ci.sub("public_access")
    assert evaluate(pa.attrs["type"], scope) == "DISABLED"
    lb = m.resources[("aws_lb", "gateway")]
    assert evaluate(lb.attrs["load_balancer_type"], scope) == "network"
    for (type_, name), svc in m.resources.items():
        if type_ == "aws_ecs_service":
            (net,) = svc.sub("network_configuration")
            assert evaluate(net.attrs["assign_public_ip"], scope) is False, name
            assert _ref_targets(net.attrs["subnets"]) == {"aws_subnet.private"}, name


def test_gateways_listen_on_443_to_8080_with_a_long_idle_timeout() -> None:
    m = _deploy()
    scope = Scope(m, {}, str(DEPLOY))
    tg = m.resources[("aws_lb_target_group", "gateway")]
    assert evaluate(tg.attrs["port"], scope) == 8080
    (hc,) = tg.sub("health_check")
    assert evaluate(hc.attrs["path"], scope) == "/readyz"
    # /readyz is on the operations port, not on the traffic port the NLB forwards.
    assert str(evaluate(hc.attrs["port"], scope)) == str(GATEWAY_OPS_PORT)
    listeners = {n: b for (t, n), b in m.resources.items() if t == "aws_lb_listener"}
    ports = {evaluate(b.attrs["port"], scope) for b in listeners.values()}
    assert 443 in ports
    assert GATEWAY_OPS_PORT not in ports, "the NLB must not forward the operations port"
    for b in listeners.values():
        assert "aws_lb_target_group.gateway" in {t for e in block_exprs(b) for t in _ref_targets(e)}
        assert "tcp_idle_timeout_seconds" in b.attrs


GATEWAY_OPS_PORT = 9100


def _ports(rule: Block, scope: Scope) -> range:
    if evaluate(rule.attrs["ip_protocol"], scope) == "-1":
        return range(0, 65536)
    return range(evaluate(rule.attrs["from_port"], scope), evaluate(rule.attrs["to_port"], scope) + 1)


def test_the_gateways_operations_port_is_open_only_to_monitoring_and_health_checks() -> None:
    m = _deploy()
    scope = Scope(m, {}, str(DEPLOY))
    td = m.resources[("aws_ecs_task_definition", "gateway")]
    env = _env_entries(td.attrs["container_definitions"], m)
    assert evaluate(env["GATEWAY_METRICS_ADDR"], scope) == f"0.0.0.0:{GATEWAY_OPS_PORT}"
    assert evaluate(env["GATEWAY_ADDR"], scope) != evaluate(env["GATEWAY_METRICS_ADDR"], scope)
    allowed = {
        "var.monitoring_cidr_blocks",
        "var.monitoring_security_group_ids",
        "aws_security_group.nlb",
    }
    sources_of_ops: set[str] = set()
    for (type_, name), rule in m.resources.items():
        if type_ != "aws_vpc_security_group_ingress_rule":
            continue
        if _ref_targets(rule.attrs["security_group_id"]) != {"aws_security_group.gateway"}:
            continue
        if GATEWAY_OPS_PORT not in _ports(rule, scope):
            continue
        sources = set()
        for attr in ("for_each", "referenced_security_group_id", "cidr_ipv4", "cidr_ipv6"):
            if attr in rule.attrs:
                sources |= _ref_targets(rule.attrs[attr]) - {"each.value"}
                lit = _string_literal(rule.attrs[attr])
                if lit is not None:
                    sources.add(lit)
        assert sources and sources <= allowed, f"{name}: the operations port is open to {sources}"
        assert 8080 not in _ports(rule, scope) or sources == {"aws_security_group.nlb"}, name
        sources_of_ops |= sources
    assert sources_of_ops == allowed, sources_of_ops
    # The NLB reaches the operations port for its health checks only: no listener forwards it.
    egress = [
        r
        for (t, _), r in m.resources.items()
        if t == "aws_vpc_security_group_egress_rule"
        and _ref_targets(r.attrs["security_group_id"]) == {"aws_security_group.nlb"}
    ]
    assert any(GATEWAY_OPS_PORT in _ports(r, scope) for r in egress)
    # The client port no longer answers Prometheus: no monitoring rule opens 8080.
    for (type_, name), rule in m.resources.items():
        if type_ == "aws_vpc_security_group_ingress_rule" and "monitoring" in " ".join(
            t for e in block_exprs(rule) for t in _ref_targets(e)
        ):
            assert 8080 not in _ports(rule, scope), name


def _rust_env(crate: str) -> set[str]:
    # Settings are clap arguments with an environment variable (`env = "NAME"`): the crate's
    # own in its config.rs, the shared ones (Kafka, topics, shards) beside what they configure
    # in common.
    names: set[str] = set()
    for src in [ROOT / crate / "src" / "config.rs", *sorted((ROOT / "common" / "src").glob("*.rs"))]:
        text = src.read_text()
        names |= set(re.findall(r'\benv\s*=\s*"([A-Z0-9_]+)"', text))
        names |= set(re.findall(r'(?:env_or|env_parse|std::env::var)\(\s*"([A-Z0-9_]+)"', text))
    assert names, crate
    telemetry = (ROOT / "common" / "src" / "telemetry.rs").read_text()
    names |= set(re.findall(r'std::env::var\("([A-Z0-9_]+)"\)', telemetry))
    if "try_from_default_env" in telemetry:
        names.add("RUST_LOG")  # tracing_subscriber's EnvFilter default variable
    return names


def _env_entries(expr: Tree, m: Module, seen: set[str] | None = None) -> dict[str, Tree]:
    """Objects with a literal `name` and a `value` or `valueFrom`, also through local.X."""
    seen = seen or set()
    out: dict[str, Tree] = {}

    def visit(node: Tree) -> None:
        if node.data == "object":
            fields = {}
            for elem in _trees(node):
                k, v = _trees(elem)
                inner = _trees(_trees(k)[0]) if _trees(k) and _trees(k)[0].data == "expr_term" else []
                if len(inner) == 1 and inner[0].data == "identifier":
                    fields[_name(inner[0])] = v
            if "name" in fields and ({"value", "valueFrom"} & set(fields)):
                name = _string_literal(fields["name"])
                assert name is not None, "environment variable names must be literals"
                out[name] = fields.get("value", fields.get("valueFrom"))
        for c in _trees(node):
            visit(c)

    visit(expr)
    for ref in references(expr):
        if ref.root == "local" and ref.path and ref.path[0] not in seen:
            seen.add(ref.path[0])
            out.update(_env_entries(m.locals[ref.path[0]], m, seen))
    return out


@pytest.mark.parametrize("process", ["gateway", "multiplexer"])
def test_tasks_get_only_variables_their_config_reads(process: str) -> None:
    m = _deploy()
    td = m.resources[("aws_ecs_task_definition", process)]
    env = _env_entries(td.attrs["container_definitions"], m)
    unknown = set(env) - _rust_env(process)
    assert not unknown, f"{process} task sets variables {process}/src/config.rs never reads: {unknown}"
    scope = Scope(m, {}, str(DEPLOY))
    assert "SHARD_DSNS" in env and "KAFKA_BROKERS" in env
    if process == "gateway":
        assert {"GATEWAY_ID", "GATEWAY_ADDR"} <= set(env)
        assert {"JWT_SECRET", "JWT_PUBLIC_KEY_FILE"} & set(env), "without a key the gateway uses the dev secret"
        assert evaluate(env["GATEWAY_ADDR"], scope).startswith("0.0.0.0:")
        assert evaluate(env["DEV_TOKENS"], scope) == "false"
    else:
        assert evaluate(env["MULTIPLEXER_HTTP_ADDR"], scope).startswith("0.0.0.0:")


def test_one_task_per_gateway_id_and_multiplexers_capped_by_partitions() -> None:
    m = _deploy()
    scope = Scope(m, {}, str(DEPLOY))
    gw = m.resources[("aws_ecs_service", "gateway")]
    assert "var.gateway_ids" in _ref_targets(gw.attrs["for_each"])
    assert evaluate(gw.attrs["desired_count"], scope) == 1
    assert evaluate(gw.attrs["deployment_maximum_percent"], scope) == 100
    mux = m.resources[("aws_ecs_service", "multiplexer")]
    conds = [p.attrs["condition"] for lc in mux.sub("lifecycle") for p in lc.sub("precondition")]
    assert any("module.kafka_topics" in _ref_targets(c) for c in conds), "multiplexer count not capped by inbound partitions"
    defaults = {n: evaluate(v.attrs["default"], scope) for n, v in m.variables.items() if "default" in v.attrs}
    assert defaults["multiplexer_max_count"] <= _topics_json()["inbound"]["partitions"]
    assert defaults["multiplexer_min_count"] <= defaults["multiplexer_max_count"]


def test_kafka_and_postgres_take_only_tls_and_each_service_signs_in_as_itself() -> None:
    m = _deploy()
    scope = Scope(m, {}, str(DEPLOY))
    msk = m.resources[("aws_msk_cluster", "this")]
    transit = msk.sub("encryption_info")[0].sub("encryption_in_transit")[0]
    assert evaluate(transit.attrs["client_broker"], scope) == "TLS"
    auth = msk.sub("client_authentication")[0]
    assert evaluate(auth.sub("sasl")[0].attrs["scram"], scope) is True
    assert evaluate(auth.attrs["unauthenticated"], scope) is False
    props = m.resources[("aws_msk_configuration", "this")].attrs["server_properties"]
    # (a heredoc's interpolations are not parsed as references: check the text and the variable)
    assert "allow.everyone.if.no.acl.found=${var.kafka_acls_enforced" in str(props), "ACLs not enforced"
    assert "kafka_acls_enforced" in m.variables
    # The Kafka ports open to the application and admins: SASL/SCRAM over TLS only.
    for name in ("kafka_from_app", "kafka_from_admin"):
        rule = m.resources[("aws_vpc_security_group_ingress_rule", name)]
        assert evaluate(rule.attrs["from_port"], scope) == 9096 == evaluate(rule.attrs["to_port"], scope), name
    params = {
        evaluate(p.attrs["name"], scope): evaluate(p.attrs["value"], scope)
        for p in m.resources[("aws_db_parameter_group", "shards")].sub("parameter")
    }
    assert params["rds.force_ssl"] == "1"
    tls = m.locals["dsn_tls"]
    assert "sslmode=verify-full" in str(tls) and "var.rds_ca_bundle_path" in _ref_targets(tls)
    for name in ("master_dsns", "role_dsns"):
        assert "local.dsn_tls" in _ref_targets(m.locals[name]), f"{name} without verify-full"
    for process, user in (("gateway", "gateway-"), ("multiplexer", "multiplexer")):
        td = m.resources[("aws_ecs_task_definition", process)]
        env = _env_entries(td.attrs["container_definitions"], m)
        assert evaluate(env["KAFKA_SECURITY_PROTOCOL"], scope) == "sasl_ssl", process
        assert "aws_msk_cluster.this" in _ref_targets(env["KAFKA_BROKERS"])
        assert "bootstrap_brokers_sasl_scram" in str(env["KAFKA_BROKERS"]), process
        assert user in str(env["KAFKA_SASL_USERNAME"]), process
        assert "KAFKA_SASL_PASSWORD" in env, f"{process}: no Kafka password secret"
    # The ACLs: a gateway reads only its own outbound topic; the multiplexer writes outbound-*.
    acls = (DEPLOY / "kafka_acls.tf").read_text()
    assert 'user = "gateway-${id}", type = "Topic", name = "${local.p}outbound-${id}", pattern = "Literal", ops = ["Read", "Describe"]' in acls
    assert 'user = "multiplexer", type = "Topic", name = "${local.p}outbound-", pattern = "Prefixed", ops = ["Write", "Describe"]' in acls
    # The same list as the local stack's.
    rust = "".join((ROOT / "ctl" / "src" / "kafka_admin.rs").read_text().split())
    assert 'a.allow(&user,Topic,Literal,format!("{prefix}outbound-{id}"),&[Read,Describe],);' in rust
    assert 'a.allow(mux,Topic,Prefixed,format!("{prefix}outbound-"),&[Write,Describe],);' in rust
    assert ("kafka_acl", "this") in m.resources


def test_the_shards_plan_and_commit_as_the_local_stacks_postgres_does() -> None:
    """The settings the shards' performance rests on (docs/design.md, "Per-batch costs"): the
    local stack's Postgres (infra/scripts/postgres.sh, which the tests and the bench run on) and
    Terraform's parameter group set the same values."""
    m = _deploy()
    scope = Scope(m, {}, str(DEPLOY))
    params = {
        evaluate(p.attrs["name"], scope): evaluate(p.attrs["value"], scope)
        for p in m.resources[("aws_db_parameter_group", "shards")].sub("parameter")
    }
    script = (ROOT / "infra" / "scripts" / "postgres.sh").read_text()
    conf = script[script.index("write_conf() {") :]
    conf = conf[: conf.index("\nEOF\n")]
    local = dict(re.findall(r"^([a-z_]+) = ([0-9.]+)$", conf, re.M))
    for name in ("random_page_cost", "commit_delay", "commit_siblings"):
        assert name in local, f"{name} not set by postgres.sh"
        assert params.get(name) == local[name], f"{name}: Terraform {params.get(name)}, local {local[name]}"


def test_migrations_run_once_before_the_services_update() -> None:
    m = _deploy()
    scope = Scope(m, {}, str(DEPLOY))
    task = m.resources[("aws_ecs_task_definition", "migrate")]
    env = _env_entries(task.attrs["container_definitions"], m)
    assert "SHARD_DSNS" in env, "the migration task needs the shard DSNs"
    assert evaluate(m.variables["migrate_command"].attrs["default"], scope) == ["db-writer", "migrate"]
    # The deployment's retention mode: in delete-on-ack mode the migration builds the sweep's
    # index, which the multiplexers (chat_writer) may not.
    assert _ref_targets(env["RETENTION"]) == {"var.retention"}, "the migration task must know the retention mode"
    run = m.resources[("terraform_data", "migrate")]
    assert "var.run_migrations" in _ref_targets(run.attrs["count"])
    triggers = _ref_targets(run.attrs["triggers_replace"])
    assert {"var.gateway_image", "var.multiplexer_image"} <= triggers, "a new image must migrate first"
    assert "aws_ecs_task_definition.migrate" in triggers, "a new retention mode must migrate first"
    for service in ("gateway", "multiplexer"):
        deps = _ref_targets(m.resources[("aws_ecs_service", service)].attrs["depends_on"])
        assert "terraform_data.migrate" in deps, f"the {service} service updates before migrations ran"
    mux = _env_entries(m.resources[("aws_ecs_task_definition", "multiplexer")].attrs["container_definitions"], m)
    assert evaluate(mux["MULTIPLEXER_MIGRATE"], scope) == "false", "multiplexers would migrate mid-rollout"


DB_ROLES = {"chat_owner", "chat_writer", "chat_reader"}


def _full_refs(expr: Tree) -> set[tuple[str, ...]]:
    """Every reference of `expr` with its whole path: root, names and literal keys."""
    return {(r.root,) + tuple(str(p) for p in r.path) for r in references(expr)}


def test_postgres_roles_have_generated_passwords_in_encrypted_secrets() -> None:
    m = _deploy()
    scope = Scope(m, {}, str(DEPLOY))
    assert set(evaluate(m.locals["db_roles"], scope)) == DB_ROLES
    # The role names are what db-writer roles creates and postgres.sh makes locally.
    roles_rs = (ROOT / "db-writer" / "src" / "roles.rs").read_text()
    for role in DB_ROLES:
        assert f'"{role}"' in roles_rs, role
    password = m.resources[("random_password", "db_role")]
    assert _ref_targets(password.attrs["for_each"]) == {"local.db_roles"}
    assert evaluate(password.attrs["length"], scope) >= 32
    # No URL-special characters: the passwords go into DSNs unescaped.
    assert evaluate(password.attrs["special"], scope) is False
    for name in ("db_role", "role_dsns"):
        secret = m.resources[("aws_secretsmanager_secret", name)]
        assert _ref_targets(secret.attrs["for_each"]) == {"local.db_roles"}, name
        assert _ref_targets(secret.attrs["kms_key_id"]) == {"aws_kms_key.db_roles"}, f"{name}: not under the roles' key"
        version = m.resources[("aws_secretsmanager_secret_version", name)]
        assert f"aws_secretsmanager_secret.{name}" in _ref_targets(version.attrs["secret_id"]), name
    assert evaluate(m.resources[("aws_kms_key", "db_roles")].attrs["enable_key_rotation"], scope) is True
    version = m.resources[("aws_secretsmanager_secret_version", "db_role")]
    assert "random_password.db_role" in _ref_targets(version.attrs["secret_string"])
    role_dsns = m.locals["role_dsns"]
    assert {"random_password.db_role", "aws_db_instance.shard", "local.db_roles"} <= _ref_targets(role_dsns)
    assert "random_password.shard" not in _ref_targets(role_dsns), "a role's DSNs must not carry the master password"
    assert "random_password.shard" in _ref_targets(m.locals["master_dsns"])
    # The tasks' execution role may read the secrets and decrypt them.
    policy = m.data[("aws_iam_policy_document", "read_secrets")]
    targets = {t for st in policy.sub("statement") for t in _ref_targets(st.attrs["resources"])}
    assert {
        "aws_secretsmanager_secret.role_dsns",
        "aws_secretsmanager_secret.db_role",
        "aws_secretsmanager_secret.master_dsns",
        "aws_kms_key.db_roles",
    } <= targets


def _task_secret(task: str, name: str) -> set[tuple[str, ...]]:
    m = _deploy()
    env = _env_entries(m.resources[("aws_ecs_task_definition", task)].attrs["container_definitions"], m)
    assert name in env, f"the {task} task has no {name}"
    return _full_refs(env[name])


def test_the_roles_task_signs_in_as_the_master_user_and_runs_before_the_migrations() -> None:
    m = _deploy()
    scope = Scope(m, {}, str(DEPLOY))
    assert evaluate(m.variables["db_roles_command"].attrs["default"], scope) == ["db-writer", "roles"]
    assert ("aws_secretsmanager_secret", "master_dsns", "arn") in _task_secret("db_roles", "SHARD_DSNS")
    for role in DB_ROLES:
        var = f"{role.upper()}_PASSWORD"
        assert ("aws_secretsmanager_secret", "db_role", role, "arn") in _task_secret("db_roles", var), var
        text = _env_entries(m.resources[("aws_ecs_task_definition", "db_roles")].attrs["container_definitions"], m)[var]
        assert ":password::" in str(text), f"{var}: the password field of the secret, not its JSON"
    # Those are the variables db-writer roles reads.
    main_rs = (ROOT / "db-writer" / "src" / "main.rs").read_text()
    for role in DB_ROLES:
        assert f'"{role.upper()}_PASSWORD"' in main_rs, role
    # No service or migration signs in as the master user.
    for (type_, name), block in m.resources.items():
        if type_ == "aws_ecs_task_definition" and name != "db_roles":
            refs = _full_refs(block.attrs["container_definitions"])
            env = _env_entries(block.attrs["container_definitions"], m)
            refs |= {r for v in env.values() for r in _full_refs(v)}
            assert not any(r[:2] == ("aws_secretsmanager_secret", "master_dsns") for r in refs), name
    run = m.resources[("terraform_data", "db_roles")]
    assert "var.run_migrations" in _ref_targets(run.attrs["count"])
    triggers = _ref_targets(run.attrs["triggers_replace"])
    # Again on a new password (rotation), a new shard, a new image.
    assert {
        "aws_ecs_task_definition.db_roles",
        "aws_secretsmanager_secret_version.db_role",
        "aws_db_instance.shard",
    } <= triggers, triggers
    (exec_,) = run.sub("provisioner")
    assert _ref_targets(exec_.attrs["command"]) == {"local.run_one_off_task"}
    env = exec_.attrs["environment"]
    assert "aws_ecs_task_definition.db_roles" in _ref_targets(env)
    assert "aws_subnet.private" in _ref_targets(env)
    # Before the migrations, and before the services.
    migrate = m.resources[("terraform_data", "migrate")]
    assert "terraform_data.db_roles" in _ref_targets(migrate.attrs["depends_on"])
    for service in ("gateway", "multiplexer"):
        deps = _ref_targets(m.resources[("aws_ecs_service", service)].attrs["depends_on"])
        assert "terraform_data.db_roles" in deps, service


@pytest.mark.parametrize(
    "task,role",
    [("migrate", "chat_owner"), ("multiplexer", "chat_writer"), ("gateway", "chat_reader")],
)
def test_each_process_signs_in_to_the_shards_as_its_role(task: str, role: str) -> None:
    assert _task_secret(task, "SHARD_DSNS") == {("aws_secretsmanager_secret", "role_dsns", role, "arn")}


@pytest.mark.parametrize("service,role", [("multiplexer", "chat_writer"), ("gateway", "chat_reader")])
def test_a_rotated_role_password_rolls_the_services_signing_in_as_it(service: str, role: str) -> None:
    m = _deploy()
    scope = Scope(m, {}, str(DEPLOY))
    svc = m.resources[("aws_ecs_service", service)]
    assert evaluate(svc.attrs["force_new_deployment"], scope) is True
    assert ("aws_secretsmanager_secret_version", "role_dsns", role, "version_id") in _full_refs(svc.attrs["triggers"])


def test_shards_are_counted_rds_instances_listed_in_order() -> None:
    m = _deploy()
    db = m.resources[("aws_db_instance", "shard")]
    assert _ref_targets(db.attrs["count"]) == {"var.shard_count"}
    for name in ("master_dsns", "role_dsns"):
        assert "aws_db_instance.shard" in _ref_targets(m.locals[name]), name


# ---------------------------------------------------------------------------------------------
# Observability
# ---------------------------------------------------------------------------------------------


def _promql(expr: str) -> Any:
    # Grafana's interval variables are not PromQL.
    return promql_parser.parse(re.sub(r"\$__\w+", "5m", expr))


@dataclass
class Use:
    name: str
    base: str
    labels: set[str]


def metric_uses(expr: str) -> tuple[list[Use], list[str]]:
    """Metrics used by a PromQL expression, and problems found in how they are used."""
    ast = _promql(expr)
    uses: list[Use] = []
    problems: list[str] = []
    groupings: list[set[str]] = []

    def pre(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name
            matchers = node.matchers.matchers if node.matchers else []
            if not name:
                problems.append(f"selector without a metric name in {expr!r}")
                return True
            base = name
            if name not in CATALOGUE:
                for suf in HISTOGRAM_SUFFIXES:
                    if name.endswith(suf) and name[: -len(suf)] in CATALOGUE:
                        base = name[: -len(suf)]
                        if CATALOGUE[base].kind != "histogram":
                            problems.append(f"{name}: {base} is a {CATALOGUE[base].kind}, not a histogram")
                        break
            if base in CATALOGUE and CATALOGUE[base].kind == "histogram" and base == name:
                problems.append(f"{name} is a histogram: use {name}_bucket/_sum/_count")
            uses.append(Use(name, base, {mt.name for mt in matchers}))
            if base in CATALOGUE:
                metric = CATALOGUE[base]
                allowed = metric.labels | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
                enumerated = dict(metric.values)
                for mt in matchers:
                    if mt.name not in allowed:
                        problems.append(f"{name} has no label {mt.name}")
                    elif mt.name in enumerated and mt.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.Re):
                        vals = set(mt.value.split("|")) if mt.op == promql_parser.MatchOp.Re else {mt.value}
                        if vals - enumerated[mt.name]:
                            problems.append(f"{name}{{{mt.name}}} has no value {vals - enumerated[mt.name]}")
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            if node.modifier.type == promql_parser.AggModifierType.By:
                groupings.append(set(node.modifier.labels))
        return True

    promql_parser.walk(ast, pre)
    labels_available = set(TARGET_LABELS) | {"le"}
    for u in uses:
        if u.base in CATALOGUE:
            labels_available |= CATALOGUE[u.base].labels
    for g in groupings:
        if g - labels_available:
            problems.append(f"grouping by unknown labels {g - labels_available} in {expr!r}")
    return uses, problems


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_metric_catalogue_matches_the_code() -> None:
    emitted: dict[str, set[str]] = {}
    pattern = re.compile(r'metrics::(counter|gauge|histogram)!\(\s*"(\w+)"((?:\s*,\s*"\w+"\s*=>\s*[^,)]+)*)')
    for crate in ("gateway", "multiplexer", "db-writer", "common"):
        for f in (ROOT / crate / "src").rglob("*.rs"):
            for kind, name, labels in pattern.findall(f.read_text()):
                emitted.setdefault(name, set()).update(re.findall(r'"(\w+)"\s*=>', labels))
                assert name in CURRENT, f"{f.relative_to(ROOT)} emits {name}, missing from {METRICS_JSON.name}"
                assert CURRENT[name].kind == kind, f"{name} is a {kind}"
                # A literal label value must be one the catalogue lists (and so registers at start).
                enumerated = dict(CURRENT[name].values)
                for label, value in re.findall(r'"(\w+)"\s*=>\s*"(\w+)"', labels):
                    if label in enumerated:
                        assert value in enumerated[label], f"{f.relative_to(ROOT)}: {name}{{{label}={value!r}}} is not in {METRICS_JSON.name}"
    missing = set(CURRENT) - set(emitted) - FROM_LIBRARIES
    assert not missing, f"listed as current but not emitted: {missing}"
    for name, labels in emitted.items():
        assert labels == set(CURRENT[name].labels), f"{name}: labels {labels}"
    for name in PLANNED:
        assert name not in emitted, f"{name} is emitted now: move it from PLANNED to CURRENT"


def test_dashboard_parses() -> None:
    dash = _dashboard()
    panels = _panels(dash)
    assert dash.get("uid") and dash.get("title")
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for e in exprs:
        _promql(e)
    for p in panels:
        if p["type"] != "row":
            assert p.get("targets"), f"panel {p['title']} has no query"


def test_dashboard_metrics_are_known_and_planned_ones_marked() -> None:
    problems = []
    used: set[str] = set()
    for p in _panels(_dashboard()):
        for t in p.get("targets", []):
            uses, probs = metric_uses(t["expr"])
            problems += [f"panel {p['title']!r}: {x}" for x in probs]
            for u in uses:
                used.add(u.base)
                if u.base not in CATALOGUE:
                    problems.append(f"panel {p['title']!r}: unknown metric {u.name}")
                elif u.base in PLANNED and "planned" not in p["title"].lower():
                    problems.append(f"panel {p['title']!r} uses planned {u.base} without saying so")
    assert not problems, "\n".join(problems)
    # The dashboard covers what it was asked to cover.
    for must in (
        "gateway_connections",
        "gateway_messages_accepted_total",
        "gateway_produce_seconds",
        "multiplexer_batch_size",
        "multiplexer_batch_seconds",
        "gateway_errors_total",
        "multiplexer_errors_total",
        "multiplexer_dead_letters_total",
        "multiplexer_routed_total",
        "multiplexer_consumer_lag",
        "chat_e2e_latency_seconds",
    ):
        assert must in used, f"dashboard does not show {must}"


def test_alert_rules_parse_and_use_known_metrics() -> None:
    rules = _alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    problems = []
    used: set[str] = set()
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert r["annotations"].get("summary"), r["alert"]
        if "for" in r:
            assert re.fullmatch(r"(\d+[smhd])+", r["for"]), r["alert"]
        uses, probs = metric_uses(r["expr"])
        problems += [f"{r['alert']}: {x}" for x in probs]
        for u in uses:
            used.add(u.base)
            if u.base not in CATALOGUE:
                problems.append(f"{r['alert']}: unknown metric {u.name}")
            elif u.base in PLANNED and r["labels"].get("status") != "planned":
                problems.append(f"{r['alert']}: uses planned {u.base} without status=planned")
    assert not problems, "\n".join(problems)
    for must in ("multiplexer_consumer_lag", "multiplexer_dead_letters_total", "gateway_errors_total", "gateway_produce_seconds", "chat_e2e_latency_seconds", "probe_success"):
        assert must in used, f"no alert on {must}"


def test_prometheus_config_scrapes_the_local_stack() -> None:
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    for rf in cfg.get("rule_files", []):
        assert (PROMETHEUS_YML.parent / rf).is_file(), f"rule file {rf} missing"
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    targets = {n: {t for sc in j.get("static_configs", []) for t in sc["targets"]} for n, j in jobs.items()}
    # Ports of the local stack, from infra/scripts/services.sh.
    services = (ROOT / "infra" / "scripts" / "services.sh").read_text()
    gw_addrs = set(re.findall(r"GATEWAY_ADDR=([\d.]+:\d+)", services))
    gw_ops_addrs = set(re.findall(r"GATEWAY_METRICS_ADDR=([\d.]+:\d+)", services))
    mux_addrs = set(re.findall(r"MULTIPLEXER_HTTP_ADDR=([\d.]+:\d+)", services))
    assert gw_addrs == {"127.0.0.1:8080", "127.0.0.1:8081"} and mux_addrs == {"127.0.0.1:9300"}
    # The gateways serve /metrics and /readyz on their operations listeners only.
    assert len(gw_ops_addrs) == 2 and not gw_ops_addrs & gw_addrs, gw_ops_addrs
    assert targets["chat-gateway"] == gw_ops_addrs
    assert targets["chat-multiplexer"] == mux_addrs
    assert targets["chat-gateway-ready"] == {f"http://{a}/readyz" for a in gw_ops_addrs}
    health_urls = set(re.findall(r"\|(http://[\d.]+:\d+/readyz)\|GATEWAY_ID=", services))
    assert health_urls == {f"http://{a}/readyz" for a in gw_ops_addrs}, health_urls
    # Every job named by the dashboard or the rules exists.
    exprs = [r["expr"] for r in _alert_rules()] + [t["expr"] for p in _panels(_dashboard()) for t in p.get("targets", [])]
    named_jobs = {j for e in exprs for j in re.findall(r'job="([^"]+)"', e)}
    assert named_jobs <= set(jobs), named_jobs - set(jobs)
