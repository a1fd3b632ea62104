"""The syntax gate (checkov exits 0 on parse errors, so it cannot be one) and a compiler-like cross-file check."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.infra import bicep_tree as bt

FILES = bt.bicep_files()
STORAGE = "resource sa 'Microsoft.Storage/storageAccounts@2023-05-01'"
EXPECTED_MODULES = {
    "alerts",
    "autoscale",
    "functionapp",
    "gpu-vmss",
    "identities",
    "monitoring",
    "network",
    "postgres",
    "registry",
    "roles",
    "servicebus",
    "storage",
    "workbook",
}


def _id(path: Path) -> str:
    return str(path.relative_to(bt.BICEP_DIR))


def test_the_bicep_tree_is_all_there() -> None:
    assert bt.BICEP_DIR / "main.bicep" in FILES
    assert {p.stem for p in bt.MODULES_DIR.glob("*.bicep")} == EXPECTED_MODULES


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_every_bicep_file_parses_without_errors(path: Path) -> None:
    assert bt.syntax_errors(path.read_bytes()) == []


def test_bicepparam_parses_and_uses_main() -> None:
    source = (bt.BICEP_DIR / "main.bicepparam").read_bytes()
    assert bt.syntax_errors(bt.bicepparam_as_bicep(source)) == []
    assert b"using 'main.bicep'" in source


@pytest.mark.parametrize(
    "snippet",
    [
        pytest.param(f"{STORAGE} = {{\n  name: 'x'\n", id="unclosed-object"),
        pytest.param("param name string = 'unterminated\n", id="unterminated-string"),
        pytest.param(f"{STORAGE} {{\n  name: 'x'\n}}\n", id="missing-equals"),
        pytest.param("var x = [\n  1\n  2\n", id="unclosed-array"),
        pytest.param("output url string = 'https://${site.name/api'\n", id="unclosed-interpolation"),
        pytest.param("param a int = (1 + \n", id="dangling-operator"),
    ],
)
def test_the_gate_catches_broken_bicep(snippet: str) -> None:
    assert bt.syntax_errors(snippet.encode()) != []


def test_the_gate_catches_a_broken_bicepparam() -> None:
    assert bt.syntax_errors(bt.bicepparam_as_bicep(b"using 'main.bicep'\nparam location = 'westeurope\n")) != []


def test_bicepparam_sets_only_declared_params_and_every_required_one() -> None:
    declared = bt.main().params
    given = bt.bicepparam().variables
    assert set(given) - set(declared) == set()
    required = {name for name, p in declared.items() if p.value is None and "?" not in p.type}
    assert required - set(given) == set()


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_every_parameter_has_a_description(path: Path) -> None:
    params = bt.load(path).params
    assert params, f"{path.name} declares no parameters"
    undescribed = [name for name, p in params.items() if not (p.decorators.get("description") or [""])[0]]
    assert undescribed == []


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_modules_are_called_with_exactly_their_parameters(path: Path) -> None:
    """What `bicep build` would refuse: unknown or missing module parameters, missing module files."""
    for name, call in bt.load(path).modules.items():
        target = path.parent / call.type
        assert target.is_file(), f"module {name}: {call.type} does not exist"
        declared = bt.load(target).params
        passed = set(bt.dig(call.value, "params"))
        assert passed - set(declared) == set(), f"module {name} passes unknown parameters"
        required = {n for n, p in declared.items() if p.value is None}
        assert required - passed == set(), f"module {name} misses required parameters"


def test_main_wires_every_module() -> None:
    called = {Path(m.type).stem for m in bt.main().modules.values()}
    assert called == EXPECTED_MODULES


def test_files_loaded_by_load_text_content_exist() -> None:
    vmss = bt.module("gpu-vmss")
    template = bt.dig(vmss.variables, "cloudInitTemplate").value
    assert isinstance(template, bt.Expr)
    assert template.text == "loadTextContent('gpu-worker.cloud-init.yaml')"
    assert (bt.MODULES_DIR / "gpu-worker.cloud-init.yaml").is_file()
