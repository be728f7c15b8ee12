"""The docs' architecture table is the one generated from the naming data."""

from pathlib import Path

from layerscope.checkpoint.support import architecture_table

ARCHITECTURES_PAGE = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


def test_docs_architecture_table_is_generated_from_the_data():
    text = ARCHITECTURES_PAGE.read_text(encoding="utf-8")
    start = text.index("<!-- architecture-table:start")
    body = text[text.index("-->", start) + 4:text.index("<!-- architecture-table:end -->")]
    assert body == architecture_table()
