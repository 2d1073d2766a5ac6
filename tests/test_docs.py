"""README.md, CHANGELOG.md and docs/*.md stay valid: code blocks parse, links and anchors resolve, and the files,
functions and `lisa_peft` names they mention exist.

* python blocks compile (`compile()`; tests/test_readme.py runs the Quick start, compact-model, LoRA and
  evaluation examples); bash blocks pass `bash -n`; mermaid blocks name a diagram type and close every
  subgraph; yaml blocks load; every block names its language;
* a repository path in a code block or an inline code span (`scripts/demo.sh`, `benchmarks/prefill.py`, ...)
  exists; `file.py: name` names a function, class or constant defined in that file; `lisa_peft.x.y` imports;
* a relative link points at an existing file, an anchor link (`#section`, `file.md#section`) at an existing
  heading of the target (GitHub's heading ids);
* no reference to files outside the repository, no session diary or issue numbers, and the README stays a
  guide (a line limit).
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *DOCS]
README_MAX_LINES = 300  # a guide; reference material goes to docs/

LANGUAGES = {"python", "bash", "mermaid", "yaml", "text"}
MERMAID_TYPES = ("flowchart", "graph", "sequenceDiagram", "classDiagram", "stateDiagram")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[(?:[^\]\n]|\][^(\n])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
REPO_PATH = re.compile(
    r"(?<![\w./~-])((?:\.ci|benchmarks|docs|kernels|model_cards|recipes|requirements|scripts|src|tests)/[\w./-]*[\w])"
)
DEFINITION_REF = re.compile(r"^([\w/.-]+\.py): (\w+)$")
PY_FILE_REF = re.compile(r"^([\w/.-]+\.py)$")
DOTTED_NAME = re.compile(r"^(lisa_peft(?:\.\w+)+)")
SOURCE_ROOTS = ("src/lisa_peft", "kernels", "benchmarks", "scripts", "tests", "")


@dataclass(frozen=True)
class CodeBlock:
    language: str
    body: str
    line: int


def code_blocks(text: str) -> list[CodeBlock]:
    """Fenced blocks of a Markdown text, dedented by their fence's indentation (blocks inside list items)."""
    blocks = []
    for match in FENCE.finditer(text):
        indent = match.group("indent")
        body = textwrap.dedent(match.group("body")) if indent else match.group("body")
        blocks.append(CodeBlock(match.group("lang").strip(), body, text.count("\n", 0, match.start()) + 1))
    return blocks


def prose(text: str) -> str:
    """`text` with fenced blocks blanked out (line numbers kept), so that `# comment` lines are no headings."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def github_anchor(title: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading keeps its text
    title = re.sub(r"<[^>]+>", "", title).strip().lower()
    return re.sub(r"[^\w\- ]", "", title).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading id of a Markdown text (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    ids = set()
    for match in HEADING.finditer(prose(text)):
        base = github_anchor(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        ids.add(base if count == 0 else f"{base}-{count}")
    return ids


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def _inline_spans(text: str) -> Iterator[tuple[int, str]]:
    plain = prose(text)
    for match in INLINE_CODE.finditer(plain):
        yield _line_of(plain, match.start()), match.group(1)


def link_problems(path: Path) -> list[str]:
    """Relative links to missing files and anchor links to missing headings in the Markdown file `path`."""
    text = path.read_text(encoding="utf-8")
    plain = INLINE_CODE.sub("", prose(text))
    problems = []
    for match in LINK.finditer(plain):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        where = f"{path.name}:{_line_of(plain, match.start())}: link {target!r}"
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{where}: {file_part} does not exist")
            continue
        if anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text(encoding="utf-8")):
            problems.append(f"{where}: {linked.name} has no heading with the id #{anchor}")
    return problems


def _bash_syntax_problem(body: str) -> str | None:
    bash = shutil.which("bash")
    if bash is None:  # pragma: no cover - bash is there wherever the project's scripts run
        pytest.skip("bash not found")
    result = subprocess.run([bash, "-n"], input=body, capture_output=True, text=True, timeout=30)
    return result.stderr.strip() or None if result.returncode else None


def _mermaid_problem(body: str) -> str | None:
    lines = [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("%%")]
    if not lines or not lines[0].startswith(MERMAID_TYPES):
        return f"the first line must name a diagram type {MERMAID_TYPES}"
    opened = sum(line.startswith("subgraph ") for line in lines)
    closed = sum(line == "end" for line in lines)
    return None if opened == closed else f"{opened} subgraph(s) but {closed} end(s)"


def code_problems(path: Path) -> list[str]:
    """Code blocks of `path` that do not parse, or that have no known language."""
    problems = []
    for block in code_blocks(path.read_text(encoding="utf-8")):
        where = f"{path.name}:{block.line}: {block.language or 'unnamed'} block"
        problem = None
        if block.language not in LANGUAGES:
            problem = f"name one of the languages {sorted(LANGUAGES)} after the opening fence"
        elif block.language == "python":
            try:
                compile(block.body, where, "exec")
            except SyntaxError as error:
                problem = f"{error.msg} (line {error.lineno} of the block)"
        elif block.language == "bash":
            problem = _bash_syntax_problem(block.body)
        elif block.language == "mermaid":
            problem = _mermaid_problem(block.body)
        elif block.language == "yaml":
            try:
                yaml.safe_load(block.body)
            except yaml.YAMLError as error:
                problem = str(error)
        if problem:
            problems.append(f"{where}: {problem}")
    return problems


def _references(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every code block and inline code span: where commands and code are named."""
    text = path.read_text(encoding="utf-8")
    for block in code_blocks(text):
        yield block.line, block.body
    yield from _inline_spans(text)


