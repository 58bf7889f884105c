"""Regenerate the generated parts of docs/ (`make docs`): calibration tables, the field reference."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from calibration import compare  # noqa: E402
from llama_operator import reference  # noqa: E402


def replace_section(doc: Path, begin: str, end: str, content: str) -> None:
    text = doc.read_text()
    start = text.index(begin)
    stop = text.index(end) + len(end)
    doc.write_text(text[:start] + content + text[stop:])
    print(f"updated {doc.relative_to(ROOT)}")


def main() -> None:
    replace_section(ROOT / "docs" / "estimator.md", compare.GENERATED_BEGIN, compare.GENERATED_END,
                    compare.generated_section())
    replace_section(ROOT / "docs" / "operator.md", reference.BEGIN, reference.END, reference.field_reference())


if __name__ == "__main__":
    main()
