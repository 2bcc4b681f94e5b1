"""A mistyped flag in train.py or evaluate.py: one line naming the flag it resembles, exit 2."""
import pytest

from infra import cli


@pytest.mark.parametrize("parse, argv, hint", [
    (cli.train_args, ["--stpes", "3"], "--stpes: did you mean --steps?"),
    (cli.train_args, ["--lr-rate", "1"], "--lr-rate: did you mean --lr?"),  # a flag it extends
    (cli.train_args, ["--batch-szie=4", "--sed", "1"],
     "--batch-szie: did you mean --batch-size?; --sed: did you mean --seed?"),
    (cli.evaluate_args, ["--taks", "STSBenchmark"], "--taks: did you mean --tasks?"),
    (cli.evaluate_args, ["--max-new-tokns", "4"], "did you mean --max-new-tokens?"),
])
def test_a_mistyped_flag_gets_a_suggestion_in_one_line(parse, argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "unrecognized arguments" in err and hint in err


def test_no_suggestion_for_what_resembles_no_flag_nor_a_hidden_one(capsys):
    for parse, argv in ((cli.train_args, ["--learning-rate", "1"]), (cli.train_args, ["x"])):
        with pytest.raises(SystemExit):
            parse(argv)
        err = capsys.readouterr().err
        assert "did you mean" not in err and "unrecognized arguments" in err
    with pytest.raises(SystemExit):
        cli.evaluate_args(["--top-kk", "3"])  # evaluate's --top-k is a hidden rename
    assert "did you mean --top-k?" not in capsys.readouterr().err
