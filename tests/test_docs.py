"""The documentation in step with the code.

README.md and docs/*.md name commands, options, config keys, error kinds, files and
anchors. These tests read the markdown and check each of them against the code (the click
tree of ``etl.cli.cli``, the pydantic models of ``etl.config``, ``etl.errors.ERROR_KINDS``)
and against the repository, so a rename in the code fails here instead of leaving a doc
that lies. Each failure names the file, the line and the offending text.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

import click
import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from etl.cli import cli
from etl.config import FileConfig, parse_config
from etl.errors import ERROR_KINDS, ConfigError
from etl.models import EVENT_TYPES

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
DOC_FILES = [README, *DOCS]
CONFIGURATION_MD = ROOT / "docs" / "configuration.md"
OPERATIONS_MD = ROOT / "docs" / "operations.md"
ERRORS_MD = ROOT / "docs" / "errors.md"
SCHEMA_MD = ROOT / "docs" / "schema.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "chatsync.json"
RESULTS = ROOT / "benchmarks" / "results"
RESULT_CITERS = [*DOCS, ROOT / "benchmarks" / "README.md"]

#: options every command accepts (``global_options`` in etl/cli.py) and click's help
GLOBAL_OPTIONS = {"--config", "--database-url", "--log-level", "--log-format", "--help", "-h"}
README_MAX_LINES = 180


# -- reading markdown -------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced code block: its info string (``bash``, ``toml``, ...) and its lines."""

    path: Path
    info: str
    line: int  # of the first line inside the fence
    lines: list[str]


@dataclass(frozen=True)
class Prose:
    """A line outside code blocks (paragraphs, lists, tables, headings)."""

    path: Path
    line: int
    text: str


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def parse_markdown(path: Path) -> tuple[list[Block], list[Prose]]:
    blocks: list[Block] = []
    prose: list[Prose] = []
    fence: str | None = None
    info, start, body = "", 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if fence is None:
            m = re.match(r"(`{3,}|~{3,})(.*)", stripped)
            if m and not (m.group(1)[0] == "`" and "`" in m.group(2)):  # not ```` `x` ````
                fence, info, start, body = m.group(1), m.group(2).strip(), number + 1, []
            else:
                prose.append(Prose(path, number, line))
        elif stripped.startswith(fence) and not stripped[len(fence) :].strip():
            blocks.append(Block(path, info, start, body))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{rel(path)}:{start - 1}: unclosed code fence"
    return blocks, prose


def code_spans(text: str) -> list[str]:
    """The inline code spans of one line (```` `x` ````, ```` ``x`` ````)."""
    return [m.group(2) for m in re.finditer(r"(`+)(.+?)\1", text)]


def all_blocks() -> Iterator[Block]:
    for path in DOC_FILES:
        yield from parse_markdown(path)[0]


def all_prose() -> Iterator[Prose]:
    for path in DOC_FILES:
        yield from parse_markdown(path)[1]


def table_cells(line: str) -> list[str]:
    """The cells of one markdown table row (escaped ``\\|`` stays inside a cell)."""
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [c.strip() for c in re.split(r"(?<!\\)\|", inner)]


# -- (a) every `etl ...` command line names real commands and options --------------------

#: where a command starts in a line: the word ``etl`` followed by a blank
ETL_WORD = re.compile(r"(?<![\w./-])etl(?=[ \t]+\S)")
#: where a shell command line ends
SHELL_END = re.compile(r"\s#|&&|\|\||(?<!\\)\||;|>|<(?![a-z])|\)")


@dataclass(frozen=True)
class CommandLine:
    where: str
    text: str


def command_lines() -> Iterator[CommandLine]:
    """Every ``etl ...`` in a shell-ish code block, a table or an inline code span."""
    for block in all_blocks():
        if block.info.split()[:1] not in ([], ["bash"], ["sh"], ["shell"], ["console"]):
            continue  # sql, toml, yaml, python...: no command lines
        for offset, line in enumerate(block.lines):
            line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]  # comments are prose
            for text in _etl_commands(line):
                yield CommandLine(f"{rel(block.path)}:{block.line + offset}", text)
    for prose in all_prose():
        for span in code_spans(prose.text):
            for text in _etl_commands(span):
                yield CommandLine(f"{rel(prose.path)}:{prose.line}", text)


def _etl_commands(text: str) -> Iterator[str]:
    for m in ETL_WORD.finditer(text):
        rest = text[m.start() :]
        end = SHELL_END.search(rest)
        yield (rest[: end.start()] if end else rest).strip()


