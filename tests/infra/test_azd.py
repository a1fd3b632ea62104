"""`azd up` wiring: azure.yaml, the parameters azd passes, the tagged service, the image hook, the package contents.

azd is not installed here: these tests check what azd reads (azure.yaml, main.bicepparam, the Bicep tags and
outputs, .funcignore) and run the POSIX hook against a fake `az`. The PowerShell hook is checked only for reading the
same variables. Behaviours of azd relied upon (Azure/azure-dev, cli/azd/pkg): the Bicep provider prefers
<module>.bicepparam to <module>.bicep + <module>.parameters.json (bicep_provider.go, modulePath); a `function`
service is the resource tagged azd-service-name: <service> in AZURE_RESOURCE_GROUP; hooks see the azd environment,
main.bicep's outputs included.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pathspec
import pytest
import yaml

from tests.infra import bicep_tree as bt
from tests.infra.bicep_tree import Expr

AZURE_YAML = bt.REPO / "azure.yaml"
# Set by azd itself in every environment (or by its prompts), not by main.bicep.
AZD_BUILTINS = {"AZURE_ENV_NAME", "AZURE_LOCATION", "AZURE_SUBSCRIPTION_ID", "AZURE_PRINCIPAL_ID"}
# Knobs a hook reads that the user may set with `azd env set`; absent means the default.
HOOK_KNOBS = {"WORKER_IMAGE_BUILD"}
# What the Function App package must hold at its top level, and nothing else.
PACKAGE = {"function_app.py", "host.json", "requirements.txt", "functions", "shared"}


def azure_yaml() -> dict[str, Any]:
    loaded = yaml.safe_load(AZURE_YAML.read_text())
    assert isinstance(loaded, dict)
    return loaded


def infra_dir() -> Path:
    infra = azure_yaml()["infra"]
    assert infra.get("provider", "bicep") == "bicep"
    return bt.REPO / str(infra.get("path", "infra"))


def hook_scripts() -> list[Path]:
    scripts = []
    for hook in azure_yaml().get("hooks", {}).values():
        for platform in ("posix", "windows"):
            scripts.append(bt.REPO / hook[platform]["run"])
    return scripts


def test_azure_yaml_provisions_main_bicep_at_subscription_scope() -> None:
    config = azure_yaml()
    assert config["name"]
    module = config["infra"].get("module", "main")
    assert (infra_dir() / f"{module}.bicep").resolve() == (bt.BICEP_DIR / "main.bicep").resolve()
    assert "targetScope = 'subscription'" in (bt.BICEP_DIR / "main.bicep").read_text()


def test_azd_reads_main_bicepparam_so_no_parameters_json_beside_it() -> None:
    """azd uses main.bicepparam when it exists and would silently ignore a main.parameters.json next to it."""
    assert (infra_dir() / "main.bicepparam").is_file()
    assert not (infra_dir() / "main.parameters.json").exists()


def test_the_parameters_file_sets_main_params_and_every_required_one() -> None:
    main_params = bt.main().params
    given = set(bt.bicepparam().variables)  # bicep_tree reads each `param x = ...` of a .bicepparam as a var
    assert given <= set(main_params), f"not parameters of main.bicep: {sorted(given - set(main_params))}"
    required = {name for name, p in main_params.items() if p.value is None}
    assert required <= given, f"required by main.bicep, not set: {sorted(required - given)}"
    # azd's own environment names the environment and region; nothing else is required of the user but the key.
    source = (bt.BICEP_DIR / "main.bicepparam").read_text()
    assert "param environmentName = readEnvironmentVariable('AZURE_ENV_NAME'" in source
    assert "param location = readEnvironmentVariable('AZURE_LOCATION'" in source
    without_default = set(re.findall(r"readEnvironmentVariable\('(\w+)'\)", source))
    assert without_default == {"GPU_SSH_PUBLIC_KEY"}


def _tag_of(resource: bt.Declaration) -> str:
    tags = resource.value.get("tags")
    return tags.text if isinstance(tags, Expr) else repr(tags)


def test_every_service_is_a_resource_tagged_with_its_name() -> None:
    sites = [r for p in bt.bicep_files() for r in bt.load(p).resources_of_type("Microsoft.Web/sites")]
    for name, service in azure_yaml()["services"].items():
        assert service["host"] == "function"
        tagged = [r for r in sites if f"'azd-service-name': '{name}'" in _tag_of(r)]
        assert len(tagged) == 1, f"service {name}: one Microsoft.Web/sites tagged azd-service-name: {name}"
        assert str(tagged[0].value["kind"]).startswith("functionapp")
        assert (bt.REPO / service["project"] / "function_app.py").is_file()
    # azd looks for the tagged resources in this resource group (an output of the subscription-scope deployment).
    assert bt.main().outputs["AZURE_RESOURCE_GROUP"].value == Expr("rg.name")
    assert "'azd-env-name': environmentName" in bt.main().variables["allTags"].value.text


def _variables_read(script: Path) -> set[str]:
    text = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("#"))
    if script.suffix == ".ps1":
        names = set(re.findall(r"\$env:([A-Z][A-Z0-9_]*)", text))
        for block in re.findall(r"foreach \(\$name in ([^)]*)\)", text):
            names |= set(re.findall(r"'(\w+)'", block))
        return names
    return set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", text))


@pytest.mark.parametrize("script", hook_scripts(), ids=lambda p: p.name)
def test_hooks_run_scripts_that_exist_and_read_outputs_that_exist(script: Path) -> None:
    assert script.is_file(), script
    unknown = _variables_read(script) - set(bt.main().outputs) - AZD_BUILTINS - HOOK_KNOBS
    assert unknown == set(), f"{script.name} reads variables no main.bicep output sets: {sorted(unknown)}"


def test_both_hook_variants_read_the_same_variables() -> None:
    by_suffix = {p.suffix: _variables_read(p) for p in hook_scripts()}
    assert by_suffix[".sh"] == by_suffix[".ps1"]


def test_the_hook_pushes_the_image_the_workers_pull_from_the_registry_they_pull_from() -> None:
    main = bt.main()
    assert main.outputs["WORKER_IMAGE"].value == Expr("workerImage")
    assert main.outputs["AZURE_CONTAINER_REGISTRY_NAME"].value == Expr("registry.outputs.registryName")
    workers = main.modules["gpuWorkers"].value["params"]
    assert workers["workerImage"] == Expr("workerImage")
    assert workers["registryLoginServer"] == Expr("registry.outputs.loginServer")
    assert bt.module("gpu-vmss").variables["image"].value == Expr("'${registryLoginServer}/${workerImage}'")


def run_hook(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the POSIX hook with a fake `az` first on PATH; returns the run and the fake's recorded calls."""
    calls = tmp_path / "az-calls"
    fake = tmp_path / "bin" / "az"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$(pwd)|$*" >> "{calls}"\n')
    fake.chmod(0o755)
    base = {"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)}
    script = next(p for p in hook_scripts() if p.suffix == ".sh")
    run = subprocess.run(
        ["sh", str(script)], env={**base, **env}, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    return run, calls.read_text().splitlines() if calls.exists() else []


AZD_ENV = {
    "AZURE_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000001",
    "AZURE_CONTAINER_REGISTRY_NAME": "crexample",
    "WORKER_IMAGE": "crop-ai-worker:latest",
}


def test_the_hook_builds_dockerfile_gpu_in_acr_from_the_repository_root(tmp_path: Path) -> None:
    run, calls = run_hook(tmp_path, **AZD_ENV)
    assert run.returncode == 0, run.stderr
    assert calls == [
        f"{bt.REPO}|acr build --subscription 00000000-0000-0000-0000-000000000001 --registry crexample"
        " --image crop-ai-worker:latest --file Dockerfile.gpu ."
    ]
    assert (bt.REPO / "Dockerfile.gpu").is_file()
    assert (bt.REPO / ".dockerignore").is_file()


def test_the_hook_can_be_switched_off(tmp_path: Path) -> None:
    run, calls = run_hook(tmp_path, **AZD_ENV, WORKER_IMAGE_BUILD="false")
    assert (run.returncode, calls) == (0, [])


@pytest.mark.parametrize("missing", sorted(AZD_ENV))
def test_the_hook_stops_before_az_without_the_outputs(tmp_path: Path, missing: str) -> None:
    run, calls = run_hook(tmp_path, **{k: v for k, v in AZD_ENV.items() if k != missing})
    assert run.returncode != 0
    assert calls == []
    assert missing in run.stderr


def _package_spec() -> Any:
    return pathspec.GitIgnoreSpec.from_lines((bt.REPO / ".funcignore").read_text().splitlines())


def _top_level_entries() -> set[str]:
    """Top-level names of the files a checkout holds (tracked, or new and not git-ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=bt.REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return {line.split("/")[0] for line in listed.stdout.splitlines() if line}


def test_the_function_package_is_the_app_and_nothing_else() -> None:
    spec = _package_spec()
    entries = _top_level_entries()
    packaged = {e for e in entries if not spec.match_file(e + "/" if (bt.REPO / e).is_dir() else e)}
    assert packaged == PACKAGE, "a new top-level entry must be listed in .funcignore (or be part of the app)"
    # What azd's Python restore and local tooling create must stay out too (azd: <project dir>_env).
    made_here = (".venv/", f"{bt.REPO.name}_env/", "__pycache__/", "functions/__pycache__/x.pyc", "local.settings.json")
    for made in made_here:
        assert spec.match_file(made), made
    for kept in ("functions/submit.py", "shared/settings.py", "shared/migrations/0001.sql"):
        assert not spec.match_file(kept), kept


def test_the_app_imports_nothing_the_package_leaves_out() -> None:
    first_party = {p.name for p in bt.REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    left_out = first_party - PACKAGE
    sources = [bt.REPO / "function_app.py", *(bt.REPO / "functions").rglob("*.py"), *(bt.REPO / "shared").rglob("*.py")]
    for source in sources:
        imported = set(re.findall(r"^\s*(?:from|import) (\w+)", source.read_text(), flags=re.MULTILINE))
        assert not imported & left_out, f"{source.relative_to(bt.REPO)} imports {sorted(imported & left_out)}"


TYPECHECK = Path("/work/shared/tools/bicep-typecheck/check")


@pytest.mark.skipif(not TYPECHECK.exists(), reason="the offline Bicep type checker is not on this machine")
def test_the_bicep_type_check_finds_no_error() -> None:
    """Microsoft's published type data (type@apiVersion, properties, enums, read-only) and the parameter flow."""
    run = subprocess.run(
        [str(TYPECHECK), "infra/bicep"],
        cwd=bt.REPO,
        env={**os.environ, "SKIP_SELFTEST": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    counts = [int(n) for n in re.findall(r"^== error: (\d+)$", run.stdout, flags=re.MULTILINE)]
    assert counts, run.stdout[-4000:]
    assert set(counts) == {0}, run.stdout[-4000:]
    assert "(error)" not in run.stdout
