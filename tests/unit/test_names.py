"""No function of the product keeps a single-letter local name (a parameter
or a name it assigns) in use over more than a few lines: a name that lives
longer says what it holds. Loop indices ``i`` and ``j`` and the throwaway
``_`` are left alone, and so are comprehension variables (their own scope)
and the names of nested functions' own scopes, which are checked as
functions of their own."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("shm_protocol", "sidecar", "web", "retrieval", "compat")
#: Lines between a name's first and last use in one function, at most.
MAX_SPAN = 8
ALWAYS_ALLOWED = frozenset({"_", "i", "j"})
#: (module, function, name): why the name stays.
EXEMPT: dict[tuple[str, str, str], str] = {}
_OWN_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _own_names(function: ast.AST) -> list[ast.Name]:
    """The Name nodes of ``function``'s own scope: nested functions, lambdas,
    classes and comprehensions left out, except a comprehension's first
    iterable, which the enclosing scope evaluates."""
    found, stack = [], list(function.body)
    while stack:
        node = stack.pop()
        if isinstance(node, _COMPREHENSIONS):
            stack.append(node.generators[0].iter)
        elif isinstance(node, _OWN_SCOPES):
            # Its decorators and defaults are evaluated here; its body is its own.
            stack.extend(getattr(node, "decorator_list", []))
            if not isinstance(node, ast.ClassDef):
                stack.extend(node.args.defaults + [d for d in node.args.kw_defaults if d is not None])
        else:
            if isinstance(node, ast.Name):
                found.append(node)
            stack.extend(ast.iter_child_nodes(node))
    return found


def long_lived_names(source: str) -> list[tuple[str, str, int]]:
    """(function, name, span in lines) of each single-letter local name of
    ``source`` used over more than MAX_SPAN lines of one function."""
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        args = function.args
        params = [a for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]
                  if a is not None]
        names = _own_names(function)
        local = {a.arg for a in params} | {n.id for n in names if isinstance(n.ctx, ast.Store | ast.Del)}
        lines: dict[str, list[int]] = {}
        for node in names:
            lines.setdefault(node.id, []).append(node.lineno)
        for param in params:
            lines.setdefault(param.arg, []).append(param.lineno)
        for name, where in lines.items():
            if len(name) == 1 and name in local and name not in ALWAYS_ALLOWED and max(where) - min(where) > MAX_SPAN:
                found.append((function.name, name, max(where) - min(where)))
    return found


def test_the_scan_tells_long_lived_names_from_allowed_ones():
    filler, deeper = "    pass\n" * MAX_SPAN, "        pass\n" * MAX_SPAN
    source = (
        "def long(s):\n" + filler + "    return s\n"                      # a parameter used far below: found
        "def short(s):\n    return s\n"                                   # used at once: fine
        "def loop(items):\n    for i, x in enumerate(items):\n" + deeper + "        print(i)\n"
        "def comprehension(xs):\n    a = [x for x in xs]\n" + filler + "    return [x for x in a]\n"
        "def nested():\n    def inner(v):\n" + deeper + "        return v\n    return inner\n"
        "def closure():\n    t = 1\n" + filler + "    return lambda t: t\n"  # the lambda's t is its own
        "def glob():\n    print(f)\n" + filler + "    print(f)\n"            # a global: not this function's
    )
    assert sorted(long_lived_names(source)) == [("comprehension", "a", MAX_SPAN + 1), ("inner", "v", MAX_SPAN + 1),
                                                ("long", "s", MAX_SPAN + 1)]


def test_no_single_letter_name_lives_long_in_the_product():
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            module = path.relative_to(REPO).as_posix()
            for function, name, span in long_lived_names(path.read_text()):
                key = (module, function, name)
                if key not in EXEMPT:
                    offenders.append(f"{module}: {function}() keeps {name!r} over {span} lines")
    assert not offenders, "name these for what they hold:\n" + "\n".join(offenders)