def _options(command: click.Command) -> dict[str, click.Option]:
    out: dict[str, click.Option] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for name in (*param.opts, *param.secondary_opts):
                out[name] = param
    return out


def _tokens(text: str) -> list[str]:
    try:
        raw = shlex.split(text.replace("\\|", "|"))
    except ValueError:
        raw = text.split()
    out: list[str] = []
    for token in raw:
        token = token.strip("[]")
        if not token or token in ("...", "…", "|"):
            continue
        if token.startswith("--") and "/" in token:  # --progress/--no-progress
            out.extend(t for t in token.split("/") if t)
        else:
            out.append(token)
    return out


def check_command_line(text: str) -> str | None:
    """None when ``text`` (``etl ...``) is a valid command line, else what is wrong."""
    tokens = _tokens(text)
    assert tokens and tokens[0] == "etl", text
    command: click.Command = cli
    path = ["etl"]
    arguments = 0
    i = 1
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("<"):  # a placeholder such as <command>: nothing more to check
            return None
        if token.startswith("-") and token != "-":
            name = token.split("=", 1)[0]
            option = _options(command).get(name)
            if option is None and name not in GLOBAL_OPTIONS:
                return f"`{' '.join(path)}` has no option {name}"
            if option is not None and not (option.is_flag or option.count) and "=" not in token:
                i += 1  # its value
            i += 1
            continue
        if isinstance(command, click.Group):
            sub = command.commands.get(token)
            if sub is None:
                return f"`{' '.join(path)}` has no command {token!r}"
            command, arguments = sub, 0
            path.append(token)
            i += 1
            continue
        arguments += 1
        allowed = sum(
            math.inf if p.nargs < 0 else p.nargs
            for p in command.params
            if isinstance(p, click.Argument)
        )
        if arguments > allowed:
            return f"`{' '.join(path)}` takes no argument {token!r}"
        i += 1
    return None


def test_every_etl_command_line_in_the_docs_is_real() -> None:
    lines = list(command_lines())
    assert len(lines) > 20, "found almost no `etl ...` command lines: is the parser broken?"
    problems = [
        f"{c.where}: `{c.text}`: {error}"
        for c in lines
        if (error := check_command_line(c.text)) is not None
    ]
    assert problems == [], "\n".join(problems)


def _leaf_commands(
    command: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _leaf_commands(sub, (*path, name))
    else:
        yield path, command


def test_operations_md_lists_every_command_with_every_option() -> None:
    """The commands table of docs/operations.md: a row per command, naming all its options."""
    rows: dict[str, str] = {}
    for prose in parse_markdown(OPERATIONS_MD)[1]:
        if not prose.text.startswith("| `etl "):
            continue
        for span in code_spans(table_cells(prose.text)[0]):
            words = [t for t in _tokens(span) if not t.startswith("-")]
            rows.setdefault(span, " ".join(words))
    problems = []
    for path, command in _leaf_commands(cli):
        name = " ".join(("etl", *path))
        spans = [s for s in rows if s == name or s.startswith(name + " ")]
        if not spans:
            problems.append(f"docs/operations.md: no row for `{name}` in the commands table")
            continue
        documented = set(_tokens(" ".join(spans)))
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            names = [n for n in (*param.opts, *param.secondary_opts) if n.startswith("--")]
            if set(names) & GLOBAL_OPTIONS:
                continue
            missing = [n for n in names if n not in documented]
            if missing:
                problems.append(f"docs/operations.md: the row of `{name}` lacks {missing}")
    assert problems == [], "\n".join(problems)


# -- (b) config keys: TOML examples parse, every model field is documented --------------


def test_every_toml_example_is_a_valid_config() -> None:
    blocks = [b for b in all_blocks() if b.info.split()[:1] == ["toml"]]
    assert blocks, "no ```toml block in README.md or docs/"
    problems = []
    for block in blocks:
        where = f"{rel(block.path)}:{block.line}"
        try:
            raw = tomllib.loads("\n".join(block.lines))
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"{where}: not valid TOML: {exc}")
            continue
        try:
            parse_config(raw, source=where)
        except ConfigError as exc:
            problems.append(str(exc))
    assert problems == [], "\n".join(problems)


def _sections() -> dict[str, type[BaseModel]]:
    """The heading of each config model's section in docs/configuration.md."""
    out: dict[str, type[BaseModel]] = {"Top level": FileConfig}
    for name, field in FileConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out[f"`[{name}]`"] = annotation
        elif get_origin(annotation) is list:
            (item,) = get_args(annotation)
            out[f"`[[{name}]]`"] = item
    return out


