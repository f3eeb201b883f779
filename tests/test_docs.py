"""The documentation stays true: README.md and every page of docs/.

- Every ```python block runs on the CPU, as written, in a fresh namespace (a block may use only the names it
  defines). Convention: a block that needs a model reads the folders `make demo` (`lavit demo`) writes in the
  working directory, `lavit-demo/hub_folder` (a `LaVITPipeline` folder: `language_model/`, `processor/`, the pixel
  decoder) and `lavit-demo/data/digits_train`, `lavit-demo/data/digits_eval` (imagefolders of digits), so a reader
  who ran the quickstart can paste it. The test runs each block in its own empty working directory beside such a
  `lavit-demo/`, built untrained in seconds with the demo's own configs and data writers (`demo_folder`). Nothing
  is substituted in the block's text.
- A block that cannot run here (a GPU, the official release files, a running server, a download) is preceded by
  `<!-- docs-test: skip (the reason) -->`; every block, skipped or not, must compile, and every skip has a reason.
- Every relative link resolves (relative to its page; a `#heading` too), and every path written in code
  (`training/configs/zero2.json`, in backticks or in a code block) that starts at a top-level entry of the repository
  exists; no page points outside the repository (`../`, absolute file links, the project's `shared/` folder).

The block-running test is slow (about 30-60 s for all blocks on 2 cores); the rest is fast.
"""

