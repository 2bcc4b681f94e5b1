"""infra/cli.py for train.py: the help text, the range checks and their one-line errors."""
import pytest
import torch

from infra import cli


def one_error_line(capsys):
    """The parser's stderr, checked to be the one line "error: ... (see: python train.py -h)"."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert err.rstrip("\n").endswith("(see: python train.py -h)"), err
    return err


def test_help_shows_a_help_line_and_the_real_default_for_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.train_args(["-h"])
    text = capsys.readouterr().out
    # their help says what happens
    no_default = {"--preset", "--micro-batch-size", "--resume", "--eval-data"}
    for action in cli.train_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        flag = action.option_strings[0]
        if action.default not in (None, False):
            help_line = cli.HelpFormatter(flag)._get_help_string(action)
            assert f"{flag}" in text and "(default: " in help_line, flag
        elif action.default is None:
            assert ("by preset" in action.help or "default:" in action.help
                    or flag in no_default), flag
    assert "(default: 0.1)" in text and "tiny-lm" in text and "--top-k" in text
    assert "--side-temperature" in text


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size must be in [1, "),
    (["--batch-size", str(10 ** 21)], "--batch-size must be in [1, "),
    (["--max-new-tokens", "0"], "--max-new-tokens must be in [1, "),
    (["--max-new-tokens", str(10 ** 8)], "--max-new-tokens must be in [1, "),
    (["--save-every", "0"], "--save-every must be in [1, "),
    # sampled: 0 would be one rollout G times
    (["--temperature", "0"], "--temperature must be in [0.0001, "),
    (["--top-p", "1.5"], "--top-p must be in [1e-06, 1]"),
    (["--lr=-1e-6"], "--lr must be in [0, 1]"),
    (["--lr", "1e30"], "--lr must be in [0, 1]"),
    (["--kl-coef", "nan"], "--kl-coef must be a finite number"),
    (["--tau", "inf"], "--tau must be a finite number"),
    (["--seed", str(10 ** 21)], "--seed must be in [0, "),
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--reward", "infonce", "--clustering-weight", "0.5"],
     "--clustering-weight only apply to --reward release"),
    (["--reward", "infonce", "--no-scale"], "--no-scale only apply to --reward release"),
    (["--objective", "contrastive", "--mode", "unsupervised"],
     "--objective contrastive needs --mode supervised"),
])
def test_bad_numbers_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.train_args(argv)
    assert e.value.code == 2 and message in one_error_line(capsys)


def test_a_range_error_names_the_flag_the_bounds_and_the_value(capsys):
    with pytest.raises(SystemExit) as e:
        cli.train_args(["--batch-size", "0"])
    assert e.value.code == 2
    assert one_error_line(capsys) == ("error: --batch-size must be in [1, 1048576], got 0 "
                                      "(see: python train.py -h)\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_cuda_on_a_cpu_machine_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.train_args(["--device", "cuda"])
    assert e.value.code == 2 and "no CUDA GPU" in one_error_line(capsys)