def _scalar_fields(model: type[BaseModel]) -> dict[str, Any]:
    """The keys of ``model`` (name -> FieldInfo), without the sub-tables of the file."""
    tables = {h.strip("`[]") for h in _sections() if h.startswith("`")}
    return {
        n: f for n, f in model.model_fields.items() if model is not FileConfig or n not in tables
    }


def _documented_keys() -> dict[str, dict[str, tuple[int, str]]]:
    """{section heading: {key: (line, default cell)}} from docs/configuration.md."""
    out: dict[str, dict[str, tuple[int, str]]] = {}
    current: str | None = None
    for prose in parse_markdown(CONFIGURATION_MD)[1]:
        heading = re.fullmatch(r"###\s+(.+?)\s*", prose.text)
        if prose.text.startswith("#"):
            current = heading.group(1) if heading else None
            if current is not None:
                out.setdefault(current, {})
            continue
        if current is None or not prose.text.startswith("| `"):
            continue
        cells = table_cells(prose.text)
        key = re.fullmatch(r"`(\w+)`", cells[0])
        if key and len(cells) >= 3:
            out[current][key.group(1)] = (prose.line, cells[1])
    return out


def _default_problem(key: str, field: Any, cell: str) -> str | None:
    default = field.default
    first = cell.split()[0].lower() if cell.split() else ""
    if default is PydanticUndefined:
        return None if first == "required" else "is required: say `required`"
    if default is None:
        return None if first == "none" else "has no default: say `none`"
    spans = code_spans(cell)
    if not spans:
        return f"default {default!r} is not given as `value`"
    try:
        value = tomllib.loads(f"v = {spans[0]}")["v"]
    except tomllib.TOMLDecodeError:
        return f"default cell `{spans[0]}` is not a TOML value"
    if value != default or isinstance(value, bool) != isinstance(default, bool):
        return f"documented default {value!r}, the code's is {default!r}"
    return None


def test_configuration_md_documents_every_config_key_with_its_default() -> None:
    documented = _documented_keys()
    problems = []
    for heading, model in _sections().items():
        if heading not in documented:
            problems.append(f"docs/configuration.md: no section '### {heading}'")
            continue
        keys = documented[heading]
        fields = _scalar_fields(model)
        for name in sorted(fields.keys() - keys.keys()):
            problems.append(f"docs/configuration.md, {heading}: `{name}` is not documented")
        for name in sorted(keys.keys() - fields.keys()):
            line = keys[name][0]
            problems.append(
                f"docs/configuration.md:{line}: {heading} `{name}` is not a key of "
                f"{model.__name__} in etl/config.py"
            )
        for name in sorted(fields.keys() & keys.keys()):
            line, cell = keys[name]
            problem = _default_problem(name, fields[name], cell)
            if problem:
                problems.append(f"docs/configuration.md:{line}: {heading} `{name}`: {problem}")
    assert problems == [], "\n".join(problems)


# -- (c) docs/errors.md is ERROR_KINDS --------------------------------------------------

ERRORS_HEADER = ["kind", "status", "cause", "retried within the tick", "backoff", "what to do"]


def _errors_table() -> list[tuple[int, list[str]]]:
    rows: list[tuple[int, list[str]]] = []
    in_table = False
    for prose in parse_markdown(ERRORS_MD)[1]:
        if not prose.text.startswith("|"):
            if in_table:
                break
            continue
        cells = table_cells(prose.text)
        if cells == ERRORS_HEADER:
            in_table = True
        elif in_table and not set("".join(cells)) <= set("-: "):
            rows.append((prose.line, cells))
    assert in_table, f"docs/errors.md has no table with the header {ERRORS_HEADER}"
    return rows


def _unquote(cell: str) -> str:
    m = re.fullmatch(r"`([^`]*)`", cell)
    return m.group(1) if m else cell


def test_errors_md_table_is_error_kinds() -> None:
    expected = [
        [
            kind.value,
            info.status,
            info.cause,
            "yes" if info.retried else "no",
            info.backoff.value,
            info.action,
        ]
        for kind, info in ERROR_KINDS.items()
    ]
    rows = _errors_table()
    actual = [[_unquote(c) for c in cells] for _, cells in rows]
    problems = []
    by_kind = {row[0]: (line, row) for (line, _), row in zip(rows, actual, strict=True)}
    for want in expected:
        if want[0] not in by_kind:
            problems.append(f"docs/errors.md: no row for `{want[0]}`")
            continue
        line, got = by_kind[want[0]]
        for column, a, b in zip(ERRORS_HEADER, got, want, strict=False):
            if a != b:
                problems.append(f"docs/errors.md:{line}: `{want[0]}` {column}: {a!r}, code: {b!r}")
        if len(got) != len(want):
            problems.append(f"docs/errors.md:{line}: `{want[0]}` has {len(got)} cells")
    known = {w[0] for w in expected}
    for line, cells in rows:
        if _unquote(cells[0]) not in known:
            problems.append(f"docs/errors.md:{line}: {cells[0]} is not an ErrorKind")
    if not problems and [r[0] for r in actual] != [w[0] for w in expected]:
        problems.append("docs/errors.md: the rows are not in the order of ERROR_KINDS")
    assert problems == [], "\n".join(problems)


