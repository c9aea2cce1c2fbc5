"""Turn a file's bytes into text plus metadata: Markdown/text (with YAML front matter), HTML and PDF.

HTML and PDF become Markdown-like text (``#`` headings, blank lines between paragraphs) so one chunker
handles every format; character offsets of chunks refer to this text.

Hostile input is refused with a reason rather than trusted: NUL characters (Postgres text cannot hold them),
YAML aliases in front matter (an alias bomb expands exponentially), and no pattern here can backtrack
quadratically on a long line. Time and memory are bounded by the reader process (``reader.py``).
"""

from __future__ import annotations

import codecs
import io
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import yaml

# libyaml's safe loader where PyYAML was built with it (much faster on front matter), else the pure one.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n(?:---|\.\.\.)[ \t]*(?:\r?\n|\Z)", re.DOTALL)
_H1_START = re.compile(r"^#[ \t]+", re.MULTILINE)  # the rest of the line is read without a regex
_UTF16_32_BOMS = {codecs.BOM_UTF32_LE: "utf-32", codecs.BOM_UTF32_BE: "utf-32",
                  codecs.BOM_UTF16_LE: "utf-16", codecs.BOM_UTF16_BE: "utf-16"}  # fmt: skip


class BadDocument(Exception):  # noqa: N818 - reads as "this is a bad document", the reason is the message
    """A document that cannot be indexed; the message is the reason recorded in ingest_failures."""


@dataclass
class LoadedDocument:
    text: str
    title: str
    metadata: dict[str, Any] = field(default_factory=dict)
    body_start: int = 0  # where the text after any front matter begins


def load_document(path: str, data: bytes) -> LoadedDocument:
    """Parse one document by its suffix; raises BadDocument with a one-line reason."""
    suffix = PurePosixPath(path).suffix.lower()
    if not data.strip():
        raise BadDocument("empty file")
    if suffix == ".pdf":
        doc = _load_pdf(data)
    elif suffix in (".html", ".htm"):
        wide = _wide_encoding(data)  # a UTF-16/32 file is full of NUL bytes: decode it before the NUL check
        doc = _load_html(data.decode(wide) if wide else _no_nul_bytes(data))
    else:
        doc = _load_markdown(_decode(data))
    if not doc.text[doc.body_start :].strip():
        raise BadDocument("no text content")
    if "\x00" in doc.text:
        raise BadDocument("contains NUL characters: a binary file, not text")
    if _has_nul(doc.metadata):  # e.g. a "\0" escape in YAML front matter
        raise BadDocument("metadata holds a NUL character")
    if not doc.title:
        doc.title = PurePosixPath(path).stem.replace("-", " ").replace("_", " ")
    return doc


