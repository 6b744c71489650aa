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
    r = runner.invoke(cli, ["make-shards", str(out), "--classes", "6", "--per-shard", "12", "--shards", "2",
                            "--noise", "sym", "--rate", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    made = json.loads(r.stdout)
    assert made["samples"] == 24 and len(made["shards"]) == 2
    r = runner.invoke(cli, ["embed", f"{out}/shapes-{{000000..000001}}.tar", "--cache", str(tmp_path / "c.zarr"),
                            "--classes", str(out / "classes.json"), "--workers", "0", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)  # stdout holds one JSON object and nothing else
    assert summary["rows"] == 24 and summary["shards"]["done"] == 2


def test_bad_input_is_one_line_with_nonzero_exit(tmp_path):
    r = CliRunner().invoke(cli, ["embed", str(tmp_path / "missing.tar"), "--cache", str(tmp_path / "c.zarr")])
    assert r.exit_code == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    r = CliRunner().invoke(cli, ["embed", "x.tar", "--precision", "fp8"])
    assert r.exit_code == 2 and "fp8" in r.stderr
