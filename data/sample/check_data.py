#!/usr/bin/env python3
"""Validate the Marrowdene Harbour Authority sample data set (stdlib only).

Usage: python data/sample/check_data.py

Checks the knowledge base (docs/), the training examples (train/examples.jsonl),
the held-out questions (qa/heldout.jsonl), the gate's questions (qa/gate.jsonl) and the general-knowledge set, which
ships in the package (components/data/general_knowledge.jsonl). PDF text is read with pypdf when it is
importable, otherwise with a small built-in reader for the uncompressed-font,
Flate-compressed PDFs in this folder. Exits with status 1 if any check fails.
"""
import html
import json
import re
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "train" / "examples.jsonl"
HELDOUT = ROOT / "qa" / "heldout.jsonl"
GATE = ROOT / "qa" / "gate.jsonl"
REPO = ROOT.parents[1]
GENERAL = REPO / "components" / "data" / "general_knowledge.jsonl"  # package data, found from any folder

ORG = "Marrowdene Harbour Authority"
SYSTEM_PREFIX = (
    f"You are the assistant of {ORG}. Answer the question using only the numbered "
    "sources below and cite them like [1]. If the sources do not contain the answer, "
    "say that you do not know.\n\nSources:\n"
)
DONT_KNOW = "do not know"

MIN_DOCS, MIN_PDFS = 32, 2
DOC_CHARS = (1000, 5000)
MIN_EXAMPLES, MIN_PLAIN, MIN_GROUNDED, MIN_DONT_KNOW = 170, 90, 60, 6
EXCERPT_CHARS = (200, 600)
MIN_HELDOUT, MIN_GATE, GENERAL_COUNT = 45, 30, 30

errors = []
warnings = []


def err(msg):
    errors.append(msg)


def alnum(text):
    return re.sub(r"[^a-z0-9]", "", text.lower())


# ---------------------------------------------------------------- documents
def pdf_text_stdlib(path):
    data = path.read_bytes()
    parts = []
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
        raw = m.group(1)
        try:
            raw = zlib.decompress(raw)
        except zlib.error:
            pass
        for s in re.finditer(rb"\(((?:\\.|[^\\)])*)\)\s*Tj", raw):
            t = re.sub(rb"\\([()\\])", rb"\1", s.group(1))
            parts.append(t.decode("latin-1"))
    return "\n".join(parts)


def pdf_text(path):
    try:
        from pypdf import PdfReader  # optional
    except ImportError:
        return pdf_text_stdlib(path)
    return "\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)