def _output_folders(root: Path) -> tuple[str, ...]:
    """Folders that .gitignore names with their path (`benchmarks/results/`): written by runs, never committed."""
    gitignore = root / ".gitignore"
    lines = gitignore.read_text(encoding="utf-8").splitlines() if gitignore.is_file() else []
    return tuple(line.strip() for line in lines if line.strip().endswith("/") and "/" in line.strip()[:-1])


def path_problems(path: Path, root: Path = ROOT) -> list[str]:
    """Repository paths (`scripts/…`, `benchmarks/…`, `src/…`, …) named in code of `path` that do not exist
    (folders that runs write, named in .gitignore, excepted)."""
    outputs = _output_folders(root)
    problems = []
    for line, text in _references(path):
        for match in REPO_PATH.finditer(text):
            if not (root / match.group(1)).exists() and not (match.group(1) + "/").startswith(outputs):
                problems.append(f"{path.name}:{line}: {match.group(1)} does not exist")
    return problems


def _source_files(name: str, root: Path) -> list[Path]:
    """Files of the project that a reference like `hub/hooks.py` or `layer.py` may mean."""
    found = []
    for source_root in SOURCE_ROOTS:
        base = root / source_root if source_root else root
        if (base / name).is_file():
            found.append(base / name)
        elif source_root and base.is_dir():
            found += [p for p in base.rglob(Path(name).name) if p.as_posix().endswith("/" + name)]
    return found


def _defines(file: Path, name: str) -> bool:
    pattern = rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b|^{name}\s*(?::[^=\n]*)?="
    return re.search(pattern, file.read_text(encoding="utf-8"), re.M) is not None


