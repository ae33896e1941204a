"""`safeclip demo` end to end (one short CLIP warm-up epoch to keep it quick)."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from cli.main import app
from sanitize.stages.query import connect

runner = CliRunner()


def test_demo_summary_reports_what_the_outputs_hold(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--unimodal-epochs", "0", "--clip-epochs", "1",
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    for path in ("data/poisoned/manifest.parquet", "warmup.pt", "embeddings/embed.json", "split/split.json",
                 "report.html"):
        assert (out / path).exists(), path

    con = connect(out / "split")
    pairs, risky = con.execute("SELECT count(*), count(*) FILTER (WHERE partition = 'risky') FROM pairs").fetchone()
    assert pairs == 5000 + 50 + 4 * 25  # sample + BadNet + targeted copies
    text = " ".join(result.output.split())
    assert f"{pairs:,} pairs, {risky:,} flagged risky" in text
    for attack, n in (("badnet", 50), ("targeted", 100)):
        (in_risky,) = con.execute("SELECT count(*) FROM risky JOIN truth USING (key) WHERE attack = ?",
                                  [attack]).fetchone()
        assert f"{in_risky} of {n} {attack} poisons in the risky set" in text
    top = con.execute("SELECT caption FROM risky ORDER BY rank DESC LIMIT 5").fetchall()
    for (caption,) in top:
        assert caption in result.output
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "<svg" in html
    assert re.search(r"demo finished in \d+s", result.output)


def test_demo_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "demo").mkdir()
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 1 and "--force" in result.output
