"""The evaluation report: a text table for terminals, a Markdown report with a PNG chart, and a JSON copy.

Files are written into a temporary folder beside the target and renamed into place, so a report folder is
either complete or absent.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from components.cli._output import table
from components.evaluation.results import NO_ADAPTER, EvalReport

HEADER = (
    "arm",
    "model",
    "accuracy",
    "expected source cited",
    "answer on expected source",
    "p50 s",
    "p95 s",
    "prompt tok",
    "completion tok",
    "errors",
)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def table_rows(report: EvalReport) -> list[list[str]]:
    rows = []
    for a in report.arms:
        model = a.model + (f" (v{a.adapter_version})" if a.adapter_version is not None else "")
        if a.status == NO_ADAPTER:
            rows.append([a.label, a.model, NO_ADAPTER, "-", "-", "-", "-", "-", "-", "-"])
            continue
        rows.append(
            [
                a.label,
                model,
                f"{_pct(a.accuracy)} ({a.correct}/{a.questions})",
                _pct(a.source_hit_rate),
                _pct(a.source_attributed_rate),
                _num(a.latency_p50_s),
                _num(a.latency_p95_s),
                _num(a.prompt_tokens_mean, ".0f"),
                _num(a.completion_tokens_mean, ".1f"),
                str(a.errors),
            ]
        )
    return rows


def retrieval_line(report: EvalReport) -> str:
    r = report.retrieval
    if r is None:
        return "retrieval alone: not measured"
    return (
        f"retrieval alone (top {r.k} chunks, {r.questions} questions): recall@{r.k} {_pct(r.recall_at_k)}, "
        f"MRR {r.mrr:.2f}, p50 {_num(r.latency_p50_s, '.3f')} s" + (f", {r.errors} errors" if r.errors else "")
    )


def format_table(report: EvalReport) -> str:
    """The four arms as a plain text table, then the retrieval-alone line (what `tandem demo` ends with)."""
    return table(table_rows(report), HEADER) + "\n" + retrieval_line(report)


def markdown_table(report: EvalReport) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    return "\n".join(lines)


def _index_line(report: EvalReport) -> str:
    ix = report.index
    if ix.documents is None:
        return "no document index found"
    when = ix.last_ingest_at.isoformat(timespec="seconds") if ix.last_ingest_at else "unknown"
    return f"{ix.documents} documents, {ix.chunks} chunks ({ix.embedding_model or 'unknown model'}), last ingest {when}"


def _citation_note(report: EvalReport) -> list[str]:
    """Who wrote the markers "expected source cited" counts: the model, or the gateway for an answer that cited
    nothing (its attribution); empty when no retrieval arm was measured."""
    counts = [
        f"{a.label} {sum(x.gateway_cited for x in a.answers)}/{len(a.answers)}"
        for a in report.arms
        if a.rag and a.measured
    ]
    if not counts:
        return []
    return [
        "- citations: the `[n]` an answer carries, its own or, where it wrote none, the gateway's markers of the "
        f"sources that hold its words; answers cited by the gateway: {', '.join(counts)}"
    ]


def markdown_report(report: EvalReport, chart_name: str | None = "chart.png") -> str:
    version = f"v{report.adapter_version}" if report.adapter_version is not None else "(no champion)"
    parts = [
        f"# Evaluation: RAG vs fine-tune vs hybrid on `{report.alias}`",
        "",
        f"- run: {report.run_id if report.run_id is not None else 'not stored'}, "
        f"{report.started_at.isoformat(timespec='seconds')} ({report.trigger})",
        f"- QA set: `{report.qa_path}` ({report.questions} questions, fingerprint {report.qa_fingerprint})",
        f"- base model `{report.served_model}`, adapter `{report.alias}` {version}, through {report.gateway_url}",
        f"- index: {_index_line(report)}",
        f"- arms without retrieval: temperature 0, max_tokens {report.max_tokens}; arms with retrieval: the "
        f"gateway's RAG decoding defaults of each arm; top_k {report.top_k}, concurrency {report.concurrency}",
        *_citation_note(report),
        "",
        markdown_table(report),
        "",
        retrieval_line(report)[:1].upper() + retrieval_line(report)[1:] + ".",
        "",
        "## Recommendation",
        "",
        report.recommendation,
        "",
    ]
    if chart_name:
        parts += [f"![accuracy, latency and tokens per arm]({chart_name})", ""]
    parts += _per_question(report)
    return "\n".join(parts)


def _per_question(report: EvalReport) -> list[str]:
    measured = [a for a in report.arms if a.measured]
    if not measured:
        return []
    ids = [x.qa_id for x in measured[0].answers]
    by_arm = {a.arm: {x.qa_id: x for x in a.answers} for a in measured}
    lines = ["## Per question", "", "| id | " + " | ".join(a.label for a in measured) + " |"]
    lines.append("|---|" + "---|" * len(measured))
    for qa_id in ids:
        cells = []
        for a in measured:
            ans = by_arm[a.arm].get(qa_id)
            cells.append("error" if ans is None or ans.error else ("yes" if ans.correct else "no"))
        lines.append(f"| {qa_id} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_chart(report: EvalReport, path: Path) -> None:
    """Accuracy (with 95% intervals), latency p50/p95 and tokens per question, one panel each, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in report.arms if a.measured]
    labels = [a.label.replace(" + ", "\n+ ") for a in arms]
    x = list(range(len(arms)))
    fig, (acc, lat, tok) = plt.subplots(1, 3, figsize=(13, 4.2))
    values = [100 * (a.accuracy or 0) for a in arms]
    errs = [
        [v - 100 * (a.accuracy_low or 0) for v, a in zip(values, arms, strict=True)],
        [100 * (a.accuracy_high or 0) - v for v, a in zip(values, arms, strict=True)],
    ]
    acc.bar(x, values, yerr=errs, capsize=4, color="#3b7dd8")
    acc.set(title="accuracy (95% CI)", ylabel="% correct", ylim=(0, 100))
    width = 0.38
    lat.bar([i - width / 2 for i in x], [a.latency_p50_s or 0 for a in arms], width, label="p50", color="#5aa469")
    lat.bar([i + width / 2 for i in x], [a.latency_p95_s or 0 for a in arms], width, label="p95", color="#d8a03b")
    lat.set(title="latency per question", ylabel="seconds")
    lat.legend()
    prompt = [a.prompt_tokens_mean or 0 for a in arms]
    tok.bar(x, prompt, label="prompt", color="#8c6bb1")
    tok.bar(x, [a.completion_tokens_mean or 0 for a in arms], bottom=prompt, label="completion", color="#e07b91")
    tok.set(title="tokens per question (mean)", ylabel="tokens")
    tok.legend()
    for ax in (acc, lat, tok):
        ax.set_xticks(x, labels, fontsize=8)
    fig.suptitle(f"{report.alias}: {report.questions} held-out questions, {report.started_at:%Y-%m-%d %H:%M} UTC")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: EvalReport, out_dir: Path) -> Path:
    """Write report.md, chart.png and report.json into ``out_dir`` (created; must not already hold a report)."""
    out_dir = Path(out_dir)
    if (out_dir / "report.md").exists():
        raise FileExistsError(f"{out_dir} already holds a report")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        has_chart = any(a.measured for a in report.arms)
        if has_chart:
            write_chart(report, tmp / "chart.png")
        (tmp / "report.md").write_text(markdown_report(report, "chart.png" if has_chart else None), encoding="utf-8")
        data = report.to_dict() | {"out_dir": str(out_dir)}
        (tmp / "report.json").write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
        if out_dir.exists():  # an empty folder the caller made: fill it
            for item in tmp.iterdir():
                item.rename(out_dir / item.name)
            tmp.rmdir()
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.out_dir = str(out_dir)
    return out_dir