def test_the_error_kind_table_is_only_in_errors_md() -> None:
    others = [
        f"{rel(p.path)}:{p.line}: {p.text.strip()[:60]}"
        for p in all_prose()
        if p.path != ERRORS_MD and re.match(r"\|\s*`(unauthorized|rate_limited)`\s*\|", p.text)
    ]
    assert others == [], "a second table of error kinds (link to docs/errors.md):\n" + "\n".join(
        others
    )


def test_the_valid_from_rule_is_written_once_in_schema_md() -> None:
    phrase = "when it is set and plausible"
    found = [f"{rel(p.path)}:{p.line}" for p in all_prose() if phrase in " ".join(p.text.split())]
    assert [f.split(":")[0] for f in found] == ["docs/schema.md"], (
        f"the valid_from rule ({phrase!r}) must be in docs/schema.md only, once: {found}"
    )


# -- (d) relative links point at files and anchors that exist ---------------------------

LINK = re.compile(r"!?\[(?:[^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, blanks to dashes."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for prose in parse_markdown(path)[1]:
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", prose.text)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_every_relative_link_points_at_something_that_exists() -> None:
    problems = []
    checked = 0
    for prose in all_prose():
        text = re.sub(r"(`+).+?\1", "", prose.text)  # links inside code spans are not links
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            checked += 1
            where = f"{rel(prose.path)}:{prose.line}: ({target})"
            file_part, _, anchor = target.partition("#")
            dest = (prose.path.parent / file_part).resolve() if file_part else prose.path
            if not dest.exists():
                problems.append(f"{where}: {file_part} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: {rel(dest)} has no heading for #{anchor}")
    assert checked > 20, "found almost no relative links: is the parser broken?"
    assert problems == [], "\n".join(problems)


# -- (e) benchmarks/results/ holds what the docs cite, and the docs cite all of it -------

RESULT_NAME = re.compile(
    r"\b(?:fleet|dlt|profile|soak|process|startup)-[\w.-]*?\.(?:jsonl|json|csv|txt)\b"
)


def test_every_benchmark_result_is_cited_and_every_citation_exists() -> None:
    files = sorted(p.name for p in RESULTS.iterdir() if p.is_file())
    assert files, "benchmarks/results/ is empty"
    text = {p: p.read_text(encoding="utf-8") for p in RESULT_CITERS}
    uncited = [f for f in files if not any(f in t for t in text.values())]
    missing = sorted(
        f"{rel(p)}: {name}"
        for p, t in text.items()
        for name in set(RESULT_NAME.findall(t))
        if name not in files
    )
    problems = [
        f"benchmarks/results/{f} is cited nowhere in docs/ or benchmarks/README.md" for f in uncited
    ] + [f"{m} is cited but not in benchmarks/results/" for m in missing]
    assert problems == [], "\n".join(problems)


# -- the README stays a front door ------------------------------------------------------


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move reference material "
        "to docs/"
    )


@pytest.mark.parametrize("path", DOC_FILES, ids=[rel(p) for p in DOC_FILES])
def test_markdown_fences_are_closed(path: Path) -> None:
    parse_markdown(path)  # asserts


def test_the_lists_of_every_event_type_name_every_type_the_sync_writes() -> None:
    """docs/queries.md's "Changes per day" and the dashboard's "Chat changes per day" panel
    list the event types: all of them, as the sync writes them (``EVENT_TYPES``)."""
    queries = (ROOT / "docs" / "queries.md").read_text(encoding="utf-8")
    intro = queries.split("### Changes per day", 1)[1].split("```", 1)[0]
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    (panel,) = [p for p in dashboard["panels"] if p["title"] == "Chat changes per day"]
    for where, text_ in (("queries.md", intro), ("chatsync.json", panel["description"])):
        (listed,) = re.findall(r"\(([^()]*\bcreated\b[^()]*)\)", text_)
        names = [n.strip(" `\n") for n in listed.split(",")]
        assert names == list(EVENT_TYPES), where
