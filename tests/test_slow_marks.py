"""The inner loop's skip list (conftest.SLOW_TESTS) names tests that exist: a renamed test would otherwise
silently rejoin the inner loop."""

import ast
from pathlib import Path

from conftest import SLOW_TESTS


def test_every_test_listed_as_slow_exists():
    here = Path(__file__).parent
    for file, names in SLOW_TESTS.items():
        tree = ast.parse((here / file).read_text())
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert not set(names) - defined, (file, sorted(set(names) - defined))
