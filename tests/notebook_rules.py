"""What a tutorial must hold, as functions of its JSON: used by tests/test_tutorials.py and by `make e2e`.

- Widget state: every widget an output shows can be rebuilt from the state saved
  with the notebook, and the state holds nothing else (no models no output uses).
- Prose: a number in a markdown cell also stands in the notebook's code or outputs,
  and no markdown cell states a timing or a winner (a re-run could change it).
- Code lines fit an editor 88 columns wide.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
CODE_COLUMNS = 88

# A number standing alone: not part of a name (FSDP1, bf16, l2.weight), not a version's piece.
NUMBER = re.compile(r"(?<![\w.\-/])(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?![\w])")
# Timing and winner words: what a re-run can change. "ms" as a unit only.
WINNER_WORDS = re.compile(r"\b(faster|slower|quicker|fastest|slowest|usually|wins|winner|ms)\b", re.IGNORECASE)


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    return "".join(cell.get("source", ""))


# ---- widget state ------------------------------------------------------------------------------


def widget_models(nb: dict) -> dict[str, dict]:
    """The widget models saved with the notebook, by model id."""
    return nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})


def shown_widgets(nb: dict) -> set[str]:
    """Model ids that outputs display."""
    found = set()
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get(WIDGET_VIEW)
            if view and view.get("model_id"):
                found.add(view["model_id"])
    return found


def reachable_widgets(nb: dict) -> set[str]:
    """The displayed models and every model they refer to ("IPY_MODEL_<id>"), transitively."""
    models, todo, seen = widget_models(nb), list(shown_widgets(nb)), set()
    while todo:
        model_id = todo.pop()
        if model_id in seen:
            continue
        seen.add(model_id)
        todo += re.findall(r"IPY_MODEL_([0-9a-f]+)", json.dumps(models.get(model_id, {})))
    return seen


def widget_state_problems(nb: dict) -> list[str]:
    """Shown widgets whose model was not saved ("model not found" on reopen), and saved models no output uses."""
    models = widget_models(nb)
    reachable = reachable_widgets(nb)
    problems = [f"an output shows widget {m}, whose model is not saved" for m in sorted(reachable - set(models))]
    problems += [f"widget model {m} is saved but no output uses it" for m in sorted(set(models) - reachable)]
    return problems


# ---- prose -------------------------------------------------------------------------------------


def code_and_outputs_text(nb: dict) -> str:
    """Everything the notebook's code cells hold and print, as one text."""
    parts = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        parts.append(_source(cell))
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            for mime in ("text/plain", "text/html", "text/markdown"):
                parts.append("".join(out.get("data", {}).get(mime, "")))
            parts.append("\n".join(out.get("traceback", [])))
    return "\n".join(parts)


def _prose(markdown: str) -> str:
    """Markdown without headings (their numbering) and without code spans and blocks (code, not claims)."""
    text = re.sub(r"```.*?```", " ", markdown, flags=re.S)
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(re.sub(r"^\s*\d+\.\s", " ", ln) for ln in lines)  # list numbering
    return re.sub(r"\b(?:[Nn]otebooks?|[Tt]utorials?) \d\d\b", " ", text)  # "notebook 02": another file


def numbers_not_shown(nb: dict, allowed: set[str] = frozenset()) -> list[str]:
    """Numbers in markdown prose that appear nowhere in the notebook's code or outputs."""
    shown = code_and_outputs_text(nb)
    missing = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        prose = _prose(_source(cell))
        spans = " ".join(re.findall(r"`([^`]*)`", prose))  # quoted code counts as shown if it is in the code
        for match in NUMBER.finditer(prose):
            number = match.group(1)
            plain = number.replace(",", "")
            if number in allowed or plain in allowed:
                continue
            pattern = rf"(?<![\w.]){re.escape(plain)}(?![\w])"
            if not re.search(pattern, shown.replace(",", "")) and not (
                re.search(pattern, spans) and re.search(pattern, shown)
            ):
                missing.append(f"cell {i}: {number!r} in: {prose.strip()[:80]!r}")
    return missing


def winner_words(nb: dict, allowed: set[str] = frozenset()) -> list[str]:
    """Timing and winner words in markdown, unless the sentence quotes an output word for word."""
    shown = code_and_outputs_text(nb)
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", _source(cell)):
            for match in WINNER_WORDS.finditer(sentence):
                quoted = re.findall(r"`([^`]+)`", sentence)
                if any(q in shown and match.group(0) in q for q in quoted):
                    continue
                if f"{i}:{match.group(0).lower()}" in allowed:
                    continue
                found.append(f"cell {i}: {match.group(0)!r} in: {sentence.strip()[:100]!r}")
    return found


def long_code_lines(nb: dict, columns: int = CODE_COLUMNS) -> list[str]:
    """Code lines wider than the editor shows without scrolling."""
    return [
        f"cell {i}: {len(line)} columns: {line[:60]!r}..."
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code"
        for line in _source(cell).splitlines()
        if len(line) > columns
    ]