def _has_nul(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return isinstance(value, str) and "\x00" in value


def _wide_encoding(data: bytes) -> str | None:
    """The wide encoding whose byte-order mark starts the file, if any (UTF-32 LE's begins like UTF-16 LE's)."""
    for bom, encoding in _UTF16_32_BOMS.items():
        if data.startswith(bom):
            return encoding
    return None


def _no_nul_bytes(data: bytes) -> bytes:
    at = data.find(b"\x00")
    if at >= 0:
        raise BadDocument(f"contains NUL bytes (first at byte {at}): a binary file, not text")
    return data


def _decode(data: bytes) -> str:
    wide = _wide_encoding(data)
    try:
        return data.decode(wide) if wide else _no_nul_bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadDocument(f"undecodable: not {wide or 'UTF-8'} (byte {exc.start})") from exc


def _first_h1(text: str, pos: int = 0) -> str:
    """The text of the first `# Title` line from pos (as ``^#[ \\t]+(.+?)[ \\t#]*$`` would read it, in linear
    time: that pattern backtracks quadratically on a long line of spaces)."""
    for match in _H1_START.finditer(text, pos):
        end = text.find("\n", match.end())
        rest = text[match.end() : end if end >= 0 else len(text)]
        if rest or match.end() - match.start() > 2:  # "#" and one blank alone is no heading to that pattern
            return (rest.rstrip(" \t#") or rest[:1]).strip()
    return ""


def _front_matter(raw: str) -> Any:
    """The YAML front matter, refused if it uses aliases (`*name`): an alias bomb expands exponentially."""
    if "*" in raw:  # no alias without a "*": most front matter skips the extra pass over its events
        for event in yaml.parse(raw, Loader=_YAML_LOADER):
            if isinstance(event, yaml.AliasEvent):
                raise BadDocument("invalid front matter: YAML aliases (*name) are refused")
    return yaml.load(raw, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader


def _load_markdown(text: str) -> LoadedDocument:
    text = text.replace("\r\n", "\n")
    metadata: dict[str, Any] = {}
    body_start = 0
    match = _FRONT_MATTER.match(text)
    if match:
        try:
            parsed = _front_matter(match.group(1))
        except yaml.YAMLError as exc:
            raise BadDocument(f"invalid front matter: {str(exc).splitlines()[0]}") from exc
        if isinstance(parsed, dict):
            metadata = {str(k): _plain(v) for k, v in parsed.items()}
            body_start = match.end()
    title = str(metadata.get("title") or "")
    return LoadedDocument(text, title or _first_h1(text, body_start), metadata, body_start)


def _plain(value: Any) -> Any:
    """Front-matter values as JSON-friendly data (dates become ISO strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


_BLOCK_TAGS = {"p", "li", "pre", "blockquote", "td", "th", "dt", "dd", "figcaption", "caption"}


def _load_html(data: bytes | str) -> LoadedDocument:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "nav", "footer"]):
        tag.decompose()
    metadata: dict[str, Any] = {}
    for meta in soup.find_all("meta"):
        name, content = meta.get("name"), meta.get("content")
        if isinstance(name, str) and isinstance(content, str) and name.lower() not in ("viewport", "generator"):
            metadata[name.lower()] = content
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    body = soup.body or soup
    parts: list[str] = []
    for tag in body.find_all(["h1", "h2", "h3", "h4", "h5", "h6", *_BLOCK_TAGS]):
        # Only innermost blocks: a <li> holding a <p> is emitted once, through the <p>.
        if tag.name in _BLOCK_TAGS and tag.find(list(_BLOCK_TAGS)):
            continue
        words = " ".join(tag.get_text(" ", strip=True).split())
        if not words:
            continue
        if tag.name[0] == "h" and tag.name[1:].isdigit():
            parts.append("#" * int(tag.name[1]) + " " + words)
        elif tag.name == "li":
            parts.append("- " + words)
        else:
            parts.append(words)
    if not parts:  # no block markup at all: keep the bare text
        loose = " ".join(body.get_text(" ", strip=True).split())
        parts = [loose] if loose else []
    text = "\n\n".join(parts) + "\n" if parts else ""
    return LoadedDocument(text, title or _first_h1(text), metadata)


def _load_pdf(data: bytes) -> LoadedDocument:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        # NUL characters in extracted text are extraction debris (Postgres refuses them): dropped, not fatal
        pages = [(page.extract_text() or "").replace("\x00", "") for page in reader.pages]
        info: Any = reader.metadata or {}
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise BadDocument(f"unreadable PDF: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    paragraphs = []
    for page in pages:
        for para in re.split(r"\n[ \t]*\n", page.replace("\r\n", "\n")):
            lines = [" ".join(line.split()) for line in para.splitlines()]
            joined = " ".join(line for line in lines if line)
            if joined:
                paragraphs.append(joined)
    text = "\n\n".join(paragraphs) + "\n" if paragraphs else ""
    title = str(info.get("/Title") or "").replace("\x00", "").strip()
    metadata = {
        k.lstrip("/").lower(): str(v).replace("\x00", "") for k, v in info.items() if k in ("/Author", "/Subject")
    }
    return LoadedDocument(text, title, metadata)