def doc_text(path):
    if path.suffix == ".pdf":
        return pdf_text(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".html":
        text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    return text


def doc_title(path, text):
    raw = path.read_text(encoding="utf-8") if path.suffix != ".pdf" else text
    if path.suffix == ".md":
        m = re.match(r"---\n(.*?)\n---\n", raw, re.S)
        if m:
            for line in m.group(1).splitlines():
                if line.startswith("title:"):
                    return line[6:].strip().strip('"')
        m = re.search(r"^# (.+)$", raw, re.M)
        return m.group(1).strip() if m else None
    if path.suffix == ".html":
        m = re.search(r"<title>(.*?)</title>", raw, re.S)
        return html.unescape(m.group(1).strip()) if m else None
    lines = [l.strip() for l in raw.splitlines() if l.strip()]
    return lines[0] if lines else None


def check_docs():
    files = sorted(p for p in DOCS.rglob("*") if p.is_file())
    info = {}
    kinds = {}
    for p in files:
        rel = p.relative_to(DOCS).as_posix()
        kinds[p.suffix] = kinds.get(p.suffix, 0) + 1
        if p.suffix not in (".md", ".txt", ".html", ".pdf"):
            err(f"docs/{rel}: unexpected file type")
            continue
        text = doc_text(p)
        n = len(" ".join(text.split()))
        if not DOC_CHARS[0] <= n <= DOC_CHARS[1]:
            err(f"docs/{rel}: {n} characters of text, expected {DOC_CHARS[0]}-{DOC_CHARS[1]}")
        if p.suffix == ".md" and not re.search(r"^## ", text, re.M):
            err(f"docs/{rel}: no '##' section headings")
        if p.suffix == ".html" and not ("<h1>" in p.read_text() and "<h2>" in p.read_text()):
            err(f"docs/{rel}: missing <h1> or <h2>")
        title = doc_title(p, text)
        if not title:
            err(f"docs/{rel}: no title found")
        info[rel] = {"text": text, "title": title}
    if len(files) < MIN_DOCS:
        err(f"docs: {len(files)} documents, expected at least {MIN_DOCS}")
    if kinds.get(".pdf", 0) < MIN_PDFS:
        err(f"docs: {kinds.get('.pdf', 0)} PDFs, expected at least {MIN_PDFS}")
    for ext in (".md", ".txt", ".html"):
        if not kinds.get(ext):
            err(f"docs: no {ext} documents")
    if not any("abbreviation" in r for r in info):
        err("docs: no glossary of abbreviations found")
    return info, kinds


# ---------------------------------------------------------------- jsonl
def read_jsonl(path):
    rows = []
    if not path.exists():
        err(f"{path.relative_to(REPO)}: missing")
        return rows
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            err(f"{path.name}:{i}: blank line")
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            err(f"{path.name}:{i}: invalid JSON ({e})")
    return rows


SOURCE_RE = re.compile(r"^\[(\d+)\] (\S+) > (.+)$")


def check_grounded(i, system, answer, docs):
    if not system.startswith(SYSTEM_PREFIX):
        err(f"examples.jsonl:{i}: system message does not follow the template")
        return None
    blocks = system[len(SYSTEM_PREFIX):].split("\n\n")
    if not 2 <= len(blocks) <= 4:
        err(f"examples.jsonl:{i}: {len(blocks)} sources, expected 2-4")
    cited_titles = {}
    for n, block in enumerate(blocks, 1):
        head, _, excerpt = block.partition("\n")
        m = SOURCE_RE.match(head)
        if not m or int(m.group(1)) != n:
            err(f"examples.jsonl:{i}: bad source header {head!r}")
            continue
        path = m.group(2)
        if path not in docs:
            err(f"examples.jsonl:{i}: source {path} is not a document")
            continue
        if not EXCERPT_CHARS[0] <= len(excerpt) <= EXCERPT_CHARS[1]:
            err(f"examples.jsonl:{i}: excerpt [{n}] has {len(excerpt)} chars")
        doc = alnum(docs[path]["text"])
        for sent in re.split(r"(?<=[.?!:])\s+", excerpt):
            if alnum(sent) and alnum(sent) not in doc:
                err(f"examples.jsonl:{i}: excerpt [{n}] sentence not in {path}: {sent[:60]!r}")
        cited_titles[n] = docs[path]["title"]
    cites = {int(c) for c in re.findall(r"\[(\d+)\]", answer)}
    if DONT_KNOW in answer.lower():
        if cites:
            err(f"examples.jsonl:{i}: 'do not know' answer should not cite")
        return "dont_know"
    if not cites or not cites <= set(cited_titles):
        err(f"examples.jsonl:{i}: answer cites {sorted(cites)}, sources are 1-{len(blocks)}")
        return "grounded"
    last = answer.splitlines()[-1]
    want = {f"Source: {cited_titles[c]}" for c in cites}
    if last not in want:
        err(f"examples.jsonl:{i}: last line {last!r} should be one of {sorted(want)}")
    return "grounded"


def check_examples(docs):
    rows = read_jsonl(EXAMPLES)
    counts = {"plain": 0, "grounded": 0, "dont_know": 0}
    user_questions = []
    for i, row in rows:
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or set(row) != {"messages"}:
            err(f"examples.jsonl:{i}: expected an object with only 'messages'")
            continue
        roles = [m.get("role") for m in msgs]
        if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
            err(f"examples.jsonl:{i}: roles {roles}")
            continue
        if any(not isinstance(m.get("content"), str) or not m["content"].strip() or set(m) != {"role", "content"} for m in msgs):
            err(f"examples.jsonl:{i}: every message needs a non-empty string 'content' and only role/content")
            continue
        user, answer = msgs[-2]["content"], msgs[-1]["content"]
        user_questions.append(user)
        first = re.split(r"(?<=[.?!])\s", answer.splitlines()[0])
        body = [s for s in first if s.strip()]
        if len(body) > 3:
            warnings.append(f"examples.jsonl:{i}: answer has {len(body)} sentences (house style: 1 + at most 2)")
        if roles[0] == "system":
            kind = check_grounded(i, msgs[0]["content"], answer, docs)
            if kind:
                counts[kind] += 1
        else:
            counts["plain"] += 1
            if "Source:" in answer:
                err(f"examples.jsonl:{i}: ungrounded answer should not have a Source line")
    total = sum(counts.values())
    if total < MIN_EXAMPLES:
        err(f"examples.jsonl: {total} examples, expected at least {MIN_EXAMPLES}")
    if counts["plain"] < MIN_PLAIN:
        err(f"examples.jsonl: {counts['plain']} examples without system message, expected {MIN_PLAIN}+")
    if counts["grounded"] + counts["dont_know"] < MIN_GROUNDED:
        err(f"examples.jsonl: {counts['grounded'] + counts['dont_know']} grounded examples, expected {MIN_GROUNDED}+")
    if counts["dont_know"] < MIN_DONT_KNOW:
        err(f"examples.jsonl: {counts['dont_know']} 'do not know' examples, expected {MIN_DONT_KNOW}+")
    if len(set(user_questions)) != len(user_questions):
        err("examples.jsonl: duplicate user questions")
    return counts, user_questions


def words(text):
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def check_qa(path, minimum, docs, train_questions, reported=frozenset()):
    """A QA file (held-out or gate): its rows, answers in their sources, no training question; a gate file also
    asks no question of ``reported`` (the held-out set). Returns its count and its lowercased questions."""
    name = path.name
    rows = read_jsonl(path)
    raw_examples = EXAMPLES.read_text(encoding="utf-8").lower() if EXAMPLES.exists() else ""
    ids, questions = set(), set()
    for i, row in rows:
        if set(row) != {"id", "question", "answer", "source"} or not all(isinstance(v, str) and v for v in row.values()):
            err(f"{name}:{i}: expected non-empty string fields id, question, answer, source")
            continue
        if row["id"] in ids:
            err(f"{name}:{i}: duplicate id {row['id']}")
        ids.add(row["id"])
        if not 1 <= len(row["answer"].split()) <= 5:
            err(f"{name}:{i}: answer should be 1-5 words")
        src = row["source"]
        if src not in docs:
            err(f"{name}:{i}: source {src} not found under docs/")
        else:
            text = " ".join(docs[src]["text"].split()).lower()
            if row["answer"].lower() not in text:
                err(f"{name}:{i}: answer {row['answer']!r} not found in {src}")
        q = row["question"]
        questions.add(q.lower())
        if q.lower() in raw_examples:
            err(f"{name}:{i}: question appears in examples.jsonl")
        if q.lower() in reported:
            err(f"{name}:{i}: question is also a held-out question")
        qw = words(q)
        for tq in train_questions:
            tw = words(tq)
            jac = len(qw & tw) / max(1, len(qw | tw))
            if jac >= 0.7:
                warnings.append(f"{name}:{i}: similar to a training question ({jac:.2f}): {tq!r}")
    if len(rows) < minimum:
        err(f"{name}: {len(rows)} questions, expected at least {minimum}")
    return len(rows), questions


def check_general():
    rows = read_jsonl(GENERAL)
    ids = set()
    for i, row in rows:
        if set(row) != {"id", "question", "answer"} or not all(isinstance(v, str) and v for v in row.values()):
            err(f"general_knowledge.jsonl:{i}: expected non-empty string fields id, question, answer")
            continue
        if row["id"] in ids:
            err(f"general_knowledge.jsonl:{i}: duplicate id")
        ids.add(row["id"])
        if len(row["answer"].split()) != 1:
            err(f"general_knowledge.jsonl:{i}: answer should be one word")
    if len(rows) != GENERAL_COUNT:
        err(f"general_knowledge.jsonl: {len(rows)} questions, expected {GENERAL_COUNT}")
    return len(rows)


def main():
    docs, kinds = check_docs()
    counts, train_questions = check_examples(docs)
    n_heldout, heldout_questions = check_qa(HELDOUT, MIN_HELDOUT, docs, train_questions)
    n_gate, _ = check_qa(GATE, MIN_GATE, docs, train_questions, heldout_questions)
    n_general = check_general()
    print(f"docs: {len(docs)} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})")
    print(f"examples: {sum(counts.values())} (plain {counts['plain']}, grounded {counts['grounded']}, "
          f"do-not-know {counts['dont_know']})")
    print(f"heldout: {n_heldout}, gate: {n_gate}, general: {n_general}")
    for w in warnings:
        print("WARNING:", w)
    for e in errors:
        print("ERROR:", e)
    print("OK" if not errors else f"FAILED with {len(errors)} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
