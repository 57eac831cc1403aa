"""The vocabulary report (`VocabPlan.report`, from `build_vocab`): as terminal text and as HTML."""

from __future__ import annotations

import html


def format_report(report: dict, *, limit: int = 8) -> str:
    """The vocabulary report as terminal text: one paragraph per model."""

    def some(items) -> str:
        items = list(items)
        shown = ", ".join(repr(t) for t in items[:limit])
        return shown + (f" … (+{len(items) - limit})" if len(items) > limit else "")

    lines = [
        f"vocabulary: {report['tokens']} tokens in {report['rows']} rows"
        + (f" ({report['padding_rows']} padding)" if report["padding_rows"] else "")
        + f", source {report['source']}",
    ]
    if report["added"]:
        lines.append(f"  added beyond the base: {some(report['added'])}")
    for ref, m in report["models"].items():
        lines.append(f"  {ref}: {m['tokens']} tokens, {m['embedding_rows']} rows; {m['remapped']} remapped")
        by_how: dict[str, list[str]] = {}
        for token, how in m["filled"].items():
            by_how.setdefault(how, []).append(token)
        for how, toks in by_how.items():
            lines.append(f"    filled {how}: {some(toks)}")
        if m["padding_rows_mean"]:
            lines.append(f"    {m['padding_rows_mean']} padding rows: its mean embedding")
        if m["stripped"]:
            lines.append(f"    stripped (id past the embedding): {some(m['stripped'])}")
        if m["dropped"]:
            lines.append(f"    dropped (not in the output vocabulary): {some(m['dropped'])}")
    return "\n".join(lines)


def report_html(report: dict, *, limit: int = 50) -> str:
    """The vocabulary report as an HTML <section> for the merge report page."""
    e = html.escape
    out = [
        '<section class="vocabulary"><h2>Vocabulary</h2>',
        f"<p>{report['tokens']} tokens in {report['rows']} embedding rows ({report['padding_rows']} padding), "
        f"source <code>{e(str(report['source']))}</code>.</p>",
    ]
    if report["added"]:
        out.append("<p>Added beyond the base: " + ", ".join(f"<code>{e(t)}</code>" for t in report["added"][:limit]) + "</p>")
    out.append("<table><tr><th>model</th><th>tokens</th><th>rows</th><th>remapped</th><th>filled</th><th>dropped</th><th>stripped</th></tr>")
    for ref, m in report["models"].items():
        filled = "<br>".join(f"<code>{e(t)}</code>: {e(h)}" for t, h in list(m["filled"].items())[:limit])
        out.append(
            f"<tr><td>{e(ref)}</td><td>{m['tokens']}</td><td>{m['embedding_rows']}</td><td>{m['remapped']}</td>"
            f"<td>{filled}</td><td>{len(m['dropped'])}</td><td>{len(m['stripped'])}</td></tr>"
        )
    out.append("</table></section>")
    return "\n".join(out)
