"""One meaning per name: `tokenizer` is the text tokenizer everywhere in lavit's code (transformers' meaning, as in
`processor.tokenizer`); the frozen visual tokenizer is always `visual_tokenizer`."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the folders whose code is lavit's own
FOLDERS = ("modeling_lavit", "processing", "training", "hub_cards", "lavit")
VISUAL_SOURCES = ("visual_tokenizer", "LaVITTokenizerModel")


def visual_tokenizer_bindings(path: Path) -> list[str]:
    """`tokenizer = <a visual tokenizer>` (also in tuple assignments) in the file: line and source of each."""
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            names = target.elts if isinstance(target, ast.Tuple) else [target]
            values = node.value.elts if isinstance(node.value, ast.Tuple) and isinstance(target, ast.Tuple) else \
                [node.value] * len(names)
            for name, value in zip(names, values, strict=False):
                if not (isinstance(name, ast.Name) and name.id == "tokenizer"):
                    continue
                text = ast.get_source_segment(source, value) or ""
                if any(word in text for word in VISUAL_SOURCES):
                    found.append(f"{path.name}:{node.lineno}: {ast.get_source_segment(source, node)}")
    return found


@pytest.mark.parametrize("folder", FOLDERS)
def test_tokenizer_never_names_the_visual_tokenizer(folder):
    bindings = [line for path in sorted((ROOT / folder).rglob("*.py")) for line in visual_tokenizer_bindings(path)]
    assert not bindings, "name it visual_tokenizer:\n" + "\n".join(bindings)


def test_the_check_finds_a_visual_tokenizer_named_tokenizer(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("tokenizer, config = model.visual_tokenizer, model.config\ntokenizer = processor.tokenizer\n")
    assert visual_tokenizer_bindings(path) == ["probe.py:1: tokenizer, config = model.visual_tokenizer, model.config"]
