"""The tutorials say what they show: prose a re-run cannot contradict, saved state that reopens, code that fits.

Rules (tests/notebook_rules.py):
1. A number in a markdown cell also stands in that notebook's code or outputs, so a
   reader can see where it comes from (`Linear(4, 6)`, `93 elements`).
2. No markdown cell states a timing or a winner ("faster", "slower", "usually",
   "ms"): a cell prints those, from its own run.
3. Saved widget state holds what the outputs show and nothing else.
4. Code lines fit an editor 88 columns wide.
`make e2e` applies rule 3 to each notebook again after a real save in JupyterLab.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from notebook_rules import load, long_code_lines, numbers_not_shown, widget_state_problems, winner_words

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

# The few numbers prose may state without a cell showing them, each with why.
NUMBERS_ALLOWED = {
    "8": "bf16 keeps 8 bits of precision: a property of the format, not of a run",
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_numbers_in_prose_are_shown_by_the_notebook(path):
    assert numbers_not_shown(load(path), set(NUMBERS_ALLOWED)) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_prose_states_a_timing_or_a_winner(path):
    assert winner_words(load(path)) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_saved_widget_state_is_what_the_outputs_show(path):
    assert widget_state_problems(load(path)) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_fits_88_columns(path):
    assert long_code_lines(load(path)) == []


def _notebook(markdown: str, code: str = "", output: str = "", widgets: dict | None = None, shown: str = "") -> dict:
    outputs = [{"output_type": "stream", "name": "stdout", "text": [output]}] if output else []
    if shown:
        view = {"application/vnd.jupyter.widget-view+json": {"model_id": shown}, "text/plain": ["x"]}
        outputs.append({"output_type": "display_data", "data": view, "metadata": {}})
    nb = {
        "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": [markdown]},
            {"cell_type": "code", "metadata": {}, "source": [code], "outputs": outputs, "execution_count": 1},
        ],
        "metadata": {},
    }
    if widgets is not None:
        nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": widgets}}
    return nb


def test_the_rules_can_fail():
    # a number only the prose knows, and the same number once a cell prints it
    assert numbers_not_shown(_notebook("Each rank holds 47 elements.")) != []
    assert numbers_not_shown(_notebook("Each rank holds 47 elements.", output="47 local elements")) == []
    assert numbers_not_shown(_notebook("## 2. Headings and `code` aside, 1. list items")) == []
    # a winner, and the same words quoted from an output
    assert winner_words(_notebook("On this machine FSDP1 is usually the faster one.")) != []
    assert winner_words(_notebook("The cell says `faster: FSDP2`.", output="faster: FSDP2 (0.97x)")) == []
    assert winner_words(_notebook("It takes 30 ms.")) != []
    # widget state: a shown model with its child, an orphan, and a shown model that was not saved
    parent = {"state": {"children": ["IPY_MODEL_b"]}}
    assert widget_state_problems(_notebook("x", widgets={"a": parent, "b": {}}, shown="a")) == []
    assert len(widget_state_problems(_notebook("x", widgets={"a": parent, "b": {}, "c": {}}, shown="a"))) == 1
    assert len(widget_state_problems(_notebook("x", widgets={}, shown="a"))) == 1
    assert long_code_lines(_notebook("x", code="y = " + "1 + " * 30 + "1")) != []
