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
    (["--in-batch-weight", "1", "--mode", "unsupervised"],
     "--in-batch-weight is for --mode supervised"),
    (["--reward", "infonce", "--in-batch-weight", "1"],
     "--in-batch-weight only apply to --reward release"),
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


# ----------------------------------------------------------------------------- the system prompt

# The release's prompt, quoted from GasolSun36/GRACE (rl_dataset.py PROMPT2, eval_mteb.py PROMPT).
RELEASE_TEXT = ("Read and analyze the following text, then you need to provide your reasoning "
                "within <think></think> tags. Finally, generate a comprehensive understanding of "
                "this text.")


def test_the_release_preset_uses_the_release_prompt_and_the_others_policys_default():
    import policy

    assert cli.RELEASE_SYSTEM_PROMPT == RELEASE_TEXT
    for argv, want in ((["--preset", "release"], RELEASE_TEXT),
                       (["--model", "Qwen/Qwen2.5-1.5B-Instruct"], RELEASE_TEXT),  # release
                       ([], policy.DEFAULT_SYSTEM_PROMPT),  # tiny
                       (["--model", "tiny-lm"], policy.DEFAULT_SYSTEM_PROMPT),
                       (["--preset", "release", "--system-prompt", "Summarise."], "Summarise.")):
        args, given = cli.train_args(argv)
        assert args.system_prompt == want, argv
        assert ("system_prompt" in given) == ("--system-prompt" in argv)


def test_system_prompt_file_is_read_and_counts_as_given(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("Describe the text.\nThen its topic.\n", encoding="utf-8")
    args, given = cli.train_args(["--preset", "release", "--system-prompt-file", str(path)])
    assert args.system_prompt == "Describe the text.\nThen its topic."  # final line break dropped
    assert "system_prompt" in given  # so --resume compares it like any other setting


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "prompt.txt: no such file"),
    (lambda p: p.write_text(" \n\n"), "prompt.txt is empty"),
    (lambda p: p.write_bytes(b"\xff\xfe\xfa"), "prompt.txt: unreadable"),
    (lambda p: p.mkdir(), "prompt.txt: unreadable"),
])
def test_a_bad_system_prompt_file_is_one_line_naming_it(tmp_path, capsys, make, message):
    path = tmp_path / "prompt.txt"
    make(path)
    with pytest.raises(SystemExit) as e:
        cli.train_args(["--system-prompt-file", str(path)])
    err = one_error_line(capsys)
    assert e.value.code == 2 and message in err and str(path) in err, err


def test_system_prompt_and_its_file_exclude_each_other_and_an_empty_one_is_refused(
        tmp_path, capsys):
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(SystemExit) as e:
        cli.train_args(["--system-prompt", "a", "--system-prompt-file", str(tmp_path / "p.txt")])
    assert e.value.code == 2 and "not allowed with argument" in one_error_line(capsys)
    with pytest.raises(SystemExit) as e:
        cli.train_args(["--system-prompt", "  "])
    assert e.value.code == 2 and "--system-prompt is empty" in one_error_line(capsys)


# ----------------------------------------------------------------------------- global batch sizes

@pytest.mark.parametrize("argv,world,records,message", [
    ([], 3, 1000, "--batch-size 64 (from the release preset) does not split over 3 processes"),
    (["--mini-batch-size", "6"], 4, 1000, "--mini-batch-size 6 does not split over 4 processes"),
    (["--mini-batch-size", "24"], 1, 1000,
     "--batch-size 64 (from the release preset) is not a whole number of mini-batches of "
     "--mini-batch-size 24"),
    (["--batch-size", "48", "--mini-batch-size", "32"], 2, 1000,
     "--batch-size 48 is not a whole number of mini-batches of --mini-batch-size 32"),
    ([], 1, 10, "--batch-size 64 (from the release preset) is more than the 10 records"),
])
def test_batch_sizes_that_do_not_split_are_refused_naming_the_numbers(argv, world, records,
                                                                      message):
    args, given = cli.train_args(["--model", "Qwen/Qwen2.5-1.5B-Instruct", *argv])
    with pytest.raises(cli.UsageError) as e:
        cli.check_run(args, given, world, records)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_batch_sizes_are_global_and_the_micro_batch_is_a_ranks_share_by_default():
    # the release on 4 ranks: 64 / 4 = 16 texts each, mini-batches of 16 / 4 = 4 per rank
    args, given = cli.train_args(["--model", "Qwen/Qwen2.5-1.5B-Instruct"])
    cli.check_run(args, given, 4, 1000)
    assert (args.batch_size, args.mini_batch_size, args.micro_batch_size) == (64, 16, 4)
    args, given = cli.train_args(["--model", "Qwen/Qwen2.5-1.5B-Instruct",
                                  "--micro-batch-size", "1"])
    cli.check_run(args, given, 4, 1000)
    assert args.micro_batch_size == 1  # given: per rank, as given
    args, given = cli.train_args([])  # tiny, one process: a whole mini-batch
    cli.check_run(args, given, 1, 40)
    assert args.micro_batch_size == args.mini_batch_size == 4
