"""The progress bar and the table share a terminal: rows printed while the bar is up start on
a line of their own (the bar is cleared first), so the markdown table stays intact."""
import sys

import pytest

pytest.importorskip("milora")
from milora.bench.progress import Progress  # noqa: E402


class Terminal:
    """stdout and stderr of one terminal: renders carriage returns and newlines."""

    def __init__(self):
        self.chars = []

    def stream(self):
        term = self

        class S:
            def write(self, text):
                term.chars.append(text)
                return len(text)

            def flush(self):
                pass

            def isatty(self):
                return True

        return S()

    def lines(self):
        out, line, col = [], [], 0
        for ch in "".join(self.chars):
            if ch == "\n":
                out.append("".join(line).rstrip())
                line, col = [], 0
            elif ch == "\r":
                col = 0
            else:
                if col < len(line):
                    line[col] = ch
                else:
                    line.append(ch)
                col += 1
        out.append("".join(line).rstrip())
        return out


def test_rows_printed_under_a_bar_start_their_own_line(monkeypatch):
    term = Terminal()
    out, err = term.stream(), term.stream()
    monkeypatch.setattr(sys, "stdout", out)
    print("| phase | method |")
    with Progress(6, stream=err) as bar:  # enabled: stderr is a terminal
        for case in range(3):
            bar.set_label(f"case {case}")
            bar.step()
            print(f"| decode | m{case} |")
            bar.step()
    assert sys.stdout is out, "the stdout wrapper must be removed when the bar closes"
    lines = [ln for ln in term.lines() if ln]
    assert lines == ["| phase | method |", "| decode | m0 |", "| decode | m1 |", "| decode | m2 |"], lines


def test_no_wrapper_when_stdout_is_not_a_terminal(monkeypatch):
    import io

    buf = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buf)
    err = Terminal().stream()
    with Progress(2, stream=err) as bar:
        assert sys.stdout is buf
        bar.step()
        print("row")
    assert buf.getvalue() == "row\n"
