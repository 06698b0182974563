"""Preparing the benchmark's data again rewrites each folder's README, but keeps its teacher notes."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.quality import prepare


def test_a_readme_written_again_keeps_its_teacher_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "shared" / "toy"
    source.mkdir(parents=True)
    (source / "README.md").write_text("# toy\n\nToy set (Someone 2020)\n\n## Source\n\nhere\n\n## License\n\nCC0\n")
    monkeypatch.setattr(prepare, "DATA", tmp_path / "data")
    (tmp_path / "data" / "toy").mkdir(parents=True)
    readme = tmp_path / "data" / "toy" / "README.md"
    readme.write_text("# stale\n\n## Subsample\n\nold\n\n## Teacher predictions\n\nmade by hand\n")
    prepare.readme("toy", source, {"train.jsonl": 3}, "The first 3 rows.")
    text = readme.read_text()
    assert "old" not in text and "- `train.jsonl`: 3 rows" in text and "## License\n\nCC0" in text
    assert text.endswith("## Teacher predictions\n\nmade by hand\n")
    readme.write_text("# stale\n")  # without one, nothing is added
    prepare.readme("toy", source, {"train.jsonl": 3}, "The first 3 rows.")
    assert "Teacher" not in readme.read_text()
