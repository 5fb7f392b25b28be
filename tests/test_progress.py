"""Progress over rounds: plain lines when piped; on a terminal a bar that appears with the first round (so start-up
log lines do not cut through it) and starts where a resumed run stopped."""

import io

from flexp.fedavg import RoundRecord
from flexp.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(round_: int) -> RoundRecord:
    return RoundRecord(round=round_, clients=1, train_loss=0.5, round_seconds=0.1, bytes_up=0, bytes_down=0,
                       test_accuracy=0.9, test_loss=0.3)


def test_piped_progress_is_one_line_per_round():
    out = io.StringIO()
    progress = Progress(10, stream=out)
    progress.update(record(1))
    assert out.getvalue().startswith("round 1/10  train_loss 0.5000  test_acc 0.9000")
    private = RoundRecord(round=2, clients=1, train_loss=float("nan"), round_seconds=0.1, bytes_up=0, bytes_down=0,
                          test_accuracy=0.8, test_loss=0.4, extra={"epsilon": 1.23456})
    progress.update(private)  # a privacy stage withholds the training loss and spends epsilon
    assert out.getvalue().splitlines()[1] == "round 2/10  test_acc 0.8000  test_loss 0.4000  epsilon 1.23  0.10s"


def test_the_bar_appears_with_the_first_round_and_a_resumed_run_starts_where_it_stopped():
    out = Terminal()
    progress = Progress(10, stream=out)
    assert out.getvalue() == ""   # nothing drawn while the job still logs its start-up lines
    progress.update(record(4))    # the first round after resuming from round 3
    progress.update(record(5))
    progress.close()
    assert "5/10" in out.getvalue() and "1/10" not in out.getvalue()
