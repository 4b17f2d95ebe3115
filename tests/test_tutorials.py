"""Every code block of the README and of the documentation runs, and every network it builds
trains: each parameter of each ``nn.Module`` a page creates has moved by the end of the page
(a model that forgets ``pyro.module`` trains nothing, silently, and fails here)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pyro
import pytest
import torch
from torch.nn.modules.module import register_module_parameter_registration_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.rst"))]


def code_blocks(path: Path) -> list[str]:
    """The Python code of a Markdown page (```python fences) or of an RST page
    (``.. code-block:: python`` and ``.. testcode::`` directives), in order."""
    text = path.read_text()
    if path.suffix == ".md":
        return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    blocks = []
    for match in re.finditer(r"^( *)\.\. (?:code-block:: python|testcode::)[^\n]*\n"
                             r"((?:\1 {3}:[^\n]*\n)*)\n((?:\1 {3}[^\n]*\n|\s*\n)+)",
                             text, flags=re.M):
        blocks.append(textwrap.dedent(match.group(3)).strip() + "\n")
    return blocks


def test_code_blocks_are_found():
    readme = code_blocks(ROOT / "README.md")
    assert any("SVI(" in block for block in readme)
    sample = Path(__file__).with_name("_tmp_page.rst")
    sample.write_text("T\n=\n\n.. code-block:: python\n   :caption: c\n\n    a = 1\n\n    b = a\n"
                      "\nText.\n\n.. code-block:: text\n\n    not python\n\n"
                      "* item\n\n  .. testcode::\n\n      c = 2\n")
    try:
        assert code_blocks(sample) == ["a = 1\n\nb = a\n", "c = 2\n"]
    finally:
        sample.unlink()


PAGES_WITH_CODE = [page for page in PAGES if code_blocks(page)]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda page: str(page.relative_to(ROOT)))
def test_page_runs_and_trains_every_network_it_builds(page, data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("PYRO_DGM_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)  # files a page writes land in a temporary folder
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    parameters: list[torch.nn.Parameter] = []
    before: dict[int, torch.Tensor] = {}

    def registered(module, name, parameter):
        if parameter is not None:
            parameters.append(parameter)

    def snapshot(optimizer, args, kwargs):  # values before their first update
        for parameter in parameters:
            before.setdefault(id(parameter), parameter.detach().clone())

    hooks = [register_module_parameter_registration_hook(registered),
             register_optimizer_step_pre_hook(snapshot)]
    try:
        namespace: dict = {"__name__": "__page__"}
        for block in code_blocks(page):
            exec(compile(block, str(page), "exec"), namespace)  # noqa: S102
    finally:
        for hook in hooks:
            hook.remove()
    assert parameters, f"{page.name} builds no network"
    untrained = [tuple(p.shape) for p in parameters
                 if id(p) not in before or torch.equal(before[id(p)], p.detach())]
    assert not untrained, f"{page.name}: parameters that never moved: {untrained}"
