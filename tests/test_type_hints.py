"""The public API of tformer/ states its argument types (the Flax examples' standard)."""

import ast
from pathlib import Path

TFORMER = Path(__file__).resolve().parents[1] / "tformer"


def public_arguments(tree: ast.Module):
    """(function, argument, hinted) for every argument of a public function or method (self / cls aside);
    nested functions are implementation, not API."""
    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from visit(child)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                    not child.name.startswith("_") or child.name in ("__init__", "__call__")):
                a = child.args
                for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
                    if arg.arg not in ("self", "cls"):
                        yield child.name, arg.arg, arg.annotation is not None
    yield from visit(tree)


def test_nine_in_ten_public_arguments_have_a_type_hint():
    args = [(f.name, *a) for f in sorted(TFORMER.glob("*.py")) for a in public_arguments(ast.parse(f.read_text()))]
    missing = [f"{file}:{fn}({arg})" for file, fn, arg, hinted in args if not hinted]
    assert len(args) > 400, "the walk must see the whole package"
    assert 1 - len(missing) / len(args) >= 0.9, f"{len(missing)} of {len(args)} unhinted, e.g. {missing[:10]}"
