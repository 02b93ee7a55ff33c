"""Output-folder and disk safety (issue 21, round three): an output never replaces or clears an input of the same
command, a full disk during an export or under --activation_dir is one `error:` line, one job at a time per output,
and what a killed export leaves beside its target is removed by the next export into it.

Every refusal: exit code 2, exactly one stderr line starting with `error:` naming what to fix, no traceback, every
input file as it was, nothing left that looks complete."""
import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core import cli
from core.config import parse_config
from core.matrices import build_payload, save_matrices, uncalibrated_states
from core.outputs import LOCK_FILE, check_apart, folder_lock
from core.realquant.folder import remove_stale_leftovers

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--nsamples", "2", "--seqlen", "32", "--no_ppl", "--no_time_diff"]
TRAIN = ["--max_layers", "1", "--epochs", "1", *FAST]


def tree(folder: Path) -> dict:
    """Every file under folder (hidden ones too) with its hash."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, argv, *needles) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert all(n in errors[0] for n in needles), errors[0]
    return errors[0]


def succeeded(capsys, argv) -> str:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_qwen3_dir):
    """A calibrated run of the tiny model: flat_matrices.pth, report.json, quantize.log."""
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["quantize", "--model_path", str(tiny_qwen3_dir), *TRAIN, "--output_dir", str(out)]) == 0
    assert {"flat_matrices.pth", "report.json", "quantize.log"} <= set(os.listdir(out))
    return out


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tiny_qwen3):
    """A FlatQuant matrix file for the tiny model (identity transforms: no calibration needed)."""
    cfg = parse_config(None)
    _, states = uncalibrated_states(tiny_qwen3, cfg)
    path = tmp_path_factory.mktemp("matrix") / "flat_matrices.pth"
    return save_matrices(path, build_payload(tiny_qwen3, cfg, states, complete=True))


def export_args(model_dir, matrix_path, out, fmt="native", *extra):
    return ["export", "--format", fmt, "--model_path", str(model_dir), "--flat_matrix_path", str(matrix_path),
            "--output_dir", str(out), *extra]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- 1. an output never replaces or clears an input ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["native", "ascend"])
def test_export_overwrite_into_the_folder_of_its_matrix_file_is_refused(fmt, run_dir, tiny_qwen3_dir, tmp_path,
                                                                        capsys, no_model_load):
    before = tree(run_dir)
    matrix_path = run_dir / "flat_matrices.pth"
    refused(capsys, export_args(tiny_qwen3_dir, matrix_path, run_dir, fmt, "--overwrite"), "--output_dir",
            "holds the matrix file (--flat_matrix_path)")
    link = tmp_path / "link"  # the same folder through a link
    link.symlink_to(run_dir)
    refused(capsys, export_args(tiny_qwen3_dir, matrix_path, link, fmt, "--overwrite"), "the matrix file")
    refused(capsys, export_args(tiny_qwen3_dir, matrix_path, run_dir.parent, fmt, "--overwrite"), "holds")
    assert tree(run_dir) == before and not [p for p in os.listdir(run_dir.parent) if p.startswith(f".{run_dir.name}")]


@pytest.mark.parametrize("fmt", ["native", "ascend"])
def test_export_into_or_around_the_model_folder_is_refused(fmt, matrix, tiny_qwen3_dir, capsys, no_model_load):
    before = tree(tiny_qwen3_dir)
    for target, needle in ((tiny_qwen3_dir, "is the source model"), (tiny_qwen3_dir / "sub", "inside the folder"),
                           (tiny_qwen3_dir.parent, "holds the source model")):
        refused(capsys, export_args(tiny_qwen3_dir, matrix, target, fmt, "--overwrite"), needle, "--model_path")
    assert tree(tiny_qwen3_dir) == before and not (tiny_qwen3_dir / "sub").exists()


def test_quantize_export_folder_holding_an_input_is_refused_before_anything_runs(tiny_qwen3_dir, tmp_path, capsys,
                                                                                 no_model_load):
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    calib = out / "checkpoint" / "calib.txt"
    calib.write_text("some calibration text " * 50)
    base = ["quantize", "--model_path", str(tiny_qwen3_dir), *TRAIN, "--output_dir", str(out)]
    refused(capsys, [*base, "--export", "native", "--calib_data", str(calib)], "--export native",
            "holds the calibration data (--calib_data)")
    (out / "ascend").mkdir()
    refused(capsys, [*base, "--export", "ascend", "--activation_dir", str(out / "ascend")], "--activation_dir")
    assert tree(out) == {"checkpoint/calib.txt": hashlib.sha256(calib.read_bytes()).hexdigest()}
    assert sorted(os.listdir(out)) == ["ascend", "checkpoint"]


def test_quantize_and_evaluate_never_write_over_an_input_file(tiny_qwen3_dir, tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("my ppl text " * 100)
    (out / "lm_eval_tasks").mkdir()
    (out / "lm_eval_tasks" / "arc.jsonl").write_text("{}\n")
    before = tree(out)
    refused(capsys, ["quantize", "--model_path", str(tiny_qwen3_dir), *TRAIN, "--output_dir", str(out),
                     "--calib_data", str(out / "report.json")], "'report.json'", "--calib_data")
    refused(capsys, ["evaluate", "--model_path", str(tiny_qwen3_dir), "--eval", "ppl", "--output_dir", str(out),
                     "--ppl_data", str(out / "report.json")], "'report.json'", "--ppl_data")
    refused(capsys, ["evaluate", "--model_path", str(tiny_qwen3_dir), "--eval", "acc", "--output_dir", str(out),
                     "--tasks_data_dir", str(out / "lm_eval_tasks")], "'lm_eval_tasks'", "--tasks_data_dir")
    assert tree(out) == before


def test_the_rule_in_one_function(tmp_path):
    """check_apart: the whole-folder rule (replaced or cleared) and the written-entries rule (files put there)."""
    from core.errors import OutputError

    data = tmp_path / "data"
    data.mkdir()
    (data / "calib.txt").write_text("x")
    inputs = [("--calib_data", data / "calib.txt"), ("--ppl_data", None), ("--calib_data", "wikitext:raw")]
    for target in (data, tmp_path, data / "calib.txt"):
        with pytest.raises(OutputError, match="--calib_data"):
            check_apart(target, inputs)
    check_apart(tmp_path / "elsewhere", inputs)
    check_apart(data, inputs, written=["report.json"])  # writing report.json beside the data loses nothing
    with pytest.raises(OutputError, match="'calib.txt'"):
        check_apart(data, inputs, written=["calib.txt"])


# --- 2. a full disk during an export ------------------------------------------------------------------------------


def _full_disk_by(monkeypatch, what: str) -> None:
    """Make one of the export's writes fail as on a full disk."""
    import safetensors
    import safetensors.torch
    import transformers

    if what == "safetensors":  # the Rust writer wraps the OSError: SafetensorError, not OSError
        def fail(*args, **kwargs):
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device "
                                              "(os error 28)")

        monkeypatch.setattr(safetensors.torch, "save_file", fail)
    elif what == "tokenizer":
        def fail(*args, **kwargs):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

        monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", fail)
    else:  # the json files (config.json, the manifest / the ascend description)
        def fail(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(transformers.PretrainedConfig, "save_pretrained", fail)


@pytest.mark.parametrize("what", ["safetensors", "tokenizer", "json"])
@pytest.mark.parametrize("fmt", ["native", "ascend"])
def test_a_failed_export_write_is_one_error_line_and_leaves_nothing(fmt, what, matrix, tiny_qwen3_dir, tmp_path,
                                                                     capsys, monkeypatch):
    _full_disk_by(monkeypatch, what)
    old = tmp_path / "old"  # an earlier export replaced with --overwrite: kept as it was
    old.mkdir()
    (old / "model.safetensors").write_text("the earlier export")
    for out, extra in ((tmp_path / "new", ()), (old, ("--overwrite",))):
        refused(capsys, export_args(tiny_qwen3_dir, matrix, out, fmt, *extra), "nothing was written", "free")
    assert os.listdir(old) == ["model.safetensors"] and (old / "model.safetensors").read_text() == "the earlier export"
    assert sorted(os.listdir(tmp_path)) == ["old"]  # no staged folder, no lock file


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of a few KiB (skipped where mounting is not permitted)."""
    folder = tmp_path / "small"
    folder.mkdir()

    def mount(size: str) -> Path:
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True,
                           capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"cannot mount a small tmpfs here ({type(exc).__name__}); the injected variants cover it")
        return folder

    yield mount
    subprocess.run(["umount", str(folder)], capture_output=True, timeout=30)


@pytest.mark.parametrize("fmt", ["native", "ascend"])
def test_export_onto_a_disk_that_fills_up(fmt, small_disk, matrix, tiny_qwen3_dir, capsys):
    disk = small_disk("2m")  # the tiny model's export is ~25 MB
    refused(capsys, export_args(tiny_qwen3_dir, matrix, disk / "out", fmt), "No space left on device",
            "nothing was written", "free some space")
    assert os.listdir(disk) == []


# --- 3. --activation_dir on a disk that fills up ------------------------------------------------------------------


def test_activation_dir_without_room_is_refused_before_the_model_loads(small_disk, tiny_qwen3_dir, tmp_path, capsys,
                                                                       no_model_load):
    act = small_disk("16k")  # 2 x 2 x 32 x 256 x 4 bytes = 128 KiB needed
    out = tmp_path / "out"
    refused(capsys, ["quantize", "--model_path", str(tiny_qwen3_dir), *TRAIN, "--output_dir", str(out),
                     "--activation_dir", str(act)], "--activation_dir", "131,072 bytes")
    assert not out.exists()


def test_activation_dir_filling_up_is_one_error_line_not_sigbus(small_disk, tiny_qwen3_dir, tmp_path, capsys):
    act = small_disk("32k")  # past the estimate (--no_memory_check): the reservation fails, not a mapped write
    out = tmp_path / "out"
    refused(capsys, ["quantize", "--model_path", str(tiny_qwen3_dir), *TRAIN, "--output_dir", str(out),
                     "--activation_dir", str(act), "--no_memory_check"], "--activation_dir", "65,536 bytes",
            "No space left on device")
    assert not out.exists() and os.listdir(act) == []


def test_activation_reservation_failure_injected(tiny_qwen3_dir, tmp_path, capsys, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    out, act = tmp_path / "out", tmp_path / "act"
    refused(capsys, ["quantize", "--model_path", str(tiny_qwen3_dir), *TRAIN, "--output_dir", str(out),
                     "--activation_dir", str(act)], "--activation_dir", "65,536 bytes", "free space")
    assert not out.exists() and os.listdir(act) == []


def test_activation_dir_that_is_a_file_is_one_error_line(tiny_qwen3_dir, tmp_path, capsys):
    blocker = tmp_path / "act"
    blocker.write_text("not a folder")
    out = tmp_path / "out"
    refused(capsys, ["quantize", "--model_path", str(tiny_qwen3_dir), *TRAIN, "--output_dir", str(out),
                     "--activation_dir", str(blocker)], "--activation_dir")
    assert not out.exists() and blocker.read_text() == "not a folder"


# --- 4. one job per output ----------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from core.outputs import folder_lock, target_lock
lock = (target_lock if sys.argv[1] == "target" else folder_lock)(sys.argv[2], command="python -m core quantize X")
with lock:
    print("ready", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder():
    """Start another process holding an output's lock; yields a function (kind, path) -> Popen; killed after."""
    procs = []

    def start(kind: str, path: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), kind, str(path)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_job_into_a_locked_folder_is_refused_naming_the_first(holder, tiny_qwen3_dir, matrix, tmp_path,
                                                                       capsys, no_model_load):
    out = tmp_path / "out"
    first = holder("folder", out)
    quantize = ["quantize", "--model_path", str(tiny_qwen3_dir), *TRAIN, "--output_dir", str(out)]
    line = refused(capsys, quantize, "in use by another job", f"pid {first.pid}", "started", "python -m core quantize")
    assert "--output_dir" in line
    refused(capsys, ["evaluate", "--model_path", str(tiny_qwen3_dir), "--eval", "ppl", "--output_dir", str(out)],
            f"pid {first.pid}")
    assert os.listdir(out) == [LOCK_FILE]  # the holder's; nothing of ours
    target = tmp_path / "export"
    second = holder("target", target)
    refused(capsys, export_args(tiny_qwen3_dir, matrix, target), f"pid {second.pid}")
    assert not target.exists()
    # across commands: an export would replace a folder a job writes in, a job would write in a folder being replaced
    refused(capsys, export_args(tiny_qwen3_dir, matrix, out, "native", "--overwrite"), f"pid {first.pid}")
    refused(capsys, [*quantize[:-1], str(target)], f"pid {second.pid}")
    assert os.listdir(out) == [LOCK_FILE] and not target.exists()


def test_the_lock_goes_with_its_process_and_never_stays_in_the_folder(holder, tiny_qwen3_dir, tmp_path, capsys):
    out = tmp_path / "out"
    first = holder("folder", out)
    first.send_signal(signal.SIGKILL)  # a killed job: its lock file stays, its lock does not
    first.wait()
    assert os.listdir(out) == [LOCK_FILE]
    succeeded(capsys, ["quantize", "--model_path", str(tiny_qwen3_dir), "--algorithm", "rtn", *FAST,
                       "--output_dir", str(out)])
    assert sorted(os.listdir(out)) == ["flat_matrices.pth", "quantize.log", "report.json"]


def test_a_job_that_fails_early_removes_the_folder_and_its_lock(tiny_qwen3_dir, tmp_path, capsys):
    out = tmp_path / "new" / "out"
    refused(capsys, ["quantize", "--model_path", str(tiny_qwen3_dir), *TRAIN, "--output_dir", str(out),
                     "--skip_layers", "no_such_layer"], "no_such_layer")
    assert not out.exists()


def test_the_same_process_may_reenter_its_own_lock(tmp_path):
    """The GUI runs its jobs in its own process, one at a time: nested use of one folder is not refused."""
    with folder_lock(tmp_path / "run"):
        with folder_lock(tmp_path / "run"):
            assert (tmp_path / "run" / LOCK_FILE).exists()
        assert (tmp_path / "run" / LOCK_FILE).exists()
    assert os.listdir(tmp_path / "run") == []


# --- 5. what a killed export leaves beside its target -------------------------------------------------------------

KILLED_WRITER = """
import sys, time
from pathlib import Path
from core.realquant.folder import StagedFolder
with StagedFolder(Path(sys.argv[1]).resolve()) as staged:
    (staged.path / "model.safetensors").write_bytes(b"half" * 10000)
    print("ready", flush=True)
    time.sleep(120)
"""


def test_a_killed_exports_staged_folder_is_removed_by_the_rerun(matrix, tiny_qwen3_dir, tmp_path, capsys):
    out = tmp_path / "out"
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(out)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    writer.kill()
    writer.wait()
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 2 and left[0] == ".out.lock" and left[1].startswith(f".out.partial-{writer.pid}-")
    (tmp_path / f".out.old-{dead_pid()}-0123abcd").mkdir()  # a killed commit's previous target
    (tmp_path / ".out.partial-89abcdef").mkdir()  # an older version's name (no pid)
    succeeded(capsys, export_args(tiny_qwen3_dir, matrix, out))
    assert sorted(os.listdir(tmp_path)) == ["out"] and (out / "model.safetensors").stat().st_size > 40000


def test_a_live_writers_staged_folder_is_kept(holder, tmp_path):
    live = holder("folder", tmp_path / "busy")  # any live process
    staged = tmp_path / f".out.partial-{live.pid}-0123abcd"
    dead = tmp_path / f".out.partial-{dead_pid()}-0123abcd"
    other = tmp_path / f".other.partial-{dead_pid()}-0123abcd"  # another target's
    for d in (staged, dead, other):
        d.mkdir()
    assert remove_stale_leftovers(tmp_path / "out") == [dead.name]
    assert staged.exists() and other.exists() and not dead.exists()


def test_a_killed_commit_gives_the_previous_export_back(matrix, tiny_qwen3_dir, tmp_path, capsys):
    """Killed between moving the old target aside and moving the new one in: the old one is put back, so an export
    without --overwrite is refused as before and nothing is lost."""
    old = tmp_path / f".out.old-{dead_pid()}-0123abcd"
    old.mkdir()
    (old / "model.safetensors").write_text("the earlier export")
    refused(capsys, export_args(tiny_qwen3_dir, matrix, tmp_path / "out"), "--overwrite")
    assert (tmp_path / "out" / "model.safetensors").read_text() == "the earlier export"
    assert sorted(os.listdir(tmp_path)) == ["out"]

