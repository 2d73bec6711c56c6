"""The operator's progress bars (server/progress.py): rich on a terminal, silent anywhere else."""

from __future__ import annotations

from fedpref.server.progress import RoundBar, progress_bar


def test_a_round_bar_prints_nothing_off_a_terminal(capsys, monkeypatch) -> None:
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    bar = RoundBar("rounds", total=3, done=1)
    bar.update(advance=1, eps_user="0.50")
    bar.close()
    with progress_bar() as p:
        p.advance(p.add_task("embedding texts", total=2), 2)
    assert capsys.readouterr() == ("", "")  # a log file or a pipe gets no bar lines


def test_a_round_bar_on_a_terminal_counts_rounds_and_shows_the_note(capsys, monkeypatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: treat stderr as a terminal
    bar = RoundBar("aggregated rounds", total=3, done=1)
    bar.update(advance=1, eps_user="0.50", ok=3, rej=0)
    bar.update(done=3)
    bar.close()
    err = capsys.readouterr().err
    assert "aggregated rounds" in err and "3/3" in err and "eps_user=0.50 ok=3 rej=0" in err  # drawn at close
