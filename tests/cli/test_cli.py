"""The CLI contract: --help lists verbs, user mistakes give one line and a non-zero exit, no traceback."""

import importlib.machinery
import subprocess
import sys
import types

import pytest

from aptp import cli


def _run(*args):
    return subprocess.run([sys.executable, "-m", "aptp", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_available_verb():
    r = _run("--help")
    assert r.returncode == 0
    for verb in cli.VERBS:
        assert verb in r.stdout


def test_each_verb_has_help(capsys):
    """In-process (one import of each verb module) rather than a torch-importing subprocess per verb."""
    for verb in cli.VERBS:
        with pytest.raises(SystemExit) as exc:
            cli.main([verb, "--help"])
        assert exc.value.code == 0, verb
        assert "usage: aptp " + verb in capsys.readouterr().out


def test_torch_free_verb_help_through_the_entry_point():
    r = _run("route", "--help")
    assert r.returncode == 0 and "usage: aptp route" in r.stdout


@pytest.mark.parametrize("argv", [["no-such-verb"], ["--no-such-flag"], []])
def test_bad_invocation_is_one_line_without_traceback(argv):
    r = _run(*argv)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "error:" in r.stderr.strip().splitlines()[-1]


def test_user_error_is_reported_on_one_line(capsys, monkeypatch):
    """A verb raising UserError exits 2 with exactly one line on stderr."""
    mod = types.ModuleType("_aptp_fake_verb")
    mod.__spec__ = importlib.machinery.ModuleSpec("_aptp_fake_verb", None)
    mod.add_arguments = lambda p: p.add_argument("--data", default="/nope")

    def run(args):
        raise cli.UserError(f"the data directory {args.data} does not exist")

    mod.run = run
    monkeypatch.setitem(sys.modules, "_aptp_fake_verb", mod)
    monkeypatch.setattr(cli, "VERBS", {"fake": ("_aptp_fake_verb", "a fake verb")})
    code = cli.main(["fake"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "aptp fake: error: the data directory /nope does not exist\n"


@pytest.mark.parametrize("argv,message", [
    (["demo", "--out", "{tmp}/d", "--bench-threads", "-1"], "--bench-threads must be >= 0"),
    (["demo", "--out", "{tmp}/d", "--repeats", "0"], "--repeats >= 1"),
    (["bench", "--engines", "{tmp}", "--threads", "1"], "not an export directory"),
])
def test_demo_and_bench_refuse_bad_values_before_any_work(argv, message, tmp_path, capsys):
    code = cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "d").exists()  # nothing was started


def test_every_verbs_help_builds_without_heavy_imports():
    """`aptp VERB --help` stays under a second: building a verb's parser imports no torch, diffusers,
    transformers, onnx, matplotlib, openvino or nncf (measured as modules loaded, not as wall time)."""
    import json
    import subprocess
    import sys

    from aptp.cli import VERBS

    script = ("import json, sys\nfrom aptp.cli import build_parser\nout = {}\n"
              "for verb in json.loads(sys.argv[1]):\n"
              "    build_parser(verb)\n"
              "heavy = ('torch', 'diffusers', 'transformers', 'onnx', 'matplotlib', 'openvino', 'nncf', 'accelerate')\n"
              "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))))\n")
    for verb in VERBS:  # one process per verb: one verb's imports must not hide another's
        proc = subprocess.run([sys.executable, "-c", script, json.dumps([verb])], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], verb
    # the check can fail: a parser that imports torch is caught
    proc = subprocess.run([sys.executable, "-c", "import torch\n" + script, json.dumps(["route"])],
                          capture_output=True, text=True, timeout=120)
    assert "torch" in json.loads(proc.stdout.strip().splitlines()[-1])


def test_packaged_configs_and_their_layouts_from_the_command_line(capsys):
    from pathlib import Path

    from aptp.cli import main

    names = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "training" / "configs").glob("*.yaml"))
    assert main(["config", "list"]) == 0
    listing = capsys.readouterr().out
    assert [ln.split()[0] for ln in listing.strip().splitlines()] == names
    assert "SD 2.1: APTP-Base on MS-COCO 2014; budget 0.78, 8 experts" in listing
    assert main(["config", "show", "sdxl_coco_base"]) == 0
    shown = capsys.readouterr().out
    assert "name: sdxl_coco_base" in shown and "text_encoder_2/" in shown and "tokenizer_2/" in shown
    assert '{"file_name": "0001.jpg", "text": "a caption"}' in shown and "--set model.path=" in shown
    assert main(["config", "show", "nope"]) == 2
    assert "no packaged config 'nope'" in capsys.readouterr().err


def test_prune_help_lists_the_packaged_configs(capsys):
    import pytest

    from aptp.cli import main

    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    assert "packaged configs" in out and "sd21_coco_base" in out and "aptp config show NAME" in out


def test_placeholder_and_missing_model_paths_name_the_fix(tmp_path, capsys):
    from aptp.cli import main

    assert main(["prune", "--config", "sd21_coco_base"]) == 2
    err = capsys.readouterr().err
    assert "placeholder /path/to/coco2014" in err and "--set data.path=DIR" in err and "\n" not in err.strip()
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    empty = tmp_path / "model"
    empty.mkdir()
    assert main(["prune", "--config", "sd21_coco_base", "--set", f"data.path={data}",
                 "--set", f"model.path={empty}"]) == 2
    err = capsys.readouterr().err
    assert "lacks unet/ and scheduler/" in err and "vae/ text_encoder/ tokenizer/" in err