def _resolves(dotted: str) -> str | None:
    """None if `lisa_peft.a.b` imports (a module, or an attribute of the longest importable module), else why."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and not error.name.startswith("lisa_peft"):
                return None  # an optional dependency (an extra) is missing here: nothing to check
            continue
        for attribute in parts[cut:]:
            if not hasattr(obj, attribute):
                return f"{module_name} has no {'.'.join(parts[cut:])}"
            obj = getattr(obj, attribute)
        return None
    return f"{dotted} does not import"


def python_reference_problems(path: Path, root: Path = ROOT) -> list[str]:
    """Inline spans `file.py`, `file.py: name` and `lisa_peft.x.y` of `path` that name nothing that exists."""
    problems = []
    for line, span in _inline_spans(path.read_text(encoding="utf-8")):
        where = f"{path.name}:{line}: `{span}`"
        definition = DEFINITION_REF.match(span)
        file_ref = definition.group(1) if definition else (m.group(1) if (m := PY_FILE_REF.match(span)) else None)
        if file_ref:
            files = _source_files(file_ref, root)
            if not files:
                problems.append(f"{where}: no file {file_ref} in the repository")
            elif definition and not any(_defines(f, definition.group(2)) for f in files):
                problems.append(f"{where}: {definition.group(2)} is not defined in {file_ref}")
        dotted = DOTTED_NAME.match(span)
        if dotted and root == ROOT:
            why = _resolves(dotted.group(1))
            if why:
                problems.append(f"{where}: {why}")
    return problems


def _ids(paths: list[Path]) -> list[str]:
    return [p.relative_to(ROOT).as_posix() for p in paths]


# ---------------------------------------------------------------------------------------------- the documents


def test_docs_folder_holds_the_reference_pages():
    names = {p.name for p in DOCS}
    assert {"method.md", "benchmarks.md", "fidelity.md"} <= names
    assert (ROOT / "CHANGELOG.md").is_file()


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=_ids([ROOT / "README.md", *DOCS]))
def test_code_blocks_parse(path):
    assert code_problems(path) == []


@pytest.mark.parametrize("path", DOCUMENTS, ids=_ids(DOCUMENTS))
def test_links_and_anchors_resolve(path):
    assert link_problems(path) == []


@pytest.mark.parametrize("path", DOCUMENTS, ids=_ids(DOCUMENTS))
def test_named_repository_paths_exist(path):
    assert path_problems(path) == []


@pytest.mark.parametrize("path", DOCUMENTS, ids=_ids(DOCUMENTS))
def test_named_python_files_and_names_exist(path):
    assert python_reference_problems(path) == []


@pytest.mark.parametrize("path", DOCUMENTS, ids=_ids(DOCUMENTS))
def test_documents_stand_on_their_own(path):
    """No file outside the repository, no development diary: the documents describe the current code."""
    text = path.read_text(encoding="utf-8")
    assert "../shared" not in text and "shared/" not in text, "the repository must not depend on files outside it"
    assert not re.search(r"\bsession\s+\d+", text, re.I), "history belongs in CHANGELOG.md, briefly, without sessions"
    assert not re.search(r"(?<![\w/&])#\d+\b", text), "no issue numbers: say what changed and why"


def test_readme_is_a_guide():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move reference material to docs/"
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", "\n".join(lines)))
    assert linked == set(_ids(DOCS)), "the README links every page of docs/"


# --------------------------------------------------------------------------------------- the checkers themselves


def test_checkers_find_broken_documents(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "real.sh").write_text("echo\n")
    (tmp_path / "tool.py").write_text("def present():\n    pass\n")
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    doc = tmp_path / "doc.md"
    doc.write_text(textwrap.dedent("""\
        # Title

        ## Real section

        [ok](other.md#a-section) [ok](#real-section) [ok](https://example.org/x#y) `[not a link](gone.md)`
        [missing file](gone.md) [missing anchor](other.md#no-such) [missing local](#nowhere)

        ```python
        def broken(:
        ```

        ```bash
        if then fi (
        ```

        ```
        no language
        ```

        ```bash
        bash scripts/real.sh && python scripts/missing.py
        ```

        `tool.py: present` `tool.py: absent` `nofile.py`
        """))
    assert [p.split(": ", 1)[1] for p in link_problems(doc)] == [
        "link 'gone.md': gone.md does not exist",
        "link 'other.md#no-such': other.md has no heading with the id #no-such",
        "link '#nowhere': doc.md has no heading with the id #nowhere",
    ]
    problems = code_problems(doc)
    assert len(problems) == 3
    assert "python block" in problems[0] and "bash block" in problems[1] and "unnamed block" in problems[2]
    assert [p.split(": ", 1)[1] for p in path_problems(doc, root=tmp_path)] == ["scripts/missing.py does not exist"]
    assert [p.split(": ", 1)[1] for p in python_reference_problems(doc, root=tmp_path)] == [
        "`tool.py: absent`: absent is not defined in tool.py",
        "`nofile.py`: no file nofile.py in the repository",
    ]


def test_github_anchors():
    assert github_anchor("Fidelity: a converted model must stay the base model") == (
        "fidelity-a-converted-model-must-stay-the-base-model"
    )
    assert github_anchor("Rank of the low-rank Q/K") == "rank-of-the-low-rank-qk"
    assert github_anchor("End-to-end learning rate at r = 32") == "end-to-end-learning-rate-at-r--32"
    assert github_anchor("`lisa-peft analyze` and `evaluate`") == "lisa-peft-analyze-and-evaluate"
    assert anchors("# A\n\n## A\n\n```bash\n# not a heading\n```\n") == {"a", "a-1"}


def test_dotted_names_are_resolved():
    assert _resolves("lisa_peft.evaluation.fidelity.measure_fidelity") is None
    assert (_resolves("lisa_peft.evaluation.fidelity.no_such_function")
            == "lisa_peft.evaluation.fidelity has no no_such_function")
