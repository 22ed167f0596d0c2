"""The command line under faults: every failure one line `TOOL: error: WHAT` and a non-zero exit
(ringmoe/cli.py: 2 for the command line or config, 1 for input and environment), a second run
on a held workdir stopped at once without touching it (pretrain/lock.py), config values
checked before any work (pretrain/validate.py).

Each case starts from the faulty input and runs the real entry point: `python -m
pretrain.train` and `python -m tools.bench data` as subprocesses (absl parses flags once per
process).
"""
import hashlib
import os
import re
import signal
import subprocess
import sys

import pytest

from pretrain.lock import WorkdirInUseError, workdir_lock
from pretrain.validate import validate_config
from ringmoe import cli
from ringmoe.cli import ConfigError
from ringmoe.data import synthetic
from tests.small import micro_config
from tests.xla import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL_CONFIG = '''
from configs import tiny


def get_config():
    c = tiny.get_config()
    m = c.model
    m.image_size, m.depths, m.num_heads, m.embed_dim = 32, (1, 1), (1, 2), 16
    for name in ("multispectral", "sar_l2", "sar_l1"):
        del m.modalities[name]
    c.batch_size = 8
    c.data.mask_block_size = 8
    c.data.prefetch = 0
    c.total_steps, c.log_every, c.eval_every, c.image_every, c.checkpoint_every = 2, 1, 0, 0, 2
    c.pictures = False
    return c
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small data set, a config file for it, and broken data set directories."""
    root = tmp_path_factory.mktemp("faults")
    synthetic.write(str(root / "data"), 16, 32, seed=0)
    (root / "config.py").write_text(SMALL_CONFIG)
    (root / "empty").mkdir()
    no_manifest = root / "no_manifest"
    no_manifest.mkdir()
    for name in os.listdir(root / "data"):
        if name != "manifest.json":
            os.link(root / "data" / name, no_manifest / name)
    bad_json = root / "bad_json"
    bad_json.mkdir()
    (bad_json / "manifest.json").write_text('{"format": ')
    return root


def env():
    e = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    e.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)  # one CPU device
    return e


def run(module, *args) -> tuple[int, list[str]]:
    """(exit status, non-empty stderr lines) of `python -m module args`."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()]


def train_args(setup, workdir, *extra):
    return ["pretrain.train", f"--config={setup / 'config.py'}", f"--workdir={workdir}",
            f"--config.data_dir={setup / 'data'}", *extra]


def bench_args(setup, *extra):
    return ["tools.bench", "data", f"--config={setup / 'config.py'}", f"--data={setup / 'data'}", "--batches=1",
            *extra]


def snapshot(directory) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


# --- bad data sets: exit 1, one line naming the file ---------------------------------------------

BAD_DATA = {  # directory -> the message after 'TOOL: error: DIR'
    "no_manifest": ": incomplete or not a data set: missing manifest.json",
    "bad_json": "/manifest.json: invalid manifest (JSONDecodeError: Expecting value: line 1 column 12 (char 11))",
    "empty": ": empty directory: missing manifest.json",
    "missing": ": no such data set directory",
}


@pytest.mark.parametrize("data", list(BAD_DATA))
def test_trainer_on_a_bad_data_set_says_which_file_in_one_line(setup, tmp_path, data):
    workdir = tmp_path / "run"
    rc, err = run(*train_args(setup, workdir, f"--config.data_dir={setup / data}"))
    assert (rc, err) == (1, [f"pretrain.train: error: {setup / data}{BAD_DATA[data]}"])
    assert os.listdir(workdir) == [".lock"]  # nothing trained, nothing written


@pytest.mark.parametrize("data", list(BAD_DATA))
def test_bench_data_on_a_bad_data_set_says_which_file_in_one_line(setup, data):
    rc, err = run(*bench_args(setup, f"--data={setup / data}"))
    assert (rc, err) == (1, [f"tools.bench: error: {setup / data}{BAD_DATA[data]}"])


# --- the command line and the config: exit 2, one line naming the flag, file or key -------------

@pytest.mark.parametrize("tool", ["train", "bench"])
def test_unknown_config_key_is_named(setup, tmp_path, tool):
    args = train_args(setup, tmp_path / "run", "--config.nonexistent=1") if tool == "train" else \
        bench_args(setup, "--config.total_step=3")
    rc, err = run(*args)
    expected = ("pretrain.train: error: --config.nonexistent=1: the config has no key 'nonexistent'"
                if tool == "train" else
                "tools.bench: error: --config.total_step=3: the config has no key 'total_step' "
                "(did you mean 'total_steps'?)")
    assert (rc, err) == (2, [expected])


@pytest.mark.parametrize("tool", ["train", "bench"])
def test_missing_config_file_is_named(setup, tmp_path, tool):
    missing = tmp_path / "no_such_config.py"
    args = train_args(setup, tmp_path / "run") if tool == "train" else bench_args(setup)
    args = [a if not a.startswith("--config=") else f"--config={missing}" for a in args]
    rc, err = run(*args)
    name = "pretrain.train" if tool == "train" else "tools.bench"
    assert (rc, err) == (2, [f"{name}: error: --config={missing}: no such config file"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tool", ["train", "bench"])
def test_batch_size_zero_is_refused_before_any_work(setup, tmp_path, tool):
    args = train_args(setup, tmp_path / "run") if tool == "train" else bench_args(setup)
    rc, err = run(*args, "--config.batch_size=0")
    name = "pretrain.train" if tool == "train" else "tools.bench"
    assert (rc, err) == (2, [f"{name}: error: config.batch_size = 0: must be a positive integer"])
    assert not (tmp_path / "run").exists()


def test_negative_total_steps_is_refused_before_any_work(setup, tmp_path):
    rc, err = run(*train_args(setup, tmp_path / "run", "--config.total_steps=-1"))
    assert (rc, err) == (2, ["pretrain.train: error: config.total_steps = -1: must be a positive integer"])
    assert not (tmp_path / "run").exists()


def read_only_workdir(tmp_path) -> str:
    """A directory this process cannot write: mode 0555, or, for root (whom modes do not stop),
    one under /sys (sysfs refuses new entries)."""
    if os.geteuid() != 0:
        path = tmp_path / "read_only"
        path.mkdir(mode=0o555)
        return str(path)
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("running as root without sysfs: no directory root cannot write")
    return "/sys/ringmoe-test-workdir"


def test_read_only_workdir_is_named(setup, tmp_path):
    workdir = read_only_workdir(tmp_path)
    rc, err = run(*train_args(setup, workdir))
    assert rc == 1 and len(err) == 1, err
    assert re.fullmatch(rf"pretrain\.train: error: {re.escape(workdir)}(/\.lock)?: cannot write to the workdir "
                        r"\((Permission denied|Operation not permitted|Read-only file system)\)", err[0]), err


def test_debug_flag_gives_the_traceback(setup):
    rc, err = run(*bench_args(setup, "--config.nonexistent=1", "--debug"))
    assert rc == 1 and err[0].startswith("Traceback") and "AttributeError" in err[-1]


# --- the workdir lock -----------------------------------------------------------------------------

def test_second_run_on_a_held_workdir_stops_at_once_and_touches_nothing(setup, tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "4").mkdir(parents=True)
    (workdir / "checkpoints" / "4" / "state").write_bytes(b"a finished checkpoint")
    (workdir / "metrics.jsonl").write_text('{"step": 4, "loss": 0.5}\n')
    before = snapshot(workdir)
    with workdir_lock(str(workdir)):  # the run that holds it: this test process
        rc, err = run(*train_args(setup, workdir))
        assert (rc, err) == (1, [f"pretrain.train: error: {workdir}: workdir in use by pid {os.getpid()} "
                                 f"(lock {workdir}/.lock)"])
        after = snapshot(workdir)
        assert after.pop(".lock") == hashlib.sha256(f"{os.getpid()}\n".encode()).hexdigest()  # the holder's pid
        assert after == before  # the checkpoint and the metrics untouched, nothing added


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pretrain.lock import workdir_lock\n"
                               f"with workdir_lock({workdir!r}):\n    print('held', flush=True); time.sleep(300)"],
                              cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirInUseError, match=f"workdir in use by pid {holder.pid} "):
            with workdir_lock(workdir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with workdir_lock(workdir):  # no stale lock
        with open(os.path.join(workdir, ".lock")) as f:
            assert f.read().strip() == str(os.getpid())


# --- config validation ----------------------------------------------------------------------------

BAD_VALUES = [  # (key, value, what the message says after 'config.KEY = VALUE: ')
    ("total_steps", -1, "must be a positive integer"),
    ("batch_size", 0, "must be a positive integer"),
    ("grad_accum_steps", 0, "must be a positive integer"),
    ("log_every", 0, "must be a positive integer"),
    ("eval_every", -5, "must be an integer >= 0"),
    ("data.mask_ratio", 1.5, "must be in [0, 1]"),
    ("data.crop_scale", (0.5, 0.2), "must be (low, high) with 0 < low <= high <= 1"),
    ("data.modality_weights.optical", -1.0, "must be a finite number >= 0"),
    ("optimizer.lr", -1e-3, "must be a finite number >= 0"),
    ("optimizer.lr", float("nan"), "must be a finite number >= 0"),
    ("optimizer.b2", 1.0, "must be in [0, 1)"),
    ("model.moe.capacity_factor", 0.0, "must be a finite number > 0"),
    ("model.moe.top_k", 0, "must be a positive integer"),
    ("objectives.span", -1.0, "must be a finite number >= 0"),
    ("probe.test_fraction", 1.0, "must be in (0, 1)"),
    ("compress.keep_collaborative", 0.0, "must be in (0, 1]"),
]


def _set(config, key, value):
    *path, leaf = key.split(".")
    for name in path:
        config = config[name]
    config[leaf] = value


@pytest.mark.parametrize("key,value,what", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_config_value_out_of_range_names_the_key(key, value, what):
    config = micro_config(("optical", "sar_l2"))
    validate_config(config)  # the test configs pass
    _set(config, key, value)
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    assert str(e.value) == f"config.{key} = {value!r}: {what}"


def test_modality_weights_must_serve_the_batch():
    config = micro_config(("optical", "sar_l2"))
    config.data.modality_weights.optical, config.data.modality_weights.sar_l2 = 0.0, 0.0
    with pytest.raises(ConfigError, match=r"config.data.modality_weights = \{.*\}: no modality of the model "
                                          r"\(optical, sar_l2\) has a positive weight"):
        validate_config(config)
    config.data.modality_weights.sar_l2 = 0.5  # one served modality is enough
    validate_config(config)


def test_every_bad_value_is_named_in_the_one_line():
    config = micro_config(("optical",))
    config.total_steps, config.batch_size = -1, 0
    with pytest.raises(ConfigError, match=r"^config.total_steps = -1: must be a positive integer; "
                                          r"config.batch_size = 0: must be a positive integer$"):
        validate_config(config)


# --- the shared helper, and argparse tools through it ---------------------------------------------

def test_helper_reports_input_errors_and_lets_bugs_raise(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as e, cli.errors("tools.x"):
        open("/nonexistent/file")
    assert e.value.code == 1
    assert capsys.readouterr().err == "tools.x: error: /nonexistent/file: No such file or directory\n"
    with pytest.raises(SystemExit) as e, cli.errors("tools.x"):
        raise ConfigError("config.batch_size = 0: must be a positive integer")
    assert e.value.code == 2
    with pytest.raises(ZeroDivisionError), cli.errors("tools.x"):  # a bug keeps its traceback
        1 / 0
    with pytest.raises(FileNotFoundError), cli.errors("tools.x", debug=True):
        open("/nonexistent/file")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError), cli.errors("tools.x"):
        open("/nonexistent/file")


def _tool(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, cli.DEBUG_ENV: "0"})


def test_data_tools_report_through_the_helper(setup):
    proc = _tool("tools.inspect", str(setup / "empty"))
    assert proc.returncode == 2  # tools.inspect's own rule: a data set it cannot read at all
    assert proc.stderr == f"tools.inspect: error: {setup / 'empty'}: empty directory: missing manifest.json\n"
    proc = _tool("tools.make_synthetic", "--out", str(setup / "data"), "--examples", "2", "--image-size", "32")
    assert proc.returncode == 1
    assert proc.stderr == (f"tools.make_synthetic: error: {setup / 'data'}: already holds a data set "
                           "(manifest.json); use an empty directory\n")


def test_data_tools_take_absl_flags_and_refuse_misplaced_ones(tmp_path):
    """One convention: absl flags, usage errors as one line with status 2."""
    cases = [(("tools.make_synthetic", "--out", str(tmp_path / "a"), "--examples", "0"),
              "flag --examples=0: 0 is not a positive integer"),
             (("tools.make_synthetic", "--out", str(tmp_path / "a"), "--examples", "2", "--hardness"),
              "--hardness needs --labeled"),
             (("tools.convert", "tfds", "--name", "eurosat/all", "--out", str(tmp_path / "b"), "--tile", "64"),
              "--tile: not a flag of tfds"),
             (("tools.convert", "rsvqa", "--questions-json", "q", "--answers-json", "a", "--images", "i",
               "--out", str(tmp_path / "c"), "--split", "train"), "--split: not a flag of rsvqa"),
             (("tools.convert", "--out", str(tmp_path / "b")), "one source kind: python -m tools.convert "
              "{geotiff|tfds|captions|rsvqa} --out DIR ..."),
             (("tools.inspect",), "one argument: the data set directory (python -m tools.inspect DIR)"),
             (("tools.params", "--config", "configs/tiny.py", "stray"), "unexpected arguments: stray"),
             (("tools.caption", "--data", str(tmp_path)), "--checkpoint required"),
             (("pretrain.train",), "--config, --workdir required"),
             (("tools.demo", "--config.nonexistent=1"), "--config.nonexistent=1: the config has no key 'nonexistent'"),
             (("tools.demo", "--config.total_steps=0"), "config.total_steps = 0: must be a positive integer")]
    for args, message in cases:
        proc = _tool(*args)
        assert (proc.returncode, proc.stderr.strip()) == (2, f"{args[0]}: error: {message}"), args
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_every_tool_is_an_absl_tool():
    """Every `python -m tools.NAME` (and pretrain.train) parses absl flags through cli.run_absl."""
    tools_dir = os.path.join(REPO, "tools")
    entry_points = [os.path.join(tools_dir, f) for f in sorted(os.listdir(tools_dir))
                    if f.endswith(".py") and f != "__init__.py"] + [os.path.join(REPO, "pretrain", "train.py")]
    for path in entry_points:
        source = open(path, encoding="utf-8").read()
        assert "argparse" not in source and "cli.run_absl(" in source, path
