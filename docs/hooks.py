"""mkdocs hook: docstrings written for Sphinx use roles (:class:`Plan`); mkdocstrings renders the code span
but leaves the role's name in front of it.  Drop the name, keep the code."""

import re

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):(?=<code>)")


def on_page_content(html, page, config, files):  # noqa: ARG001 - the hook's signature
    return ROLE.sub("", html)
