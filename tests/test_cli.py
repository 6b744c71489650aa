import json

from click.testing import CliRunner

from cli.main import cli


def test_help_lists_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("embed", "prompts", "import", "make-shards", "models"):
        assert name in result.output


def test_every_command_answers_help():
    runner = CliRunner()
    for name in cli.commands:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage" in result.output


def test_make_shards_then_embed_json(tmp_path):
    runner = CliRunner()
    out = tmp_path / "shards"
    r = runner.invoke(
        cli,
        [
            "make-shards",
            "--out",
            str(out),
            "--num-classes",
            "6",
            "--per-shard",
            "12",
            "--shards",
            "2",
            "--noise",
            "sym",
            "--rate",
            "0.5",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    made = json.loads(r.stdout)
    assert made["samples"] == 24 and len(made["shards"]) == 2
    r = runner.invoke(
        cli,
        [
            "embed",
            f"{out}/shapes-{{000000..000001}}.tar",
            "--cache",
            str(tmp_path / "c.zarr"),
            "--classes",
            str(out / "classes.json"),
            "--workers",
            "0",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)  # stdout holds one JSON object and nothing else
    assert summary["rows"] == 24 and summary["shards"]["done"] == 2


def test_bad_input_is_one_line_with_nonzero_exit(tmp_path):
    r = CliRunner().invoke(cli, ["embed", str(tmp_path / "missing.tar"), "--cache", str(tmp_path / "c.zarr")])
    assert r.exit_code == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    r = CliRunner().invoke(cli, ["embed", "x.tar", "--precision", "fp8"])
    assert r.exit_code == 2 and "fp8" in r.stderr


def test_usage_errors_are_one_line_with_exit_status_2():
    for args in (
        ["select", "--no-such-option"],
        ["select", "--theta-cons", "high"],
        ["nonsense"],
        ["make-shards"],
        ["report", "--cache", "x.zarr"],
    ):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2, (args, r.output)
        assert r.stderr.startswith("engine: error: ") and r.stderr.strip().count("\n") == 0, (args, r.stderr)


def test_one_vocabulary_across_commands():
    """Shared options read the same everywhere; one spelling of neighbors; counts named as counts."""
    runner, seen = CliRunner(), {}
    for name, command in cli.commands.items():
        for param in command.params:
            for opt in param.opts:
                assert "neighbour" not in opt and opt not in ("--workdir", "--knn-k", "--neighbors"), (name, opt)
                if opt in ("--cache", "--device", "--json", "--seed") and name not in ("import", "report"):
                    seen.setdefault(opt, set()).add(param.help)
        out = [p for p in command.params if "--out" in p.opts]
        assert all("(file)" in p.help or "(folder)" in p.help for p in out), name
        help_text = runner.invoke(cli, [name, "--help"]).output
        assert "neighbour" not in help_text.lower(), name
    assert all(len(helps) == 1 for helps in seen.values()), seen
    classes = [p for p in cli.commands["make-shards"].params if "--num-classes" in p.opts]
    assert classes and not [p for p in cli.commands["make-shards"].params if "--classes" in p.opts]
