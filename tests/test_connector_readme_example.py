"""The README's "Writing a connector" example, run as written: the connector class and its
conformance test are taken from README.md, so the manual cannot drift from the API."""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text("utf-8")
_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
_CONNECTOR = next(b for b in _BLOCKS if "class PipeLogConnector" in b)
_TEST = next(b for b in _BLOCKS if "class TestPipeLog" in b)

_module = types.ModuleType("readme_pipelog")
sys.modules["readme_pipelog"] = _module  # dataclasses look their module up while decorating
exec(compile(_CONNECTOR, "README.md (connector example)", "exec"), _module.__dict__)


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What the entry point in the example's pyproject.toml does, for this module only."""
    from connectors import registry

    monkeypatch.setitem(registry.BUILTIN, "pipe-log", "readme_pipelog:PipeLogConnector")
    yield


exec(compile(_TEST, "README.md (conformance example)", "exec"), globals())


def test_the_example_is_collected() -> None:
    assert "TestPipeLog" in globals()
