"""Progress meters: what a person sees during a long phase, in a log and on a terminal."""

import io

from transformer import progress
from transformer.progress import Meter, format_duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_interval_and_a_last_one():
    log = io.StringIO()
    meter = Meter("tokenizing the train split", 10, "examples", every_s=0.0, stream=log)
    meter.start -= 2  # begun 2 s ago: long enough for a rate
    meter.advance(3)
    meter.advance(7)
    meter.finish()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()
    assert lines[0].startswith("tokenizing the train split: 3/10 examples, ")
    assert "examples/s, ETA " in lines[0]
    assert lines[1].startswith("tokenizing the train split: 10/10 examples, ")
    assert "ETA" not in lines[1] and lines[1].endswith("0m02s")  # the time it took


def test_a_first_update_at_once_shows_no_rate_or_eta():
    log = io.StringIO()
    meter = Meter("fitting", 7, "rounds", first_at_once=True, stream=log)
    meter.advance(1)  # at once: 1 round in microseconds is no rate
    assert log.getvalue() == "fitting: 1/7 rounds\n"
    meter.start -= 10  # 10 s later
    meter.advance(6)
    meter.finish()
    assert log.getvalue().splitlines()[-1].startswith("fitting: 7/7 rounds, 0.7 rounds/s, 0m1")


def test_a_log_shows_the_last_count_once():
    log = io.StringIO()
    meter = Meter("translating the test split", None, "sentences", every_s=0.0, stream=log)
    meter.update(4, 8)
    meter.update(8, 8)
    meter.finish()
    assert log.getvalue().count("8/8 sentences") == 1


def test_a_log_is_not_flooded_between_intervals():
    log = io.StringIO()
    meter = Meter("writing", 1000, "pairs", every_s=3600.0, stream=log)
    for _ in range(1000):
        meter.advance(1)
    assert log.getvalue() == ""
    meter.finish()
    assert log.getvalue().count("\n") == 1 and "1,000/1,000 pairs" in log.getvalue()


def test_a_terminal_gets_one_bar_redrawn_in_place():
    screen = Terminal()
    meter = Meter("translating", None, "lines", every_s=3600.0, stream=screen)
    meter.update(5, 20)  # the total becomes known on the way
    meter.update(20, 20)
    meter.finish()
    drawn = screen.getvalue()
    assert drawn.count("\r") == 2 and drawn.endswith("\n")
    assert "translating: [#####               ] 5/20 lines" in drawn
    assert "[####################] 20/20 lines" in drawn


def test_durations_read_as_minutes_or_hours():
    assert format_duration(75) == "1m15s"
    assert format_duration(3 * 3600 + 5 * 60) == "3h05m"
    assert format_duration(-4) == "0m00s"


def test_counts_agree_with_their_nouns():
    assert progress.counted(1.0, "minute") == "1 minute"  # --train_minutes=1
    assert progress.counted(0.5, "minute") == "0.5 minutes"
    assert progress.counted(1, "sentence") == "1 sentence"
    assert progress.counted(1030, "sentence") == "1,030 sentences"
