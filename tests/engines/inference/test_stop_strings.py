"""Stop strings applied while text arrives: never sent, a possible beginning held back."""

from __future__ import annotations

from workers.inference.stop_strings import StopScanner


def test_a_stop_string_split_over_pieces_is_never_sent_and_ends_the_answer():
    scanner = StopScanner(["STOP"])
    assert scanner.feed("YES S") == "YES "
    assert not scanner.stopped
    assert scanner.feed("TOP and more") == ""
    assert scanner.stopped and scanner.text == "YES "
    assert scanner.feed("later") == "" and scanner.flush() == ""


def test_a_held_beginning_that_does_not_complete_is_released():
    scanner = StopScanner(["STOP"])
    assert scanner.feed("a ST") == "a "
    assert scanner.feed("x") == "STx"
    assert scanner.feed("S") == ""
    assert scanner.flush() == "S" and not scanner.stopped


def test_the_earliest_of_several_stop_strings_cuts():
    scanner = StopScanner(["\n\n", "."])
    assert scanner.feed("YES. Because\n\nmore") == "YES"
    assert scanner.stopped


def test_a_stop_string_right_at_the_start_leaves_nothing():
    scanner = StopScanner(["Y"])
    assert scanner.feed("YES") == "" and scanner.stopped and scanner.text == ""


def test_without_stop_strings_everything_passes_at_once():
    scanner = StopScanner(["", ""])
    assert [scanner.feed(p) for p in ("a", "b ", "")] == ["a", "b ", ""]
    assert scanner.flush() == ""
