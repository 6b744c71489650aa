import subprocess
import sys

import engine


def test_every_export_resolves():
    for name in engine.__all__:
        assert getattr(engine, name) is not None, name


def test_import_is_cheap_and_runs_nothing():
    code = "import sys, engine; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
