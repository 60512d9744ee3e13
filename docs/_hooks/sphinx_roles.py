"""mkdocs hook: show the Sphinx cross-reference roles of our docstrings as plain code.

The docstrings name other objects Sphinx-style (:class:`X`, :func:`~a.b.f`); mkdocstrings
renders the backticked part as code and leaves the role's name in front of it. This hook
drops the role name and, for a ``~`` target, keeps only the last dotted component, as
Sphinx displays it. A paragraph that ends in reST's literal-block marker ``::`` (the
indented block after it already renders as code) ends in one colon, as Sphinx shows it.
"""
from __future__ import annotations

import re

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):<code>(~?)([^<]*)</code>")


def _plain(match: re.Match) -> str:
    tilde, target = match.groups()
    if tilde:
        target = target.rsplit(".", 1)[-1]
    return f"<code>{target}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_plain, html).replace("::</p>", ":</p>")
