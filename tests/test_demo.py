"""`safeclip demo` end to end, with a reduced warm-up budget."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from cli.main import app
from sanitize.stages.query import connect

runner = CliRunner()


def test_demo_summary_reports_what_the_outputs_hold(tmp_path):
    """A reduced warm-up budget (2 CLIP epochs, not 3) still ends with a poison-free safe set, of
    10% here (measured: the first poison at 14.7%; the full demo's is at 41.7%, docs/pipeline.md)."""
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--clip-epochs", "2", "--ratio-schedule",
                                 "fraction:0.1", "--workers", "0", "--threads", "1"])
    assert result.exit_code == 0, result.output
    for path in ("data/poisoned/manifest.parquet", "warmup.pt", "embeddings/embed.json", "split/split.json",
                 "report.html"):
        assert (out / path).exists(), path

    con = connect(out / "split")
    pairs, safe = con.execute("SELECT count(*), count(*) FILTER (WHERE partition = 'safe') FROM pairs").fetchone()
    assert pairs == 5000 + 50 + 4 * 25  # sample + BadNet + targeted copies
    (poisons_in_safe,) = con.execute("SELECT count(*) FROM safe JOIN truth USING (key) "
                                     "WHERE kind = 'poison'").fetchone()
    # The point of the demo: a safe set that holds no poison.
    assert safe == 515 and poisons_in_safe == 0
    text = " ".join(result.output.split())
    assert f"{pairs:,} pairs split by fraction:0.1: 515 safe (10.0%) holding 0 of 150 poisons" in text
    # This weaker warm-up's mixture overlaps, and the summary says so.
    assert "warning: the mixture's components overlap" in text
    for attack, n in (("badnet", 50), ("targeted", 100)):
        (in_risky,) = con.execute("SELECT count(*) FROM risky JOIN truth USING (key) WHERE attack = ?",
                                  [attack]).fetchone()
        assert in_risky == n and f"{n} of {n} {attack} poisons in the risky set (recall 100.0%)" in text
    (first,) = con.execute("SELECT min(rank) FROM pairs JOIN truth USING (key) WHERE kind = 'poison'").fetchone()
    assert f"the cleanest-looking poison ranks {first:,} of {pairs:,}" in text
    assert f"headroom {100 * (first - safe) / pairs:+.1f} points" in text
    assert "Bhattacharyya coefficient" in text
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
