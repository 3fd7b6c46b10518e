"""Start-up: user mistakes end in one line (no traceback), a bug in one traceback; the pre-flight checks;
the shared-memory clean-up of dead processes."""

import json
import os
import socket
import subprocess
import sys

import pytest

from sd.runtime import preflight, shm
from tests.helpers.common import ROOT, env_with_root, train_command

ENTRY = os.path.join(ROOT, "train_txt2img_laion400m_trainer.py")

# Runs the entry point once per case in one process (Paddle imported once), each case's output (fd 1 and 2)
# in its own file; a case ends in SystemExit, like the command line would.
DRIVER = r"""
import json, os, runpy, sys
cases, out = json.loads(sys.argv[1]), sys.argv[2]
results = {{}}
for name, (argv, env, bug) in cases.items():
    saved = dict(os.environ)
    os.environ.update(env)
    if bug:  # a programming error in the data code (not a user mistake)
        import sd.build
        def broken(*a, **k):
            return {{}}["injected bug"]
        sd.build.build_dataset = broken
    log = os.open(os.path.join(out, name + ".log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sys.stdout.flush(); sys.stderr.flush()
    fd1, fd2 = os.dup(1), os.dup(2)
    os.dup2(log, 1); os.dup2(log, 2)
    sys.argv = [{entry!r}] + argv
    try:
        runpy.run_path({entry!r}, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(fd1, 1); os.dup2(fd2, 2)
    os.environ.clear(); os.environ.update(saved)
    results[name] = code
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def mistakes(tiny_kit, demo_file_list, tmp_path_factory):
    root = tmp_path_factory.mktemp("mistakes")
    (root / "binary.list").write_bytes(bytes(range(256)) * 4)
    (root / "three_fields.list").write_text("part.filelist 1 2\n")
    blocker = root / "a_file"
    blocker.write_text("not a folder")

    def argv(out, *extra, file_list=demo_file_list, kit=tiny_kit):
        return train_command(kit, file_list, root / out, "--max_steps", "1", "--report_to", "none", *extra)[2:]

    cases = {
        "missing_list": (argv("o1", file_list="/nonexistent.list"), {}, False),
        "binary_list": (argv("o2", file_list=str(root / "binary.list")), {}, False),
        "three_fields": (argv("o3", file_list=str(root / "three_fields.list")), {}, False),
        "missing_kit": (argv("o4", kit=str(root / "no_such_kit")), {}, False),
        "flags_clash": (argv("o5", "--precomputed_latents", "True", "--train_text_encoder", "True"), {}, False),
        "bad_value": (argv("o6", "--prediction_type", "sample"), {}, False),
        "unwritable": (train_command(tiny_kit, demo_file_list, blocker / "out")[2:], {}, False),
        "bad_paddle_flag": (argv("o7"), {"FLAGS_check_nan_inf": "maybe"}, False),
        "bad_switch": (argv("o8"), {"FLAG_USE_EMA": "maybe"}, False),
        "bug": (argv("o9"), {}, True),
    }
    code = DRIVER.format(entry=ENTRY)
    r = subprocess.run([sys.executable, "-c", code, json.dumps(cases), str(root)], capture_output=True, text=True,
                       timeout=400, cwd=ROOT, env=env_with_root())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    codes = json.loads(r.stdout.strip().splitlines()[-1])
    return {name: (codes[name], (root / f"{name}.log").read_text()) for name in cases}


@pytest.mark.parametrize("case, expected", [
    ("missing_list", "error: --file_list /nonexistent.list: no such file; give the *.filelist.list"),
    ("binary_list", "binary.list: not a text file list"),
    ("three_fields", "three_fields.list:1: part.filelist not found"),
    ("missing_kit", "--pretrained_model_name_or_path"),
    ("flags_clash", "error: --precomputed_latents stores the text encoder's outputs, so it cannot be trained"),
    ("bad_value", "error: --prediction_type must be epsilon or v_prediction, got 'sample'"),
    ("unwritable", "error: cannot write to --output_dir"),
    ("bad_paddle_flag", "error: FLAGS_check_nan_inf='maybe' is not a bool"),
    ("bad_switch", "error: environment variable FLAG_USE_EMA='maybe' is not a boolean (use 0 or 1)"),
])
def test_user_mistake_is_one_line(mistakes, case, expected):
    code, log = mistakes[case]
    assert code == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], log[-3000:]
    assert log.rstrip().splitlines()[-1] == errors[0]  # the last thing said


def test_bug_prints_its_traceback_once(mistakes):
    code, log = mistakes["bug"]
    assert code == 1
    assert log.count("Traceback (most recent call last)") == 1, log[-3000:]
    assert "KeyError: 'injected bug'" in log
    assert not [line for line in log.splitlines() if line.startswith("error: ")]


def test_file_list_check_counts_parts(demo_file_list):
    (level, message), = preflight.check_file_list(demo_file_list)
    assert level == "ok" and "1 file list(s), 3 part file(s)" in message


def test_env_flags():
    from sd.sd_args import ENV_SWITCHES

    found = preflight.check_env_flags(ENV_SWITCHES, {"FLAGS_paddle_num_threads": "12abc", "FLAGS_check_nan_inf": "1",
                                                     "FLAGS_no_such_flag_here": "1", "FLAG_USE_EMAA": "1",
                                                     "PATH": "/bin"})
    assert ("stop", "FLAGS_paddle_num_threads='12abc' is not a int (Paddle's FLAGS_paddle_num_threads is a int): "
                    "fix or unset it") in found
    assert [lvl for lvl, m in found if "FLAGS_check_nan_inf" in m] == []  # parses
    assert [lvl for lvl, m in found if "FLAGS_no_such_flag_here" in m] == ["warn"]
    assert [lvl for lvl, m in found if "FLAG_USE_EMAA" in m] == ["warn"]


def test_shm_and_disk_and_port(tmp_path):
    # 32 images of 3×512×512 float32, twice the batch in flight whatever the workers, 1 loader, 8 processes: 1.5 GiB
    needed = preflight.shm_bytes_needed(32, 512, 4, 1, 8)
    assert needed == 32 * 3 * 512 * 512 * 4 * 2 * 8 == preflight.shm_bytes_needed(32, 512, 1, 1, 8)
    assert preflight.shm_bytes_needed(32, 512, 0, 1, 8) == 0  # no workers: nothing in /dev/shm
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    assert preflight.check_shm(free * 2, str(tmp_path))[0][0] == "stop"
    assert preflight.check_shm(int(free * 0.7), str(tmp_path))[0][0] == "warn"
    assert preflight.check_shm(1, str(tmp_path))[0][0] == "ok"
    assert preflight.check_shm(0, str(tmp_path)) == []
    gib = 2**30
    assert preflight.check_disk("out", gib, lambda _: gib // 2)[0][0] == "stop"
    assert preflight.check_disk("out", gib, lambda _: 3 * gib // 2)[0][0] == "warn"
    assert preflight.check_disk("out", gib, lambda _: 3 * gib)[0][0] == "ok"
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {"PADDLE_TRAINERS_NUM": "2", "PADDLE_CURRENT_ENDPOINT": f"127.0.0.1:{port}"}
        (level, message), = preflight.check_port(env)
        assert level == "stop" and f"port {port} of this rank's endpoint" in message
    assert preflight.check_port(env)[0][0] == "ok"  # released
    assert preflight.check_port({}) == []  # not under the launcher
    with pytest.raises(preflight.UserError, match="first"):
        preflight.report([("ok", "a"), ("stop", "first"), ("stop", "second")], lambda *a: None)


def test_dead_processes_segments_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)  # its pid is now free: no process of it is left
    live = os.getpid()
    for name in (f"paddle_{dead.pid}_0_123", f"paddle_{dead.pid}_1_456", f"paddle_{live}_0_789", "other_file"):
        (tmp_path / name).write_bytes(b"x")
    assert sorted(shm.dead_segments(str(tmp_path))) == [f"paddle_{dead.pid}_0_123", f"paddle_{dead.pid}_1_456"]
    assert shm.remove_dead_segments(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == sorted([f"paddle_{live}_0_789", "other_file"])
