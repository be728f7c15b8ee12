"""The README's architecture table is the one generated from the naming data."""

from pathlib import Path

from layerscope.checkpoint.support import architecture_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_architecture_table_is_generated_from_the_data():
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- architecture-table:start")
    body = text[text.index("-->", start) + 4:text.index("<!-- architecture-table:end -->")]
    assert body == architecture_table()
