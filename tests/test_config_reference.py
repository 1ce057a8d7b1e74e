"""docs/configuration.md is generated from the configuration dataclasses' docstrings and kept current."""

import dataclasses
import sys

import pytest

import config_reference
from config_reference import UndocumentedConfig, collect, docstring_parts, render
from helpers import ROOT, run


def test_configuration_page_is_current():
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text(encoding="utf-8") == render(), (
        f"docs/configuration.md is stale: regenerate it with `{config_reference.COMMAND}`"
    )


def test_every_config_key_is_on_the_page():
    from trainer.config import ExperimentConfig, to_dict

    def keys(d, prefix=""):
        for k, v in d.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]

    text = render()
    missing = [k for k in keys(to_dict(ExperimentConfig())) if f"| `{k}` |" not in text]
    assert not missing


def test_check_mode_exit_codes(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    r = run([sys.executable, "scripts/config_reference.py", "--check", "--out", stale])
    assert r.returncode == 1 and "python scripts/config_reference.py" in r.stderr
    run([sys.executable, "scripts/config_reference.py", "--out", stale], check=True)
    assert run([sys.executable, "scripts/config_reference.py", "--check", "--out", stale]).returncode == 0


@dataclasses.dataclass
class _Inner:
    """Inner part.

    Attributes:
      a: documented, over
        two lines.
    """

    a: int = 1
    b: str = "x"


@dataclasses.dataclass
class _Outer:
    """Outer.

    Attributes:
      gone: a field that was removed.
    """

    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_undocumented_field_is_an_error():
    with pytest.raises(UndocumentedConfig) as e:
        collect(_Outer)
    assert e.value.args[0] == [
        f"inner.b ({__name__}._Inner): no entry under Attributes:",
        f"gone ({__name__}._Outer): Attributes entry for no field",
    ]


@dataclasses.dataclass
class _Bare:
    x: int = 0


@dataclasses.dataclass
class _Holder:
    """Holds a section that has neither an entry here nor a docstring."""

    bare: _Bare = dataclasses.field(default_factory=_Bare)


def test_section_without_docstring_or_entry_is_an_error():
    with pytest.raises(UndocumentedConfig) as e:
        collect(_Holder)
    assert e.value.args[0] == [
        f"bare ({__name__}._Holder): no Attributes entry and no docstring in _Bare",
        f"bare.x ({__name__}._Bare): no entry under Attributes:",
    ]


def test_docstring_parts_joins_continuation_lines():
    summary, prose, attrs = docstring_parts(_Inner)
    assert (summary, prose, attrs) == ("Inner part.", "", {"a": "documented, over two lines."})
