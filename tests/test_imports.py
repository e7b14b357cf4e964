"""The package has no import cycle, between modules or between its folders (scripts/check_imports.py)."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_imports.py"


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycles(capsys):
    assert _checker().main() == 0, capsys.readouterr().out


def test_a_cycle_is_found():
    check = _checker()
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert check.cycles(edges) == [["a", "b", "c"]]
    assert check.folder_graph({"blockdraft.refine.x": {"blockdraft.train.y"}, "blockdraft.train.y": {"blockdraft.refine.z"}}) \
        == {"blockdraft.refine": {"blockdraft.train"}, "blockdraft.train": {"blockdraft.refine"}}