import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b(.*?)-->")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def code_blocks(page: Path) -> list[dict]:
    """Every fenced block of `page`: language, code, line, and the skip reason of a `docs-test: skip` comment right
    before it (None when it runs; "" when the comment gives no reason)."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip().rpartition("\n")[2]  # the line right before the block
        skip = SKIP.fullmatch(before.strip())
        reason = None
        if skip is not None:
            reason = skip.group(1).strip().removeprefix("(").removesuffix(")").strip()
        blocks.append({"language": match.group(1), "code": match.group(2), "reason": reason,
                       "line": text.count("\n", 0, match.start()) + 1})
    return blocks


def python_blocks() -> list:
    return [pytest.param(page, block, id=f"{page.relative_to(REPO_ROOT)}:{block['line']}")
            for page in PAGES for block in code_blocks(page) if block["language"] == "python"]


def tracked_top_level() -> set[str]:
    """The top-level entries of the repository (tracked files only: a git-ignored `lavit-demo/` is the user's)."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: what is there but what git ignores
        ignored = {line.strip("/") for line in (REPO_ROOT / ".gitignore").read_text().split() if "*" not in line}
        return {entry.name for entry in REPO_ROOT.iterdir() if entry.name not in ignored | {".git"}}
    return {name.split("/", 1)[0] for name in files}


def written_paths(page: Path) -> list[str]:
    """The words of `page`'s code spans and code blocks that look like paths (hold a `/`, or are a top-level file)."""
    text = page.read_text()
    words = []
    for chunk in [match.group(2) for match in FENCE.finditer(text)] + CODE_SPAN.findall(FENCE.sub("", text)):
        for word in chunk.split():
            word = word.strip("\"'`,;:()[]{}").split("::", 1)[0]
            if "/" in word and "://" not in word or word in {"Makefile", "pyproject.toml"}:
                words.append(word)
    return words


def test_the_readme_test_command_is_the_one_ci_runs():
    """The front page tells a new user to run `make test`, the command `.ci/run` runs."""
    commands = [line.split("#", 1)[0].strip() for block in code_blocks(REPO_ROOT / "README.md")
                if block["language"] == "bash" for line in block["code"].splitlines()]
    assert "make test" in commands, commands
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text().splitlines()


def test_pages_are_found():
    names = {page.name for page in PAGES}
    assert {"README.md", "ARCHITECTURE.md", "training.md", "cli.md"} <= names, names


def anchors(page: Path) -> set[str]:
    """The `#fragment` of each heading of `page` as GitHub writes it: lower case, punctuation dropped, spaces -> '-'."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_relative_links_resolve_inside_the_repository(page):
    problems = []
    for match in LINK.finditer(FENCE.sub("", page.read_text())):
        target, _, fragment = (match.group(1) or match.group(2)).partition("#")
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        resolved = (page.parent / target).resolve() if target else page
        if target.startswith(("/", "~")):
            problems.append(f"{target}: an absolute path (link relative to the page)")
        elif not resolved.is_relative_to(REPO_ROOT):
            problems.append(f"{target}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"{target}#{fragment}: no such heading")
    assert not problems, f"{page.name}: {problems}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_paths_in_code_exist_and_stay_inside_the_repository(page):
    top_level = tracked_top_level()
    problems = []
    for word in written_paths(page):
        first = word.split("/", 1)[0]
        if word.startswith("../") or first == "shared" or "/shared/" in word:
            problems.append(f"{word}: outside the repository")
        elif first in top_level:
            fixed = re.split(r"[<{*]", word, maxsplit=1)[0]  # `tests/<folder>/test_<module>.py`: `tests/`
            if not (REPO_ROOT / (fixed if fixed == word else fixed.rpartition("/")[0])).exists():
                problems.append(f"{word}: no such file")
    assert not problems, f"{page.name}: {problems}"


@pytest.mark.parametrize(("page", "block"), python_blocks())
def test_python_block_compiles_and_every_skip_has_a_reason(page, block):
    compile(block["code"], f"{page.name}:{block['line']}", "exec")
    assert block["reason"] != "", f"{page.name}:{block['line']}: `docs-test: skip` needs a reason: skip (why)"


def test_every_skip_comment_belongs_to_a_block():
    for page in PAGES:
        text = page.read_text()
        comments = len(re.findall(r"^<!--\s*docs-test:", text, re.M))
        skipped = sum(block["reason"] is not None for block in code_blocks(page))
        assert comments == skipped, f"{page.name}: a `docs-test` comment must sit right before a code block"


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory) -> Path:
    """A folder holding `lavit-demo/` as `lavit demo` writes it (its Hub folder and digit imagefolders), untrained:
    the demo's configs ('small' tokenizer, 'tiny' decoder, a 2-layer LLaMA with a BPE tokenizer on its corpus)."""
    from lavit.hub_cards import export_loaded
    from lavit.training.arguments import load_config_preset
    from lavit.training.language_model import write_small_language_model
    from lavit.training.sample_data import DIGIT_NAMES, digit_caption
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lavit import (
        LaVITDetokenizer,
        LaVITForCausalLM,
        LaVITImageProcessor,
        LaVITPipeline,
        LaVITProcessor,
        LaVITTokenizerConfig,
        LaVITTokenizerModel,
    )
    from lavit.demo import DIGIT_QUESTION, write_digit_data

    root = tmp_path_factory.mktemp("docs") / "lavit-demo"
    write_digit_data(root / "data" / "digits_train", 32, offset=0)
    write_digit_data(root / "data" / "digits_eval", 8, offset=1797 - 8)
    corpus = [digit_caption(label) for label in range(10)] + [
        f"Question: {DIGIT_QUESTION} Answer: {name}" for name in DIGIT_NAMES]
    language_model = write_small_language_model(root / "runs" / "language_model", corpus, vocab_size=120,
                                                hidden_size=64)
    torch.manual_seed(0)
    tokenizer = LaVITTokenizerModel(LaVITTokenizerConfig(**load_config_preset("small", "tokenizer")))
    text_tokenizer = AutoTokenizer.from_pretrained(language_model)
    text_vocab_size = LaVITProcessor.add_image_tokens(text_tokenizer, tokenizer.config.codebook_size)
    model = LaVITForCausalLM.from_components(tokenizer, AutoModelForCausalLM.from_pretrained(language_model),
                                             text_vocab_size=text_vocab_size).eval()
    processor = LaVITProcessor(LaVITImageProcessor.from_tokenizer_config(tokenizer.config), text_tokenizer)
    detokenizer = LaVITDetokenizer.from_visual_tokenizer(tokenizer, **load_config_preset("tiny", "detokenizer"))
    pipe = LaVITPipeline.from_detokenizer(model, processor, detokenizer)
    export_loaded(model, processor, root / "hub_folder", {}, pipeline=pipe)
    return root


@pytest.mark.slow
@pytest.mark.parametrize(("page", "block"), python_blocks())
def test_python_block_runs(page, block, demo_folder, tmp_path, monkeypatch):
    if block["reason"]:
        pytest.skip(block["reason"])
    (tmp_path / "lavit-demo").symlink_to(demo_folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    exec(compile(block["code"], f"{page.name}:{block['line']}", "exec"), {"__name__": "__main__"})
    assert Path.cwd() == tmp_path, "a block must not change the working directory"


def test_the_repository_root_holds_the_fixed_layout_only():
    """The top level is the project's fixed layout and its build files: a stray log or scratch file committed by
    mistake (as `ft_full.log` once was) fails here."""
    layout = {"modeling_lavit", "processing", "training", "hub_cards", "tests", "pyproject.toml", "README.md",
              "lavit", "benchmarks", "docs"}
    build = {".ci", ".gitignore", "Makefile", "requirements"}
    assert tracked_top_level() - layout - build == set()
