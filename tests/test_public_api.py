"""The package root exports exactly its public names, sorted, each importable."""

from __future__ import annotations

import importlib
import subprocess
import sys

import concur_langgraph


def test_all_is_sorted_and_unique() -> None:
    names = concur_langgraph.__all__
    assert names == sorted(names)
    assert len(names) == len(set(names))


def test_every_exported_name_resolves() -> None:
    for name in concur_langgraph.__all__:
        assert getattr(concur_langgraph, name) is not None, name


def test_public_names_match_module_attributes() -> None:
    public = {
        n
        for n, v in vars(concur_langgraph).items()
        if not n.startswith("_") and not isinstance(v, type(sys)) and n != "annotations"
    }
    # Everything public at the root is in __all__ (RedisWindow is lazy, so only in __all__).
    assert public - set(concur_langgraph.__all__) == set()


def test_import_does_not_pull_optional_extras() -> None:
    code = (
        "import sys, concur_langgraph; "
        "print(','.join(m for m in ('redis', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_unknown_attribute_is_an_attribute_error() -> None:
    mod = importlib.import_module("concur_langgraph")
    try:
        mod.does_not_exist  # noqa: B018
    except AttributeError as exc:
        assert "does_not_exist" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")
