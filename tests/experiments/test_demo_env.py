"""calib-demo keeps its hands off os.environ: environments are passed explicitly."""
import ast
import os
from pathlib import Path

from nnunet_calibration.experiments import demo

DEMO_SRC = Path(demo.__file__)


def test_demo_environment_is_explicit(tmp_path):
    before = dict(os.environ)
    base = {"PATH": "/usr/bin", "nnUNet_results": "/elsewhere"}
    base_copy = dict(base)
    folders, env = demo.demo_environment(tmp_path / "work", base=base)
    assert dict(os.environ) == before
    assert base == base_copy  # the given base is not modified either
    for k in ("raw", "preprocessed", "results"):
        assert folders[k] == tmp_path / "work" / f"nnUNet_{k}" and folders[k].is_dir()
        assert env[f"nnUNet_{k}"] == str(folders[k])
    assert env["PATH"] == "/usr/bin" and env["nnUNet_compile"] == "f"
    folders, env = demo.demo_environment(tmp_path / "work2")  # default base: a copy of os.environ
    assert dict(os.environ) == before
    assert env["nnUNet_raw"] == str(folders["raw"])


def test_demo_main_leaves_environment_unchanged(tmp_path, capsys):
    """A bad ACDC path (issue 21): exit 2 naming it, before any folder is made (nothing left behind), and
    os.environ unchanged; an ACDC folder of the wrong layout: the work folders this run made are removed again."""
    before = dict(os.environ)
    rc = demo.main([str(tmp_path / "no_such_acdc"), "--work", str(tmp_path / "work"), "--quiet",
                    "--output-root", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert rc == 2 and "calib-demo: error" in err and "no_such_acdc" in err, err
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()
    (tmp_path / "not_acdc").mkdir()
    (tmp_path / "not_acdc" / "readme.txt").write_text("x")
    rc = demo.main([str(tmp_path / "not_acdc"), "--work", str(tmp_path / "work"), "--quiet",
                    "--output-root", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert rc == 2 and "calib-demo: error" in err and "not_acdc" in err, err
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()
    assert dict(os.environ) == before


def test_demo_source_writes_nothing_to_os_environ():
    """No assignment, update, pop, clear or setdefault on os.environ anywhere in demo.py."""
    tree = ast.parse(DEMO_SRC.read_text())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "environ":
            bad.append(node.lineno)  # any use of os.environ (reading included) would go through nnunet_env
    assert bad == [], f"demo.py uses os.environ at lines {bad}"


def test_side_by_side_thread_settings():
    from nnunet_calibration.experiments.runner import side_by_side_env

    assert side_by_side_env(1) == {}  # one training: torch's own defaults
    assert side_by_side_env(2, cores=2) == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert side_by_side_env(3, cores=8)["OMP_NUM_THREADS"] == "2"
    assert side_by_side_env(4, cores=2)["OMP_NUM_THREADS"] == "1"  # never 0
