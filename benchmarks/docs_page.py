"""The generated blocks of the report pages under ``docs/``: each benchmark's ``--update-docs`` rewrites the text
between its two HTML-comment markers and leaves the page's hand-written prose around them as it is."""

from __future__ import annotations

from modeling_actprior.training.atomic_io import write_text


def replace_block(path: str, start: str, end: str, text: str) -> None:
    """Put ``text`` between the markers ``start`` and ``end`` of the markdown page ``path`` (written atomically, so an
    interrupted update leaves the old page). A page without both markers, in that order, is an error and stays as
    it is."""
    with open(path) as f:
        page = f.read()
    head, found_start, rest = page.partition(start)
    _, found_end, tail = rest.partition(end)
    if not found_start or not found_end:
        raise ValueError(f"{path} has no {start} ... {end} block to update: put the two markers, in this order, "
                         "where the generated report belongs, and run again.")
    write_text(path, f"{head}{start}\n{text}\n{end}{tail}")
